"""Shared pieces of the zero-shot tasks (SPEC 6): options, errors, line-numbered file readers, and
the `Task` base class.

A leaf of `moeut.eval.tasks`: it imports no task module and not `hub`. Each task module defines
its own `Task` subclass (local files in `load_local`, hub records in `load_hub`); the package
`__init__` collects the instances into the `TASKS` registry.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from ... import paths


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
    checkout (…/repo/../shared/data/eval; an installed package has no checkout, so there it is
    `./shared/data/eval` under the working directory): where the full zero-shot sets are looked up
    first (moeut.paths)."""
    clone = paths.clone_root()
    shared = os.environ.get("MOEUT_SHARED") or (clone.parent / "shared" if clone is not None else Path("shared"))
    return Path(shared) / "data" / "eval"


def carried_data_dir() -> Path:
    """The small subsets of the task files the package carries (`data/eval`, data/eval/README.md),
    used for a task whose full set is absent when neither `data_dir` nor `paths.<task>` is set."""
    return paths.data_dir() / "eval"


# `EvalOptions`-independent labels of where a task's items came from (results JSON: tasks.<task>.data)
FULL = "full"            # the files under data_dir / paths.<task>, or the hub copy: every item there
CARRIED = "carried subset"  # carried_data_dir(): a few hundred items, not the paper's sets


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
        """The items of `load_items` (which says where they came from)."""
        return self.load_items(opts)[0]

    def load_items(self, opts: EvalOptions) -> Tuple[List[Any], Dict[str, str]]:
        """(items, origin) from local files, the hub or the carried subset (see EvalOptions).

        "local": `load_local`; "hf": `load_hub`; "auto": `load_local`, and `load_hub` when the local
        files are missing and the hub is online. When the local files are missing (and the hub is
        not used), `data_dir` is unset and `paths.<task>` is not given, the carried subset
        (`carried_data_dir()`) is read instead. origin = {"data": FULL or CARRIED (also for
        `data_dir` naming the carried folder itself), "data_from": the directory, file or hub id}. Raises ValueError for another source, TaskDataMissing
        (files absent everywhere, or the hub offline/unavailable: the first place's message),
        TaskFormatError (bad line)."""
        if opts.source not in ("local", "hf", "auto"):
            raise ValueError(f"source: must be 'local', 'hf' or 'auto', got {opts.source!r}")
        if opts.source == "hf":
            return self.load_hub(opts), {"data": FULL, "data_from": self.hub_id()}
        try:
            items = self.load_local(opts)
            where = Path(opts.paths.get(self.name) or opts.root)
            carried = where.resolve() == carried_data_dir().resolve() and self.name not in opts.paths
            return items, {"data": CARRIED if carried else FULL, "data_from": str(where)}
        except TaskDataMissing as local_err:
            if opts.source == "auto" and not hub_offline():
                return self.load_hub(opts), {"data": FULL, "data_from": self.hub_id()}
            if opts.data_dir or self.name in opts.paths:
                if opts.source == "auto":
                    raise TaskDataMissing(f"{local_err} (and the hub is offline)") from None
                raise
            carried = carried_data_dir()
            try:
                return (self.load_local(replace(opts, data_dir=str(carried))),
                        {"data": CARRIED, "data_from": str(carried)})
            except TaskDataMissing:  # nothing carried for this task (CBT): report the full set's place
                raise local_err from None

    def hub_id(self) -> str:
        """"hub:<task>": the task's hub copy (`hub.HF_SOURCES[<task>]`), for the results' `data_from`."""
        return f"hub:{self.name}"

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
    """(line number, line without its newline) of a UTF-8 text file, .bz2/.gz transparently.
    Raises TaskDataMissing (no such file) or TaskFormatError naming file:line for a line that is
    not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataMissing(f"file not found: {path}")
    if path.suffix == ".bz2":
        import bz2
        f = bz2.open(path, "rb")
    elif path.suffix == ".gz":
        import gzip
        f = gzip.open(path, "rb")
    else:
        f = open(path, "rb")
    with f:  # bytes, decoded line by line, so that a bad byte is named with its own line
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TaskFormatError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                                      f"column {e.start + 1}); save the file as UTF-8") from None
            yield lineno, line.rstrip("\n").rstrip("\r")


def first_existing(candidates: Sequence[Path]) -> Optional[Path]:
    """The first of `candidates` that exists (file or directory), else None."""
    for c in candidates:
        if os.path.exists(c):
            return Path(c)
    return None
