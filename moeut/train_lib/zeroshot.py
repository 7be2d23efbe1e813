"""Zero-shot evaluation during training (train.zeroshot; docs/training.md, SPEC 6).

At every train.zeroshot.interval-th step the loop saves that step's checkpoint (if the save
cadence did not already) and rank 0 runs `moeut.evaluate` on it with its default options,
train.zeroshot.tasks and train.zeroshot.limit: the results file (<run dir>/eval/results_step_N.json
and its table) is the one the command writes, the scores are the command's. Each task's numeric
metrics are logged as zeroshot/<task>/<metric>. The evaluation runs with the process's random
number generators saved and restored, so training continues exactly as without it.
"""
from __future__ import annotations

import random
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

# Per-task fields that describe the evaluation, not its score: not logged as metrics.
NOT_SCORES = ("seconds", "n_items", "limit")


def eval_config(checkpoint: str, tasks: List[str], limit: Optional[int], device: Optional[str] = None):
    """`python -m moeut.evaluate`'s options (moeut.evaluate.EvaluateOptions, its defaults) with
    `checkpoint`, `tasks`, `limit` and, when given, `device` set; progress bars off. Returns the
    EvaluateOptions for moeut.evaluate.run."""
    from moeut.evaluate import EvaluateOptions

    opts = EvaluateOptions(checkpoint=checkpoint, tasks=list(tasks), limit=limit, progress=False)
    if device is not None:
        opts.device = device
    return opts


def score_metrics(task_results: Dict[str, Dict[str, Any]]) -> Dict[str, float]:
    """{zeroshot/<task>/<metric>: value} for every numeric (non-bool) top-level field of each
    scored task, except NOT_SCORES; skipped tasks give nothing."""
    out: Dict[str, float] = {}
    for task, m in task_results.items():
        if "skipped" in m:
            continue
        for k, v in m.items():
            if k not in NOT_SCORES and isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"zeroshot/{task}/{k}"] = v
    return out


def evaluate_saved_checkpoint(checkpoint: str, tasks: List[str], limit: Optional[int],
                              device: Optional[str] = None) -> Tuple[Dict[str, Any], Dict[str, float]]:
    """Run moeut.evaluate on `checkpoint` (a checkpoints/step_XXXXXXX dir) and return (its result
    dict, `score_metrics` of it). Python, NumPy and torch (CPU and CUDA) random states are restored
    afterwards. Raises what moeut.evaluate.run raises (ValueError, FileNotFoundError)."""
    from moeut.evaluate import run

    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            res = run(eval_config(checkpoint, tasks, limit, device))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return res, score_metrics(res["tasks"])


def logged_zeroshot_steps(metrics: List[Dict[str, Any]]) -> set:
    """Steps of metrics.jsonl records holding a zeroshot/ metric."""
    return {r.get("step") for r in metrics if any(k.startswith("zeroshot/") for k in r)}
