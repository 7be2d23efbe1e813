"""Zero-shot evaluation entry point (SPEC 6), configured by Hydra (conf/eval.yaml).

    python -m moeut.evaluate checkpoint=runs/c4_moeut_44m tasks=[lambada,blimp,piqa] limit=100
    python -m moeut.evaluate checkpoint=runs/c4_moeut_44m tasks=[perplexity] perplexity.path=book.txt

A run that has nothing to work on fails (non-zero exit) with one line naming what is missing:
no `checkpoint=`, a checkpoint path that does not exist, a `data_dir=` that does not exist, or no
task finding its data (each task's file or option named). A task whose data alone is missing is
skipped: one warning line naming the task and its file or option, and "skipped" in the table.
One line before the table says which task files were scored (full sets, or the carried subsets
of data/eval with their item counts: not the paper's numbers).

Any key of conf/eval.yaml can be overridden on the command line (`data_dir=...`,
`paths.cbt=/data/CBTest/data`, `normalize_by_task.cbt=false`, `hellaswag_strip_brackets=true`).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Dict

import hydra
from omegaconf import DictConfig, OmegaConf

from .cli import CONF_DIR, one_line_hydra_errors
from .eval.tasks import resolve_tasks
from .eval.tasks.base import EvalOptions
from .eval.zeroshot import evaluate_checkpoint
from .validate import Range, check_mapping

log = logging.getLogger(__name__)

_KNOWN_KEYS = {"checkpoint", "tokenizer", "tasks", "limit", "source", "data_dir", "paths", "out_dir", "dataset",
               "length_normalize", "normalize_by_task", "hellaswag_strip_brackets", "keep_items", "device",
               "dtype", "batch_size", "pad_multiple", "progress", "perplexity"}
_PPL_KEYS = {"path", "hub", "hub_config", "split", "field", "context_length", "stride"}


# Ranges of the numeric options of conf/eval.yaml (no dataclass schema here; same generic check).
EVAL_RANGES = {"limit": Range(1), "batch_size": Range(1), "pad_multiple": Range(1)}


def run(cfg: DictConfig) -> Dict[str, Any]:
    """Evaluate from a composed eval config (used by main and by tests)."""
    if "checkpoint" not in cfg or OmegaConf.is_missing(cfg, "checkpoint") or not cfg.checkpoint:
        raise ValueError("checkpoint: required: pass checkpoint=<run dir or its checkpoints/step_XXXXXXX dir>")
    c = OmegaConf.to_container(cfg, resolve=True)
    c.pop("hydra", None)
    unknown = sorted(set(c) - _KNOWN_KEYS)
    if unknown:
        raise ValueError(f"eval config: unknown key(s) {unknown}; known: {sorted(_KNOWN_KEYS)}")
    ppl = dict(c.get("perplexity") or {})
    bad = sorted(set(ppl) - _PPL_KEYS)
    if bad:
        raise ValueError(f"perplexity: unknown key(s) {bad}; known: {sorted(_PPL_KEYS)}")
    for key in ("context_length", "stride"):
        if ppl.get(key) is not None and (not isinstance(ppl[key], int) or ppl[key] < 1):
            raise ValueError(f"perplexity.{key}: must be a positive integer or null, got {ppl[key]!r}")
    source = str(c.get("source") or "local")
    if c.get("data_dir") and source != "hf" and not os.path.isdir(str(c["data_dir"])):
        raise FileNotFoundError(f"data_dir={c['data_dir']}: no such directory (it should hold the task "
                                "folders lambada/, blimp/, piqa/, ...; see docs/evaluation.md)")
    tasks = c["tasks"]
    resolve_tasks(tasks)  # unknown task -> error listing the known ones
    check_mapping(c, EVAL_RANGES)  # every numeric option against its range, named (moeut.validate)
    limit = c.get("limit")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: must be a positive integer or null, got {limit!r}")
    if not os.path.exists(str(c["checkpoint"])):
        raise FileNotFoundError(f"checkpoint={c['checkpoint']}: no such file or directory "
                                "(no valid checkpoint found; pass a run dir or a checkpoints/step_XXXXXXX dir)")
    opts = EvalOptions(data_dir=c.get("data_dir") or "", limit=limit,
                       length_normalize=c.get("length_normalize"),
                       normalize_by_task=dict(c.get("normalize_by_task") or {}),
                       hellaswag_strip_brackets=bool(c.get("hellaswag_strip_brackets", False)),
                       paths={k: str(v) for k, v in (c.get("paths") or {}).items()},
                       keep_items=bool(c.get("keep_items", False)), source=source,
                       perplexity={k: v for k, v in ppl.items() if v is not None})
    return evaluate_checkpoint(str(c["checkpoint"]), tasks, opts, tokenizer_path=c.get("tokenizer"),
                               out_dir=c.get("out_dir"), device=c.get("device"),
                               batch_size=int(c.get("batch_size", 16)), pad_multiple=int(c.get("pad_multiple", 1)),
                               dtype=c.get("dtype"), progress=bool(c.get("progress", True)),
                               dataset=c.get("dataset"))


@one_line_hydra_errors("moeut.evaluate")
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    """`python -m moeut.evaluate checkpoint=<run dir> [key=value ...]` (conf/eval.yaml): `run`, then
    print the task-data line, the table (the skip reasons being warnings) and the written files;
    each warning is one stderr line "moeut.evaluate: warning: ...". Bad input (ValueError,
    FileNotFoundError, including a damaged run-dir file named file:line) exits 1 with the one-line
    message, no traceback."""
    from moeut.cli import setup_tool_output
    setup_tool_output("moeut.evaluate")  # one-line warnings; no progress frames in a log file
    try:
        res = run(cfg)
    except (ValueError, FileNotFoundError) as e:  # bad input: the message, not a traceback; exit 1
        sys.exit(f"moeut.evaluate: error: {e}")
    from .analysis.table import data_notes, row_from_results, to_markdown
    print(f"moeut.evaluate: {res['data_line']}")
    # the table as written, its notes without the skipped tasks (each was one warning line above)
    print(to_markdown([row_from_results(res["merged"])], data_notes([res["merged"]])), end="")
    for kind, path in res["files"].items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
