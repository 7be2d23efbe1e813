"""Corpus readers (SPEC 5.1): every source is an ordered list of files, each yielding documents.

A corpus is read file by file in a fixed order, so "the first N files" (tokenizer training, SPEC
5.2) and "only as many files as the token budget needs" (SPEC 5.4) are well defined. Sources:

- ``local``: one file or a directory (searched recursively, sorted) of .txt (one document per
  file), .jsonl / .jsonl.gz / .json.gz / .jsonl.zst (one JSON object per line, ``text_field``).
- ``c4``: C4 ``en`` either from a local mirror keeping the hub's layout
  (``<root>/en/c4-train.00000-of-01024.json.gz``) or streamed from ``allenai/c4`` at the pinned
  revision with ``datasets``.
- ``slimpajama``: ``train/chunk{1..10}/example_train_{i}.jsonl.zst`` (needs ``zstandard``), file
  list permuted with ``numpy.random.default_rng(123)`` as the paper did.
- ``pes2o``: ``data/v2/{split}-{i:05d}-of-{00020,00002}.json.gz``.
- ``thestack``: parquet files per language (``data/<lang>/*.parquet``, field ``content``; needs
  ``pyarrow``); 10 % of each language's files are held out for validation.

Nothing here touches the network when a local path is given. Hub access goes through
``datasets`` streaming only when ``path`` is None, with a clear error when offline.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import os
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

C4_REVISION = "1ddc917116b730e1859edef32896ec5c16be51d0"  # SPEC 5.1
C4_SHARDS = {"train": 1024, "validation": 8}
PES2O_SHARDS = {"train": 20, "validation": 2}
# Files per chunk, SPEC 5.1 (train chunk1..10, validation chunk1..5).
SLIMPAJAMA_FILES = {
    "train": [5912, 5911, 5919, 5917, 5933, 5915, 5906, 5921, 5920, 5912],
    "validation": [6279, 6278, 6286, 6284, 6301],
}
SLIMPAJAMA_PERMUTATION_SEED = 123
THESTACK_HOLDOUT = 0.1  # [verify] fraction of each language's files held out (SPEC 5.1)
TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".parquet")
SOURCES = ("local", "c4", "slimpajama", "pes2o", "thestack")
# Names that mark a validation file inside a local directory.
_VALID_MARKERS = ("valid", "validation", "val.", "test", "holdout")


class DataError(ValueError):
    """A data source that cannot be used (names the file or directory)."""


@dataclass(frozen=True)
class FileRef:
    """One file of a corpus: a local path, or a file inside a hub dataset repository."""

    path: str  # local path, or the path inside the hub repository
    hub_repo: Optional[str] = None  # e.g. "allenai/c4" when streamed
    revision: Optional[str] = None

    def describe(self) -> str:
        """The local path, or `hf://<repo>@<revision>/<path>` for a hub file (used in cache hashes and messages)."""
        return f"hf://{self.hub_repo}@{self.revision}/{self.path}" if self.hub_repo else self.path


@dataclass
class Corpus:
    """An ordered list of files plus how to read a document out of each."""

    name: str
    split: str
    files: List[FileRef]
    text_field: str = "text"
    revision: Optional[str] = None
    description: Dict[str, object] = field(default_factory=dict)

    def key(self) -> str:
        """Stable short id of (source, split, file list) for cache directories."""
        h = hashlib.sha256(json.dumps({"name": self.name, "split": self.split,
                                       "files": [f.describe() for f in self.files],
                                       "text_field": self.text_field}, sort_keys=True).encode())
        return h.hexdigest()[:16]

    def documents(self, max_files: Optional[int] = None) -> Iterator[str]:
        """Document texts of the first `max_files` files (all if None), in read order (SPEC 5.1);
        DataError naming the file for one that cannot be read."""
        for ref in self.files[:max_files]:
            yield from read_documents(ref, self.text_field)


# ------------------------------------------------------------------------------------------
# Reading one file
# ------------------------------------------------------------------------------------------

def _open_text(path: str) -> io.TextIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError as e:
            raise DataError(f"{path}: reading .zst files (SlimPajama) needs the 'zstandard' package "
                            f"(pip install zstandard)") from e
        raw = open(path, "rb")
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def _read_local(path: str, text_field: str) -> Iterator[str]:
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    if path.endswith(".txt"):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            text = raw.decode("utf-8", errors="replace")
            n_bad = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
            warnings.warn(f"{path}: not valid UTF-8 (first bad byte at offset {e.start}); {n_bad} invalid "
                          f"byte sequence(s) replaced by U+FFFD")
            yield text
        return
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError(f"{path}: reading parquet (The Stack) needs 'pyarrow'") from e
        table = pq.read_table(path, columns=[text_field])
        for row, v in enumerate(table.column(text_field).to_pylist()):
            yield _text_value(v, f"{path}: row {row}", text_field)
        return
    with _open_text(path) as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
                if not isinstance(rec, dict) or text_field not in rec:
                    raise DataError(f"{path}:{lineno}: record has no field {text_field!r} "
                                    f"(set data.text_field)")
                yield _text_value(rec[text_field], f"{path}:{lineno}", text_field)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 after line {lineno} ({e.reason})") from e
        except (EOFError, OSError, zlib.error) as e:  # truncated or corrupt .gz
            raise DataError(f"{path}: cannot be read after line {lineno} ({e})") from e


def _text_value(v, where: str, text_field: str) -> str:
    """A record's text: None reads as an empty document (callers count and skip those); any
    other non-string is an error, never silently dropped."""
    if v is None:
        return ""
    if not isinstance(v, str):
        raise DataError(f"{where}: field {text_field!r} is a {type(v).__name__}, not text (set data.text_field)")
    return v


def hub_unreachable(timeout: float = 10.0) -> Optional[str]:
    """Why the Hugging Face hub cannot be reached, or None when it may be: its host name
    (`HF_ENDPOINT`, default huggingface.co) does not resolve within `timeout` seconds. Skipped
    (None) behind a proxy (`HTTPS_PROXY`, `ALL_PROXY`), where the proxy resolves names. A fast
    check, so that an offline machine fails at once instead of after the hub client's retries."""
    import socket
    import threading
    from urllib.parse import urlparse
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    result: List[str] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, 443)
            result.append("")
        except OSError as e:
            result.append(f"{host}: {e.strerror or e}")
    t = threading.Thread(target=resolve, daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        return f"{host}: no answer to a name look-up in {timeout:g} s"
    return result[0] or None


def _hub_error(ref: FileRef, why: object) -> DataError:
    return DataError(f"{ref.describe()}: cannot stream from the Hugging Face hub, unreachable ({why}); "
                     f"point data.path at a local mirror (docs/training.md, \"Data\")")


def _read_hub(ref: FileRef, text_field: str) -> Iterator[str]:
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataError(f"{ref.describe()}: streaming from the hub is impossible offline "
                        f"(HF_DATASETS_OFFLINE=1); point data.path at a local mirror")
    try:
        import datasets
    except ImportError as e:
        raise DataError("streaming from the hub needs the 'datasets' package; "
                        "or point data.path at a local mirror") from e
    why = hub_unreachable()
    if why:
        raise _hub_error(ref, why)
    # One hub file at a time, in the same order as a local mirror (the builder follows the
    # file extension). Not exercised by the offline test suite.
    try:
        ds = datasets.load_dataset(ref.hub_repo, data_files=[ref.path], split="train", streaming=True,
                                   revision=ref.revision)
        records = iter(ds)
        first = next(records, None)
    except (ConnectionError, TimeoutError) as e:  # the hub went away after the look-up
        raise _hub_error(ref, e) from e
    if first is None:
        return
    for i, rec in enumerate(itertools.chain([first], records)):
        if text_field not in rec:
            raise DataError(f"{ref.describe()}: record {i} has no field {text_field!r} (set data.text_field)")
        yield _text_value(rec[text_field], f"{ref.describe()}: record {i}", text_field)


def read_documents(ref: FileRef, text_field: str = "text") -> Iterator[str]:
    """Documents of one file in file order (empty documents included; callers skip them)."""
    if ref.hub_repo is not None:
        yield from _read_hub(ref, text_field)
    else:
        yield from _read_local(ref.path, text_field)


# ------------------------------------------------------------------------------------------
# Building corpora
# ------------------------------------------------------------------------------------------

def _is_text_file(name: str) -> bool:
    return name.endswith(TEXT_SUFFIXES) and not name.startswith(".")


def list_local_files(path: str) -> List[str]:
    """All readable text files under `path` (a file or a directory, recursive), sorted."""
    if os.path.isfile(path):
        if not _is_text_file(path):
            raise DataError(f"{path}: unsupported file type (use one of {TEXT_SUFFIXES})")
        return [path]
    if not os.path.isdir(path):
        raise DataError(f"data path does not exist: {path}")
    found, ignored = [], []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        found.extend(os.path.join(root, f) for f in sorted(files) if _is_text_file(f))
        ignored.extend(os.path.join(root, f) for f in sorted(files) if not _is_text_file(f) and not f.startswith("."))
    if found and ignored:
        warnings.warn(f"data directory {path}: ignoring {len(ignored)} file(s) that are not "
                      f"{'/'.join(TEXT_SUFFIXES)} (e.g. {os.path.relpath(ignored[0], path)})")
    if not found:
        raise DataError(f"data directory {path} contains no usable text files "
                        f"(looked for {', '.join(TEXT_SUFFIXES)})")
    return found


def _is_valid_name(path: str) -> bool:
    return any(m in os.path.basename(path).lower() for m in _VALID_MARKERS)


def local_corpus(path: str, split: str, text_field: str = "text", valid_path: Optional[str] = None,
                 name: str = "local") -> Corpus:
    """A local file/directory. For a directory without `valid_path`, files whose names contain
    'valid'/'test'/'holdout' are the validation split; if there are none, the last file is."""
    path = os.path.abspath(os.path.expanduser(path))
    if split != "train" and valid_path:
        files = list_local_files(os.path.abspath(os.path.expanduser(valid_path)))
    else:
        files = list_local_files(path)
        if os.path.isdir(path) and not valid_path:
            valid = [f for f in files if _is_valid_name(f)]
            train = [f for f in files if not _is_valid_name(f)]
            if not valid:
                if len(files) < 2:
                    raise DataError(f"data directory {path} has a single file and no validation "
                                    f"file: set data.valid_path")
                train, valid = files[:-1], files[-1:]
                warnings.warn(f"data directory {path} has no file named *valid*/*test*/*holdout*: its last file "
                              f"{os.path.relpath(valid[0], path)} is held out for validation, not trained on "
                              f"(set data.valid_path to choose)")
            files = train if split == "train" else valid
            if not files:
                raise DataError(f"data directory {path} has no {split} files")
    return Corpus(name=name, split=split, files=[FileRef(f) for f in files], text_field=text_field,
                  description={"source": "local", "path": path, "valid_path": valid_path})


def _mirror_or_hub(root: Optional[str], rel_paths: Sequence[str], repo: str, revision: Optional[str],
                   what: str) -> List[FileRef]:
    if root is None:
        return [FileRef(p, hub_repo=repo, revision=revision) for p in rel_paths]
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DataError(f"data.path: {what} mirror directory does not exist: {root}")
    present = [FileRef(os.path.join(root, p)) for p in rel_paths if os.path.isfile(os.path.join(root, p))]
    if not present:
        raise DataError(f"data.path: {what} mirror {root} has none of the expected files "
                        f"(e.g. {rel_paths[0]})")
    if len(present) < len(rel_paths):  # a partial mirror is usable, but say what is missing
        missing = next(p for p in rel_paths if not os.path.isfile(os.path.join(root, p)))
        warnings.warn(f"data.path: {what} mirror {root} has {len(present)} of the {len(rel_paths)} expected "
                      f"files (first missing: {missing}); using those it has, in order")
    return present


def c4_corpus(root: Optional[str], split: str, revision: str = C4_REVISION) -> Corpus:
    """C4 `en`, files in index order. A partial mirror uses the files it has (in order)."""
    hub_split = "validation" if split != "train" else "train"
    n = C4_SHARDS[hub_split]
    rel = [f"en/c4-{hub_split}.{i:05d}-of-{n:05d}.json.gz" for i in range(n)]
    files = _mirror_or_hub(root, rel, "allenai/c4", revision, "C4")
    return Corpus("c4", hub_split, files, "text", revision,
                  {"source": "c4", "path": root, "revision": revision})


def slimpajama_corpus(root: Optional[str], split: str, revision: str = "main") -> Corpus:
    """SlimPajama-627B train or validation (holdout) files, permuted once with seed 123 (SPEC 5.1):
    from a local mirror `root` (a partial one warns and uses what it has) or streamed from the hub
    when `root` is None. DataError naming data.path for a missing or empty mirror."""
    hub_split = "validation" if split != "train" else "train"
    stem = "example_train" if hub_split == "train" else "example_holdout"
    rel = [f"{hub_split}/chunk{c + 1}/{stem}_{i}.jsonl.zst"
           for c, n in enumerate(SLIMPAJAMA_FILES[hub_split]) for i in range(n)]
    # The paper permutes the full file list once (SPEC 5.1); a partial mirror keeps that order.
    order = np.random.default_rng(SLIMPAJAMA_PERMUTATION_SEED).permutation(len(rel))
    rel = [rel[i] for i in order]
    files = _mirror_or_hub(root, rel, "cerebras/SlimPajama-627B", revision, "SlimPajama")
    return Corpus("slimpajama", hub_split, files, "text", revision,
                  {"source": "slimpajama", "path": root, "revision": revision})


def pes2o_corpus(root: Optional[str], split: str, revision: str = "main") -> Corpus:
    """peS2o v2 train or validation shards in index order (SPEC 5.1), from a local mirror `root` or
    the hub (None). DataError naming data.path for a missing or empty mirror."""
    hub_split = "validation" if split != "train" else "train"
    n = PES2O_SHARDS[hub_split]
    rel = [f"data/v2/{hub_split}-{i:05d}-of-{n:05d}.json.gz" for i in range(n)]
    files = _mirror_or_hub(root, rel, "allenai/peS2o", revision, "peS2o")
    return Corpus("pes2o", hub_split, files, "text", revision,
                  {"source": "pes2o", "path": root, "revision": revision})


def thestack_corpus(root: Optional[str], split: str, languages: Sequence[str],
                    revision: str = "main") -> Corpus:
    """Local mirror of bigcode/the-stack: `<root>/data/<lang>/*.parquet`. Streaming needs an HF
    token and a file listing, so only local mirrors are supported [ours]."""
    if root is None:
        raise DataError("data.path: The Stack needs a local mirror (data/<language>/*.parquet)")
    if not languages:
        raise DataError("data.languages: The Stack needs at least one language")
    files: List[FileRef] = []
    for lang in languages:
        d = os.path.join(os.path.abspath(root), "data", lang)
        if not os.path.isdir(d):
            raise DataError(f"data.languages: no directory {d} for language {lang!r}")
        lf = sorted(f for f in os.listdir(d) if f.endswith(".parquet"))
        if not lf:
            raise DataError(f"{d}: no .parquet files")
        n_hold = max(1, int(round(len(lf) * THESTACK_HOLDOUT))) if len(lf) > 1 else 0
        chosen = lf[len(lf) - n_hold:] if split != "train" else lf[:len(lf) - n_hold]
        files.extend(FileRef(os.path.join(d, f)) for f in chosen)
    if not files:
        raise DataError(f"The Stack mirror {root}: no {split} files for {list(languages)}")
    return Corpus("thestack", split, files, "content", revision,
                  {"source": "thestack", "path": root, "languages": list(languages)})


def open_corpus(source: str, path: Optional[str], split: str, *, text_field: str = "text",
                valid_path: Optional[str] = None, revision: Optional[str] = None,
                languages: Sequence[str] = ()) -> Corpus:
    """Dispatch on `data.source`. `split` is "train" or "validation"."""
    if source == "local":
        if not path:
            raise DataError("data.path: required for data.source=local")
        return local_corpus(path, split, text_field, valid_path)
    if source == "c4":
        return c4_corpus(path, split, revision or C4_REVISION)
    if source == "slimpajama":
        return slimpajama_corpus(path, split, revision or "main")
    if source == "pes2o":
        return pes2o_corpus(path, split, revision or "main")
    if source == "thestack":
        return thestack_corpus(path, split, languages, revision or "main")
    raise DataError(f"data.source: unknown source {source!r}; known: {SOURCES}")
