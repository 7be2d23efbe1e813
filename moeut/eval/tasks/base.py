"""Shared pieces of the zero-shot tasks (SPEC 6): options, errors, line-numbered file readers, and
the `Task` base class.

A leaf of `moeut.eval.tasks`: it imports no task module and not `hub`. Each task module defines
its own `Task` subclass (local files in `load_local`, hub records in `load_hub`); the package
`__init__` collects the instances into the `TASKS` registry.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple


class TaskFormatError(ValueError):
    """A task file has a malformed line; the message names the file and the 1-based line."""


class TaskDataMissing(FileNotFoundError):
    """The task's data files are not present: the task is skipped with this message."""


def hub_offline() -> bool:
    """True when HF_DATASETS_OFFLINE or HF_HUB_OFFLINE is 1/true/yes: no hub download is tried."""
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes")
               for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def default_data_dir() -> Path:
    """`$MOEUT_SHARED/data/eval`, where MOEUT_SHARED defaults to `shared` beside the repository
    checkout (…/repo/../shared/data/eval): the zero-shot sets are not carried in the repository."""
    shared = os.environ.get("MOEUT_SHARED") or Path(__file__).resolve().parents[3].parent / "shared"
    return Path(shared) / "data" / "eval"


@dataclass
class EvalOptions:
    """Options of one zero-shot evaluation (SPEC 6.1/6.2), shared by every task.

    Fields: data_dir (root of the task files, "" = `default_data_dir()`), limit (items per task,
    per paradigm for BLiMP, per type for CBT; None = all), length_normalize / normalize_by_task
    (SPEC 6.1 length normalisation: global switch and per-task override; None = each task's SPEC 6.2
    default), hellaswag_strip_brackets (SPEC 6.2 quirk), paths (per-task file/dir overrides),
    keep_items (store per-item scores), source ("local" | "hf" | "auto") and perplexity (options of
    the `perplexity` task). Values are checked where they are used (`check_limit`, `Task.load`).
    """
    data_dir: str = ""  # "" = default_data_dir()
    limit: Optional[int] = None  # items per task; per paradigm (BLiMP) / per type (CBT)
    # None = SPEC 6.2 default per task (CBT, HellaSwag, PIQA, ARC normalised; BLiMP not)
    length_normalize: Optional[bool] = None
    normalize_by_task: Dict[str, bool] = field(default_factory=dict)  # e.g. {"cbt": False}
    hellaswag_strip_brackets: bool = False  # False = official regex quirk (parity), True = lm-eval
    paths: Dict[str, str] = field(default_factory=dict)  # per-task file/dir overrides
    keep_items: bool = False  # store per-item scores in the results
    # "local": files under data_dir only (default; what the tests use). "hf": download from the
    # Hugging Face hub (moeut.eval.tasks.hub). "auto": local files, else the hub when online.
    source: str = "local"
    # task `perplexity` (tasks/perplexity.py): path | hub, hub_config, split, field,
    # context_length (None = the run's data.seq_len, else 1024), stride (None = context_length - 1)
    perplexity: Dict[str, Any] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        """Directory of the task files: `data_dir`, or `default_data_dir()` when it is empty."""
        return Path(self.data_dir) if self.data_dir else default_data_dir()

    def path_for(self, task: str, default: Path) -> Path:
        """The `paths[task]` override when given, else `default`."""
        p = self.paths.get(task)
        return Path(p) if p else default

    def normalize(self, task: str, task_default: bool) -> bool:
        """Per-task override, else the global switch, else the SPEC default of the task."""
        if task in self.normalize_by_task:
            return bool(self.normalize_by_task[task])
        return task_default if self.length_normalize is None else bool(self.length_normalize)


def check_limit(limit: Optional[int]) -> Optional[int]:
    """`limit` unchanged if None or a positive int; ValueError naming `limit` otherwise."""
    if limit is None:
        return None
    if not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit: must be a positive integer or null, got {limit!r}")
    return limit


def read_jsonl(path: Path, required: Sequence[str], limit: Optional[int] = None) -> List[Tuple[int, Dict[str, Any]]]:
    """(line number, record) pairs of a .jsonl file (.gz/.bz2 transparently); blank lines are
    skipped; a line that is not a JSON object or lacks a required field raises TaskFormatError
    naming file and line; a missing file raises TaskDataMissing."""
    path = Path(path)
    out = []
    for lineno, line in iter_text_lines(path):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskFormatError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise TaskFormatError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in required if k not in rec]
        if missing:
            raise TaskFormatError(f"{path}:{lineno}: missing field(s) {missing}")
        out.append((lineno, rec))
        if limit is not None and len(out) >= limit:
            break
    return out


def expect_str(rec: Dict[str, Any], key: str, path: Path, lineno: int) -> str:
    """`rec[key]`, which must be a str; TaskFormatError naming `path:lineno` and the field otherwise."""
    v = rec[key]
    if not isinstance(v, str):
        raise TaskFormatError(f"{path}:{lineno}: field {key!r} must be a string, got {type(v).__name__}")
    return v


class Task:
    """A zero-shot task. `load` reads items (raises TaskDataMissing / TaskFormatError);
    `evaluate` scores them and returns a JSON-able metrics dict whose `accuracy` entry is the
    table number (a fraction in [0, 1])."""

    name: str = ""
    column: Optional[str] = None  # results-table column, None = not in the paper's table

    def load(self, opts: EvalOptions) -> List[Any]:
        """Items from local files, or from the hub per `opts.source` (see EvalOptions).

        "local": `load_local`; "hf": `load_hub`; "auto": `load_local`, and `load_hub` when the local
        files are missing and the hub is online. Raises ValueError for another source,
        TaskDataMissing (files absent, or the hub offline/unavailable), TaskFormatError (bad line)."""
        if opts.source not in ("local", "hf", "auto"):
            raise ValueError(f"source: must be 'local', 'hf' or 'auto', got {opts.source!r}")
        if opts.source == "hf":
            return self.load_hub(opts)
        try:
            return self.load_local(opts)
        except TaskDataMissing as local_err:
            if opts.source != "auto":
                raise
            if hub_offline():
                raise TaskDataMissing(f"{local_err} (and the hub is offline)") from None
            return self.load_hub(opts)

    def load_local(self, opts: EvalOptions) -> List[Any]:
        """Items from the task's files under `opts.root` (or `opts.paths[name]`); each subclass
        implements it. Raises TaskDataMissing / TaskFormatError naming the file (and line)."""
        raise NotImplementedError

    def load_hub(self, opts: EvalOptions) -> List[Any]:
        """Items from the Hugging Face hub copy of the task (`moeut.eval.tasks.hub`), the same items
        `load_local` gives. Subclasses with a hub source override it; here: ValueError."""
        raise ValueError(f"no hub source for task {self.name!r}")

    def evaluate(self, items: List[Any], scorer, tokenizer, opts: EvalOptions) -> Dict[str, Any]:
        """Score `items` with `scorer` (a `moeut.eval.scoring.Scorer`; `tokenizer` encodes/decodes
        text) and return the JSON-able metrics dict with its `accuracy` entry (SPEC 6.2's table
        metric, a fraction in [0, 1]). Each subclass implements it."""
        raise NotImplementedError


def iter_text_lines(path: Path) -> Iterator[Tuple[int, str]]:
    """(line number, line without its newline) of a text file, .bz2/.gz transparently."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataMissing(f"file not found: {path}")
    if path.suffix == ".bz2":
        import bz2
        f = bz2.open(path, "rt", encoding="utf-8")
    elif path.suffix == ".gz":
        import gzip
        f = gzip.open(path, "rt", encoding="utf-8")
    else:
        f = open(path, encoding="utf-8")
    with f:
        for lineno, line in enumerate(f, 1):
            yield lineno, line.rstrip("\n").rstrip("\r")


def first_existing(candidates: Sequence[Path]) -> Optional[Path]:
    """The first of `candidates` that exists (file or directory), else None."""
    for c in candidates:
        if os.path.exists(c):
            return Path(c)
    return None
