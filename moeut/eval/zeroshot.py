"""Zero-shot evaluation of a model or a checkpoint on the paper's tasks (SPEC 6), no Hydra here.

`evaluate_model` scores an in-memory model; `evaluate_checkpoint` loads a run dir / checkpoint dir,
evaluates, and writes `<run dir>/eval/results_step_XXXXXXX.json` plus the paper-layout table
(`table_step_XXXXXXX.{md,csv,tex}`). `moeut.evaluate` is the Hydra command line around it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from ..rundir import EVAL_DIR, RunDir, run_dir_of
from .scoring import Scorer
from .tasks import TaskDataMissing, resolve_tasks
from .tasks.base import EvalOptions
from .tasks.perplexity import DEFAULT_CONTEXT

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("lambada", "blimp", "cbt", "hellaswag", "piqa", "arc_easy", "arc_challenge")


class NoTaskData(FileNotFoundError):
    """Every requested task was skipped for missing data: nothing was evaluated."""


def load_task_items(tasks: Sequence[str], opts: EvalOptions, skip_missing: bool = True
                    ) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """({task name: items}, {task name: reason skipped}) in the order asked. Raises NoTaskData,
    naming each task's missing file, when no task found its data (a run that would evaluate
    nothing must not look like a success)."""
    loaded: Dict[str, Any] = {}
    skipped: Dict[str, str] = {}
    for task in resolve_tasks(tasks):  # unknown names fail here, before any model work
        try:
            items = task.load(opts)
            if not items:  # e.g. empty files: evaluating nothing is not a result
                raise TaskDataMissing("its data holds no items (empty file?)")
            loaded[task.name] = items
        except TaskDataMissing as e:
            if not skip_missing:
                raise
            msg = f"{task.name}: skipped, data missing: {e}"
            warnings.warn(msg)
            log.warning(msg)
            skipped[task.name] = str(e)
    if not loaded:
        where = f"data_dir={opts.root}" if opts.source != "hf" else "source=hf"
        raise NoTaskData("no task found its data, nothing was evaluated (" + where + "):\n"
                         + "\n".join(f"  {k}: {v}" for k, v in skipped.items())
                         + "\nset data_dir=<dir with the task folders>, paths.<task>=<file or dir>, "
                           "or source=hf (docs/evaluation.md)")
    return loaded, skipped


def evaluate_model(model: torch.nn.Module, tokenizer, tasks: Sequence[str] = DEFAULT_TASKS,
                   opts: Optional[EvalOptions] = None, *, device: Optional[str] = None,
                   batch_size: int = 16, pad_multiple: int = 1, dtype: Optional[str] = "auto",
                   progress: bool = True, skip_missing: bool = True,
                   items: Optional[Tuple[Dict[str, Any], Dict[str, str]]] = None) -> Dict[str, Dict[str, Any]]:
    """{task name: metrics}; a task whose data is missing gets {"skipped": reason}. `items`: the
    output of load_task_items, when the caller loaded them already. Raises NoTaskData when every
    task's data is missing."""
    opts = opts or EvalOptions()
    loaded, skipped = items if items is not None else load_task_items(tasks, opts, skip_missing)
    if getattr(model, "config", None) is not None and hasattr(model.config, "vocab_size"):
        check_vocab(model.config.vocab_size, tokenizer)
    scorer = Scorer(model, device=device, batch_size=batch_size, pad_multiple=pad_multiple, dtype=dtype,
                    progress=progress)
    out: Dict[str, Dict[str, Any]] = {}
    for task in resolve_tasks(tasks):
        if task.name in skipped:
            out[task.name] = {"skipped": skipped[task.name]}
            continue
        t0 = time.time()
        metrics = task.evaluate(loaded[task.name], scorer, tokenizer, opts)
        metrics["seconds"] = round(time.time() - t0, 3)
        if "accuracy" in metrics:
            log.info("%s: accuracy %.4f on %d items", task.name, metrics["accuracy"], metrics.get("n_items", 0))
        else:
            log.info("%s: %s", task.name, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        out[task.name] = metrics
    return out


def check_vocab(model_vocab: int, tokenizer) -> None:
    """Raises ValueError when the tokenizer's piece count differs from the model's vocab_size
    (a tokenizer from another run)."""
    if tokenizer.vocab_size != model_vocab:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is "
                         f"{model_vocab}: wrong tokenizer for this checkpoint")


def read_val_perplexity(run_dir: str, step: Optional[int] = None) -> Optional[float]:
    """The validation perplexity from run_dir/metrics.jsonl (read by moeut.rundir: a cut last
    line is skipped with a warning, any other damaged line raises CorruptRunFile naming
    file:line); None when the file or the key is absent. The training split's own validation set
    ("validation/val/perplexity", or "val/perplexity") wins over extra validation sets
    ("validation/c4/perplexity", ...); otherwise any key ending in "perplexity" with a "val" path
    component. Prefers the record logged at `step`, else the last one."""
    def rank(key: str) -> int:  # lower is better; None = not a validation perplexity
        if key in ("validation/val/perplexity", "val/perplexity"):
            return 0
        parts = key.split("/")
        if key.endswith("perplexity") and any(p in ("val", "validation") or p.startswith("val") for p in parts[:-1]):
            return 1
        return -1

    last, at_step = None, None  # (rank, value)
    for rec in RunDir(run_dir).metrics():
        for k, v in rec.items():
            r = rank(str(k))
            if r < 0 or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            if last is None or r <= last[0]:
                last = (r, float(v))
            if step is not None and rec.get("step") == step and (at_step is None or r <= at_step[0]):
                at_step = (r, float(v))
    best = at_step if at_step is not None else last
    return best[1] if best is not None else None


# data.source of the training config -> the corpus name the paper's table uses
_CORPUS_NAMES = {"c4": "C4", "slimpajama": "SlimPajama", "pes2o": "peS2o", "thestack": "The Stack"}


def run_config_of(checkpoint_dir: str) -> Optional[Dict[str, Any]]:
    """The training config written by train.py (`RunDir.config`): <checkpoint>/config.yaml
    (resolved), else the run dir's .hydra/config.yaml; None when the path or both files are
    absent. Raises CorruptRunFile (file:line) for a file that does not parse."""
    if not os.path.exists(checkpoint_dir):
        return None
    return RunDir(checkpoint_dir).config(checkpoint_dir)


def dataset_name_of(checkpoint_dir: str) -> Optional[str]:
    """The training corpus of a checkpoint, from the `data` section train.py saves: a hub corpus
    by its `data.source` (c4 -> "C4", slimpajama, pes2o, thestack), local files by the folder
    holding `data.path` (…/c4/train.jsonl.gz -> "c4"). None when the run config is absent."""
    cfg = run_config_of(checkpoint_dir)
    data = (cfg or {}).get("data")
    if not isinstance(data, dict):
        return None
    source = data.get("source")
    if isinstance(source, str) and source != "local":
        return _CORPUS_NAMES.get(source, source)
    path = data.get("path")
    if isinstance(path, str) and path:
        p = Path(path)
        return p.parent.name or p.stem
    return None


def _seq_len_of(checkpoint_dir: str) -> Optional[int]:
    data = (run_config_of(checkpoint_dir) or {}).get("data")
    v = data.get("seq_len") if isinstance(data, dict) else None
    return v if isinstance(v, int) and v > 1 else None


def evaluate_checkpoint(checkpoint: str, tasks: Sequence[str] = DEFAULT_TASKS,
                        opts: Optional[EvalOptions] = None, *, tokenizer_path: Optional[str] = None,
                        out_dir: Optional[str] = None, device: Optional[str] = None, batch_size: int = 16,
                        pad_multiple: int = 1, dtype: Optional[str] = "auto", progress: bool = True,
                        dataset: Optional[str] = None) -> Dict[str, Any]:
    """Load, evaluate, write results JSON + tables; returns the results dict (with "files").
    Task data are loaded before the model: NoTaskData when no task has any (nothing written)."""
    from ..checkpoint import load_model, resolve_checkpoint
    from ..compute import total_params
    from ..data.tokenizer import Tokenizer

    opts = opts or EvalOptions()
    items = load_task_items(tasks, opts)
    ckpt_dir = resolve_checkpoint(checkpoint)
    if "perplexity" in items[0] and not opts.perplexity.get("context_length"):
        seq_len = _seq_len_of(ckpt_dir)
        if seq_len is None:
            log.warning("perplexity.context_length: not set and the run config has no data.seq_len; "
                        "using %d", DEFAULT_CONTEXT)
        opts.perplexity = {**opts.perplexity, "context_length": seq_len or DEFAULT_CONTEXT}
    loaded = load_model(ckpt_dir, map_location="cpu")  # one loader: names a corrupt file
    ckpt_dir = loaded.path
    tokenizer = loaded.tokenizer
    if tokenizer_path:
        override = Tokenizer.load(tokenizer_path)
        if tokenizer is not None and override.sha256 != tokenizer.sha256:
            warnings.warn(f"tokenizer {tokenizer_path} differs from the one stored in {ckpt_dir}")
        tokenizer = override
    if tokenizer is None:
        raise ValueError(f"checkpoint {ckpt_dir} has no tokenizer.model: pass tokenizer=<path to .model>")
    check_vocab(loaded.config.vocab_size, tokenizer)
    # The run dir's files are read before the evaluation: a damaged one is an error (naming
    # file:line) that costs no evaluation work.
    run_dir = run_dir_of(ckpt_dir)
    step = loaded.meta.get("step")
    dataset = dataset or dataset_name_of(ckpt_dir)
    val_perplexity = read_val_perplexity(run_dir, step)

    t0 = time.time()
    task_results = evaluate_model(loaded.model, tokenizer, tasks, opts, device=device,
                                  batch_size=batch_size, pad_multiple=pad_multiple, dtype=dtype,
                                  progress=progress, items=items)
    n_params = total_params(loaded.model)
    results: Dict[str, Any] = {
        "checkpoint": ckpt_dir,
        "run_dir": run_dir,
        "step": step,
        "arch": getattr(loaded.config, "arch", None),
        "n_params": n_params,
        "dataset": dataset,
        "val_perplexity": val_perplexity,
        "tokenizer_sha256": tokenizer.sha256,
        "options": {"limit": opts.limit, "source": opts.source, "data_dir": str(opts.root), "length_normalize": opts.length_normalize,
                    "normalize_by_task": dict(opts.normalize_by_task),
                    "hellaswag_strip_brackets": opts.hellaswag_strip_brackets, "paths": dict(opts.paths),
                    "batch_size": batch_size, "pad_multiple": pad_multiple, "dtype": str(dtype),
                    "device": str(device), "perplexity": dict(opts.perplexity)},
        "tasks": task_results,
        "seconds": round(time.time() - t0, 3),
    }
    # Imported here, not at module level: moeut.eval imports this module, and an eager import of
    # .table would put moeut.eval.table in sys.modules before `python -m moeut.eval.table` runs it
    # (runpy's RuntimeWarning on every call).
    from .table import row_from_results, skipped_notes, write_tables

    row = row_from_results(results)
    results["table_row"] = row
    out_dir = out_dir or os.path.join(run_dir, EVAL_DIR)
    os.makedirs(out_dir, exist_ok=True)
    tag = f"step_{int(step):07d}" if isinstance(step, int) else "final"
    json_path = os.path.join(out_dir, f"results_{tag}.json")
    tmp = json_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=_json_default)
    os.replace(tmp, json_path)
    files = write_tables([row], os.path.join(out_dir, f"table_{tag}"), skipped_notes([results]))
    files["json"] = json_path
    results["files"] = files
    log.info("results written to %s", json_path)
    return results


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
