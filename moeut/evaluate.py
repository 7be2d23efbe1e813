"""Zero-shot evaluation entry point (SPEC 6), configured by Hydra (conf/eval.yaml).

    python -m moeut.evaluate checkpoint=runs/c4_moeut_44m tasks=[lambada,blimp,piqa] limit=100

Any key of conf/eval.yaml can be overridden on the command line (`data_dir=...`,
`paths.cbt=/data/CBTest/data`, `normalize_by_task.cbt=false`, `hellaswag_strip_brackets=true`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict

import hydra
from omegaconf import DictConfig, OmegaConf

from .eval.tasks import resolve_tasks
from .eval.tasks.base import EvalOptions
from .eval.zeroshot import evaluate_checkpoint
from .validate import Range, check_mapping

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

_KNOWN_KEYS = {"checkpoint", "tokenizer", "tasks", "limit", "source", "data_dir", "paths", "out_dir", "dataset",
               "length_normalize", "normalize_by_task", "hellaswag_strip_brackets", "keep_items", "device",
               "dtype", "batch_size", "pad_multiple", "progress"}


# Ranges of the numeric options of conf/eval.yaml (no dataclass schema here; same generic check).
EVAL_RANGES = {"limit": Range(1), "batch_size": Range(1), "pad_multiple": Range(1)}


def run(cfg: DictConfig) -> Dict[str, Any]:
    """Evaluate from a composed eval config (used by main and by tests)."""
    c = OmegaConf.to_container(cfg, resolve=True)
    c.pop("hydra", None)
    unknown = sorted(set(c) - _KNOWN_KEYS)
    if unknown:
        raise ValueError(f"eval config: unknown key(s) {unknown}; known: {sorted(_KNOWN_KEYS)}")
    if not c.get("checkpoint"):
        raise ValueError("checkpoint: required (a run dir or a checkpoints/step_XXXXXXX dir)")
    tasks = c["tasks"]
    resolve_tasks(tasks)  # unknown task -> error listing the known ones
    check_mapping(c, EVAL_RANGES)  # every numeric option against its range, named (moeut.validate)
    limit = c.get("limit")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: must be a positive integer or null, got {limit!r}")
    opts = EvalOptions(data_dir=c.get("data_dir") or "", limit=limit,
                       length_normalize=c.get("length_normalize"),
                       normalize_by_task=dict(c.get("normalize_by_task") or {}),
                       hellaswag_strip_brackets=bool(c.get("hellaswag_strip_brackets", False)),
                       paths={k: str(v) for k, v in (c.get("paths") or {}).items()},
                       keep_items=bool(c.get("keep_items", False)), source=str(c.get("source") or "local"))
    return evaluate_checkpoint(str(c["checkpoint"]), tasks, opts, tokenizer_path=c.get("tokenizer"),
                               out_dir=c.get("out_dir"), device=c.get("device"),
                               batch_size=int(c.get("batch_size", 16)), pad_multiple=int(c.get("pad_multiple", 128)),
                               dtype=c.get("dtype"), progress=bool(c.get("progress", True)),
                               dataset=c.get("dataset"))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    res = run(cfg)
    print(open(res["files"]["md"]).read(), end="")
    for kind, path in res["files"].items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
