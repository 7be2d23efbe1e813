"""Shared pieces of the zero-shot tasks: options, errors, line-numbered file readers."""
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


def default_data_dir() -> Path:
    """`$MOEUT_SHARED/data/eval`, where MOEUT_SHARED defaults to `shared` beside the repository
    checkout (…/repo/../shared/data/eval): the zero-shot sets are not carried in the repository."""
    shared = os.environ.get("MOEUT_SHARED") or Path(__file__).resolve().parents[3].parent / "shared"
    return Path(shared) / "data" / "eval"


@dataclass
class EvalOptions:
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
        return Path(self.data_dir) if self.data_dir else default_data_dir()

    def path_for(self, task: str, default: Path) -> Path:
        p = self.paths.get(task)
        return Path(p) if p else default

    def normalize(self, task: str, task_default: bool) -> bool:
        """Per-task override, else the global switch, else the SPEC default of the task."""
        if task in self.normalize_by_task:
            return bool(self.normalize_by_task[task])
        return task_default if self.length_normalize is None else bool(self.length_normalize)


def check_limit(limit: Optional[int]) -> Optional[int]:
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
        """Items from local files, or from the hub per `opts.source` (see EvalOptions)."""
        if opts.source not in ("local", "hf", "auto"):
            raise ValueError(f"source: must be 'local', 'hf' or 'auto', got {opts.source!r}")
        if opts.source == "hf":
            from .hub import load_from_hub
            return load_from_hub(self.name, opts)
        try:
            return self.load_local(opts)
        except TaskDataMissing as local_err:
            if opts.source != "auto":
                raise
            from .hub import hub_offline, load_from_hub
            if hub_offline():
                raise TaskDataMissing(f"{local_err} (and the hub is offline)") from None
            return load_from_hub(self.name, opts)

    def load_local(self, opts: EvalOptions) -> List[Any]:
        raise NotImplementedError

    def evaluate(self, items: List[Any], scorer, tokenizer, opts: EvalOptions) -> Dict[str, Any]:
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
    for c in candidates:
        if os.path.exists(c):
            return Path(c)
    return None
