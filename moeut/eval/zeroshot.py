"""Zero-shot evaluation of a model or a checkpoint on the paper's tasks (SPEC 6), no Hydra here.

`evaluate_model` scores an in-memory model; `evaluate_checkpoint` loads a run dir / checkpoint dir,
evaluates, and writes a new results file per evaluation, `<run dir>/eval/results_step_XXXXXXX.json`
(later ones `results_step_XXXXXXX.<k>.json`, never overwritten: moeut.rundir's rule) plus the
paper-layout table of every evaluation of that checkpoint merged per task
(`table_step_XXXXXXX.{md,csv,tex}`). `moeut.evaluate` is the Hydra command line around it.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Sequence

import torch

from ..results_files import EVAL_RESULTS_RE, is_moeut_eval, merge_evals, write_eval_results
from ..rundir import EVAL_DIR, RunDir, read_json, run_dir_of
from .scoring import Scorer
from .tasks import TaskDataMissing, resolve_tasks
from .tasks.base import CARRIED, FULL, EvalOptions
from .tasks.perplexity import DEFAULT_CONTEXT

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("lambada", "blimp", "cbt", "hellaswag", "piqa", "arc_easy", "arc_challenge")


class NoTaskData(FileNotFoundError):
    """Every requested task was skipped for missing data: nothing was evaluated. `skipped` maps
    each task to its reason."""

    def __init__(self, message: str, skipped: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.skipped = dict(skipped or {})


class TaskItems(NamedTuple):
    """What `load_task_items` found: items per task, the reason per skipped task, and where each
    loaded task's items came from ({"data": "full" | "carried subset", "data_from": dir/file/hub})."""

    loaded: Dict[str, Any]
    skipped: Dict[str, str]
    origins: Dict[str, Dict[str, str]]


def load_task_items(tasks: Sequence[str], opts: EvalOptions, skip_missing: bool = True) -> TaskItems:
    """Items of every task in the order asked (`TaskItems`; `Task.load_items`: the full set, else
    the carried subset).

    A task whose data is missing is skipped with ONE warning naming the task and the file or
    option. Raises NoTaskData, listing every task's reason on one line (and no per-task warning),
    when no task found its data: a run that would evaluate nothing must not look like a success."""
    loaded: Dict[str, Any] = {}
    skipped: Dict[str, str] = {}
    origins: Dict[str, Dict[str, str]] = {}
    for task in resolve_tasks(tasks):  # unknown names fail here, before any model work
        try:
            items, origin = task.load_items(opts)
            if not items:  # e.g. empty files: evaluating nothing is not a result
                raise TaskDataMissing(f"its data holds no items (empty file?) in {origin['data_from']}")
            loaded[task.name] = items
            origins[task.name] = origin
        except TaskDataMissing as e:
            if not skip_missing:
                raise
            skipped[task.name] = str(e)
    if not loaded:
        raise NoTaskData("nothing was evaluated, no task found its data: "
                         + "; ".join(f"{k}: {v}" for k, v in skipped.items()), skipped)
    for name, reason in skipped.items():
        warnings.warn(f"{name}: skipped, data missing: {reason}")
    return TaskItems(loaded, skipped, origins)


def evaluate_model(model: torch.nn.Module, tokenizer, tasks: Sequence[str] = DEFAULT_TASKS,
                   opts: Optional[EvalOptions] = None, *, device: Optional[str] = None,
                   batch_size: int = 16, pad_multiple: int = 1, dtype: Optional[str] = "auto",
                   progress: bool = True, skip_missing: bool = True,
                   items: Optional[TaskItems] = None) -> Dict[str, Dict[str, Any]]:
    """{task name: metrics}; a task whose data is missing gets {"skipped": reason}. Each task's
    metrics record what was scored: `n_items`, `limit` (the option) and `data` / `data_from`
    (full set or carried subset, and where). `items`: the output of load_task_items, when the
    caller loaded them already. Raises NoTaskData when every task's data is missing."""
    opts = opts or EvalOptions()
    loaded, skipped, origins = items if items is not None else load_task_items(tasks, opts, skip_missing)
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
        metrics.setdefault("n_items", len(loaded[task.name]))
        metrics["limit"] = opts.limit
        metrics.update(origins.get(task.name, {}))
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
    """The validation perplexity from run_dir/metrics.jsonl, its key by moeut.rundir's one rule
    (`val_ppl_key`: the training corpus's own held-out set, else another validation set); read
    by moeut.rundir (a cut last line is skipped with a warning, any other damaged line raises
    CorruptRunFile naming file:line); None when the file or the key is absent. With `step` (an
    evaluated checkpoint's step): the value logged at that step, and None when that step had no
    validation (another step's number would be mislabelled as this checkpoint's); without
    `step`: the last one logged."""
    _, curve = RunDir(run_dir).val_ppl_curve()
    vals = [v for s, v in curve if step is None or s == step]
    return vals[-1] if vals else None


def run_config_of(checkpoint_dir: str) -> Optional[Dict[str, Any]]:
    """The training config written by train.py (`RunDir.config`): <checkpoint>/config.yaml
    (resolved), else the run dir's .hydra/config.yaml; None when the path or both files are
    absent. Raises CorruptRunFile (file:line) for a file that does not parse."""
    if not os.path.exists(checkpoint_dir):
        return None
    return RunDir(checkpoint_dir).config(checkpoint_dir)


def dataset_name_of(checkpoint_dir: str) -> Optional[str]:
    """The training corpus of a checkpoint (moeut.rundir: `RunDir.dataset`, from the `data`
    section train.py saves: "C4", "SlimPajama", ..., or the folder of local files); None when the
    run config is absent."""
    if not os.path.exists(checkpoint_dir):
        return None
    return RunDir(checkpoint_dir).dataset(checkpoint_dir)


def _seq_len_of(checkpoint_dir: str) -> Optional[int]:
    return RunDir(checkpoint_dir).seq_len(checkpoint_dir) if os.path.exists(checkpoint_dir) else None


def evaluate_checkpoint(checkpoint: str, tasks: Sequence[str] = DEFAULT_TASKS,
                        opts: Optional[EvalOptions] = None, *, tokenizer_path: Optional[str] = None,
                        out_dir: Optional[str] = None, device: Optional[str] = None, batch_size: int = 16,
                        pad_multiple: int = 1, dtype: Optional[str] = "auto", progress: bool = True,
                        dataset: Optional[str] = None) -> Dict[str, Any]:
    """Load, evaluate, write a new results JSON (never replacing one) and the checkpoint's tables
    (all its evaluations in the output dir, merged per task: moeut.rundir's rule); returns the
    results dict, plus "files" (the paths written), "merged" (the merged results the table shows)
    and "data_line" (`data_line`).
    Task data are loaded before the model: NoTaskData when no task has any (nothing written); an
    output dir (`out_dir`, default <run dir>/eval) that a file blocks is a ValueError naming out_dir
    before the evaluation."""
    from ..checkpoint import load_model, resolve_checkpoint
    from ..compute import total_params
    from ..data.tokenizer import Tokenizer

    opts = opts or EvalOptions()
    items = load_task_items(tasks, opts)
    ckpt_dir = resolve_checkpoint(checkpoint)
    if "perplexity" in items.loaded and not opts.perplexity.get("context_length"):
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
    from ..cli import check_out_dir
    check_out_dir(out_dir or os.path.join(run_dir, EVAL_DIR), "out_dir")  # the default <run dir>/eval too
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
    # Imported here, not at module level: evaluation needs the table only when it writes one.
    from ..analysis.table import row_from_results, table_notes, write_tables

    row = row_from_results(results)
    results["table_row"] = row  # this evaluation's own row
    out_dir = out_dir or os.path.join(run_dir, EVAL_DIR)
    tag = f"step_{int(step):07d}" if isinstance(step, int) else "final"
    json_path = write_eval_results(out_dir, tag, results, default=_json_default)  # a new file, always
    # The table of this checkpoint: every evaluation of it in out_dir, merged per task (moeut.rundir);
    # an out_dir shared by several runs holds other checkpoints' files of the same step: not merged.
    same = []
    for p in sorted(Path(out_dir).glob(f"results_{tag}*.json")):
        m = EVAL_RESULTS_RE.match(p.name)
        if m and m.group("tag") == tag:
            d = read_json(p)
            if is_moeut_eval(d) and d.get("checkpoint") == str(ckpt_dir):
                same.append((p, d))
    merged = merge_evals(same)
    files = write_tables([row_from_results(merged)], os.path.join(out_dir, f"table_{tag}"),
                         table_notes([merged]))
    files["json"] = str(json_path)
    results["files"] = files
    results["merged"] = merged  # what the table shows: every evaluation of this checkpoint, per task
    results["data_line"] = data_line(task_results)
    log.info("results written to %s", json_path)
    return results


def data_line(task_results: Dict[str, Dict[str, Any]]) -> str:
    """One line saying which task files were scored: "task data: <task> <full set | CARRIED
    SUBSET> (<n> items[, limit=L]), ..." plus, when any task used the carried subsets, that
    their scores are not the paper's numbers."""
    parts, carried = [], False
    for name, t in task_results.items():
        if "skipped" in t:
            continue
        kind = t.get("data", FULL)
        carried |= kind == CARRIED
        limit = f", limit={t['limit']}" if t.get("limit") is not None else ""
        parts.append(f"{name} {'CARRIED SUBSET' if kind == CARRIED else 'full set'} ({t.get('n_items')} items{limit})")
    note = ("; carried subsets (data/eval) are a few hundred items per task: not the paper's numbers"
            if carried else "")
    return "task data: " + ", ".join(parts) + note


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
