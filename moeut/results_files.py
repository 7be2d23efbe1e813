"""The results files of `python -m moeut.evaluate` in a run's eval/ folder (docs/architecture.md,
"Evaluation results"): the two formats a results file may have (ours, lm-eval's), the evaluation
number of a file, writing a NEW file for every evaluation (never replacing one), and the rule that
merges several evaluations of one checkpoint per task. `moeut.rundir` reads run dirs through these."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]

# results_<tag>.json (evaluation 1) / results_<tag>.<k>.json (evaluation k >= 2) of a checkpoint
EVAL_RESULTS_RE = re.compile(r"^results_(?P<tag>.+?)(?:\.(?P<k>\d+))?\.json$")


def is_moeut_eval(data: Any) -> bool:
    """A results file written by `python -m moeut.evaluate` (moeut/eval/zeroshot.py)."""
    return isinstance(data, dict) and isinstance(data.get("tasks"), dict) and "table_row" in data


def is_lm_eval(data: Any) -> bool:
    """An lm-evaluation-harness results file: {"results": {task: {"acc,none": v, ...}}, ...}."""
    return (isinstance(data, dict) and isinstance(data.get("results"), dict)
            and all(isinstance(v, dict) for v in data["results"].values()))


def eval_index(path: PathLike) -> int:
    """The evaluation number k of a results file: 1 for results_<tag>.json, k for
    results_<tag>.<k>.json (0 for a name of another form)."""
    m = EVAL_RESULTS_RE.match(Path(path).name)
    return (int(m.group("k")) if m.group("k") else 1) if m else 0


def write_eval_results(eval_dir: PathLike, tag: str, results: Dict[str, Any], default=None) -> Path:
    """Write `results` (JSON, `default` as json.dump's) as a NEW file in `eval_dir`:
    results_<tag>.json, or results_<tag>.<k>.json with the smallest free k >= 2 when earlier
    evaluations of the same tag exist. Never replaces a file (created by a hard link from a
    finished temporary file, so a reader never sees half a file). Returns its path."""
    eval_dir = Path(eval_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    tmp = eval_dir / f".results_{tag}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=default)
    try:
        k = 1
        while True:
            path = eval_dir / (f"results_{tag}.json" if k == 1 else f"results_{tag}.{k}.json")
            try:
                os.link(tmp, path)  # fails if the name exists: no evaluation is ever replaced
                return path
            except FileExistsError:
                k += 1
            except OSError:  # a file system without hard links: exclusive create, then the bytes
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    k += 1
                    continue
                with os.fdopen(fd, "wb") as out:
                    out.write(tmp.read_bytes())
                return path
    finally:
        tmp.unlink()


def merge_evals(files: List[Tuple[Path, Dict[str, Any]]]) -> Dict[str, Any]:
    """One results dict from several `moeut.evaluate` results files of ONE checkpoint, by the
    module's rule: the newest file's fields (checkpoint, step, n_params, val_perplexity, options,
    ...), and per task the result of the newest evaluation (largest `eval_index`, then newest
    mtime) that scored it, else the newest skip. Each task gets `results_file` (the file's name)
    and, for a file written before they were recorded, `limit` (its options.limit); the dict gets
    `evaluations` (the file names, oldest first). ValueError for an empty list."""
    if not files:
        raise ValueError("merge_evals: no results files")
    files = sorted(files, key=lambda f: (eval_index(f[0]), f[0].stat().st_mtime if f[0].exists() else 0))
    merged = {k: v for k, v in files[-1][1].items() if k not in ("tasks", "table_row", "files")}
    tasks: Dict[str, Any] = {}
    for p, data in files:
        for name, t in (data.get("tasks") or {}).items():
            if not isinstance(t, dict) or ("skipped" in t and name in tasks and "skipped" not in tasks[name]):
                continue
            t = {**t, "results_file": Path(p).name}
            if "skipped" not in t:
                t.setdefault("limit", (data.get("options") or {}).get("limit"))
            tasks[name] = t
    merged["tasks"] = tasks
    merged["evaluations"] = [Path(p).name for p, _ in files]
    return merged
