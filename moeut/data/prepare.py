"""Tokenise a corpus once into uint16 memmap shards plus a JSON manifest (SPEC 5.2-5.4).

    <cache_dir>/tokens/<corpus>-<split>-<corpus key>-<tokenizer sha[:12]>/
        shard_00000.bin ...   flat little-endian uint16 token ids (np.memmap-able)
        manifest.json         dtype, vocab size, tokenizer hash, config hash, source, and per shard:
                              tokens, sha256, source file and the document position it ends at

Documents are encoded one at a time with the separator appended (each starts with
SentencePiece's dummy prefix) and concatenated in corpus order; empty documents carry no text
and are skipped (SPEC 5.3), counted in the manifest. Only as many documents are read as the token
budget needs. Encoding runs in a process pool over chunks of documents; the main process reads
files and writes shards in order, so the result does not depend on the number of workers.

Resumable [ours]: a shard is written to a temporary name and renamed when complete, then the
manifest (rewritten atomically after every shard) lists it with its checksum and the position
(source file, documents read) where it ends. A killed run, restarted, keeps the verified shards
and continues from the last one's position; the result is byte-identical to an uninterrupted run
(shards end only at chunk or file boundaries, which do not depend on where a run started). A
larger budget later extends the cache the same way. `manifest["finished"]` marks a cache that
covers its budget (or the whole corpus); one process at a time works on a cache (a lock file).
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from .sources import Corpus, DataError, read_documents
from .tokenizer import DOC_SEPARATOR, Tokenizer

MANIFEST_VERSION = 2
TOKEN_DTYPE = np.uint16  # SPEC 5.4 [ours]: uint16 for V <= 65535
# A tokenizer-training piece plus the separator must fit SentencePiece's byte limit.
_CHUNK_CHARS = 1 << 21  # ~2 MB of text per pool task: large enough to amortise IPC
DEFAULT_SHARD_TOKENS = 1 << 26  # 128 MB shards: the unit of work lost to a kill
_PROGRESS_EVERY_S = 30.0


class TokenCacheError(DataError):
    """A token cache that is missing, incomplete, tampered with or built for other settings."""


# ------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------

_worker_sp = None


def _worker_init(model_proto: bytes) -> None:
    global _worker_sp
    import sentencepiece as spm
    _worker_sp = spm.SentencePieceProcessor(model_proto=model_proto)


def _encode_chunk(texts: List[str]) -> bytes:
    """Encode documents one at a time, each with the separator appended; return uint16 bytes."""
    ids = _worker_sp.encode([t + DOC_SEPARATOR for t in texts], out_type=int)
    flat = np.fromiter((i for doc in ids for i in doc), dtype=np.int64)
    return flat.astype(TOKEN_DTYPE).tobytes()


@dataclass
class _Chunk:
    fi: int  # source file index
    doc_end: int  # documents of file `fi` read after this chunk (empty ones included)
    eof: bool  # the last chunk of file `fi`
    texts: List[str]
    empty: int  # empty documents skipped inside this chunk


def _chunk_chars(shard_tokens: int) -> int:
    """Characters per pool task: ~2 MB, smaller for small shards so that shards (which end at
    chunk ends) stay near `shard_tokens` (about 4 characters per token at V = 8000)."""
    return max(1, min(_CHUNK_CHARS, 2 * int(shard_tokens)))


def _chunks(corpus: Corpus, chunk_chars: int, start_fi: int = 0, start_doc: int = 0) -> Iterator[_Chunk]:
    """Chunks of about `chunk_chars` characters of non-empty documents, from document `start_doc`
    of file `start_fi` on. Chunks never span files, and chunking restarts at every file start
    and at the resume point, so chunk boundaries do not depend on where a run started as long
    as it starts at a chunk boundary (shards end only there)."""
    for fi in range(start_fi, len(corpus.files)):
        skip = start_doc if fi == start_fi else 0
        docs = read_documents(corpus.files[fi], corpus.text_field)
        n = skip
        for _ in itertools.islice(docs, skip):  # reading is cheap next to encoding
            pass
        buf: List[str] = []
        size = empty = 0
        for text in docs:
            n += 1
            if not text:
                empty += 1
                continue
            buf.append(text)
            size += len(text)
            if size >= chunk_chars:
                yield _Chunk(fi, n, False, buf, empty)
                buf, size, empty = [], 0, 0
        if n < skip:
            raise TokenCacheError(f"{corpus.files[fi].describe()}: has {n} documents but the token cache "
                                  f"ends at document {skip} of it: the source changed; delete the cache")
        yield _Chunk(fi, n, True, buf, empty)


def _bounded_map(pool, chunks: Iterator[_Chunk], max_pending: int) -> Iterator[Tuple[_Chunk, bytes]]:
    """Ordered (chunk, encoded bytes) with at most `max_pending` chunks in flight:
    Pool.imap would read the whole corpus ahead of the token budget."""
    pending: deque = deque()
    for c in chunks:
        pending.append((c, pool.apply_async(_encode_chunk, (c.texts,)) if c.texts else None))
        if len(pending) >= max_pending:
            c0, r = pending.popleft()
            yield c0, (r.get() if r is not None else b"")
    while pending:
        c0, r = pending.popleft()
        yield c0, (r.get() if r is not None else b"")


# ------------------------------------------------------------------------------------------
# Manifest, verification, shards
# ------------------------------------------------------------------------------------------

@dataclass
class TokenManifest:
    """The `manifest.json` of a token cache directory (SPEC 5.4 [ours]): token dtype, vocabulary
    size, tokenizer hash, per-shard files/token counts/sha256, the source (corpus, revision) and
    whether the whole corpus or a budget was tokenised."""

    path: str  # directory
    dtype: str
    vocab_size: int
    tokenizer_sha256: str
    shards: List[Dict[str, object]]  # [{"file", "tokens", "sha256", "source_file", ...}]
    total_tokens: int
    complete: bool  # True when the whole corpus was tokenised (no budget cut)
    source: Dict[str, object]
    config_sha256: str = ""
    finished: bool = True

    @classmethod
    def load(cls, directory: str) -> "TokenManifest":
        """Read `<directory>/manifest.json`; FileNotFoundError if absent, KeyError for a missing field."""
        m = _read_manifest(directory)
        return cls(path=directory, dtype=m["dtype"], vocab_size=m["vocab_size"],
                   tokenizer_sha256=m["tokenizer_sha256"], shards=m["shards"],
                   total_tokens=m["total_tokens"], complete=m["complete"], source=m["source"],
                   config_sha256=m.get("config_sha256", ""), finished=m.get("finished", True))

    def shard_paths(self) -> List[str]:
        """Paths of the shard files (`path` joined with each shard's file name), in stream order."""
        return [os.path.join(self.path, s["file"]) for s in self.shards]


def _read_manifest(directory: str) -> dict:
    with open(os.path.join(directory, "manifest.json")) as f:
        return json.load(f)


def token_cache_dir(cache_dir: str, corpus: Corpus, tokenizer: Tokenizer) -> str:
    """`<cache_dir>/tokens/<corpus>-<split>-<corpus key>-<tokenizer sha256[:12]>`: one directory per
    (source files, split, tokenizer)."""
    return os.path.join(cache_dir, "tokens",
                        f"{corpus.name}-{corpus.split}-{corpus.key()}-{tokenizer.sha256[:12]}")


def cache_config_sha256(corpus: Corpus, tokenizer: Tokenizer) -> str:
    """Hash of everything that determines the token stream: source files and field, revision,
    tokenizer, separator, dtype, format version. (Shard sizes only place boundaries: a cache
    written with other shard sizes holds the same stream and stays valid.)"""
    cfg = {"version": MANIFEST_VERSION, "corpus": corpus.name, "split": corpus.split,
           "files": [f.describe() for f in corpus.files], "text_field": corpus.text_field,
           "revision": corpus.revision, "tokenizer_sha256": tokenizer.sha256, "separator": DOC_SEPARATOR,
           "dtype": np.dtype(TOKEN_DTYPE).name}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def verify_shards(directory: str, shards: List[Dict[str, object]], checksums: bool = True) -> List[str]:
    """Problems with the listed shards, in order (empty list = all good): a missing file, a size
    that is not `tokens` x 2 bytes, or (with `checksums`) a sha256 that differs from the manifest."""
    problems = []
    itemsize = np.dtype(TOKEN_DTYPE).itemsize
    for s in shards:
        p = os.path.join(directory, str(s["file"]))
        if not os.path.isfile(p):
            problems.append(f"{p}: missing")
        elif os.path.getsize(p) != int(s["tokens"]) * itemsize:
            problems.append(f"{p}: {os.path.getsize(p)} bytes, manifest says {s['tokens']} tokens")
        elif checksums and file_sha256(p) != s.get("sha256"):
            problems.append(f"{p}: sha256 differs from manifest.json (modified or corrupt)")
    return problems


def check_token_cache(corpus: Corpus, tokenizer: Tokenizer, cache_dir: str, max_tokens: Optional[int],
                      checksums: bool = True) -> List[str]:
    """Why the cache for (`corpus`, `tokenizer`) cannot serve `max_tokens` tokens (None = the
    whole corpus) as it is; an empty list means it can, unchanged. Reads, never writes."""
    out_dir = token_cache_dir(cache_dir, corpus, tokenizer)
    what = f"{corpus.name}/{corpus.split} in {out_dir}"
    try:
        m = _read_manifest(out_dir)
    except FileNotFoundError:
        return [f"{what}: not prepared (no manifest.json)"]
    except (OSError, ValueError) as e:
        return [f"{what}: unreadable manifest.json ({e})"]
    if m.get("version") != MANIFEST_VERSION or m.get("config_sha256") != cache_config_sha256(corpus, tokenizer):
        return [f"{what}: manifest.json was written for other settings (config hash differs)"]
    if m.get("tokenizer_sha256") != tokenizer.sha256:
        return [f"{what}: manifest.json names another tokenizer"]
    if not _covers(m, max_tokens):
        need = "the whole corpus" if max_tokens is None else f"{max_tokens:,} tokens"
        return [f"{what}: holds {m.get('total_tokens', 0):,} tokens, the run needs {need}"]
    return verify_shards(out_dir, m["shards"], checksums)


def _covers(m: dict, max_tokens: Optional[int]) -> bool:
    return bool(m.get("finished")) and (m["complete"] or (max_tokens is not None and m["total_tokens"] >= max_tokens))


@contextlib.contextmanager
def _locked(path: str, log):
    """An exclusive advisory lock: one process at a time prepares a cache directory."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"[data] waiting for another process preparing the same cache ({path})")
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:  # a filesystem without locks
            warnings.warn(f"{path}: cannot lock ({e}); do not prepare this cache from two processes at once")
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(f, fcntl.LOCK_UN)


def _atomic_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _Progress:
    """tqdm on a terminal, else a log line every _PROGRESS_EVERY_S seconds."""

    def __init__(self, enabled: bool, total: Optional[int], initial: int, desc: str, log):
        self.log, self.desc, self.total, self.n = log, desc, total, initial
        self.t0 = self.t_last = time.time()
        self.n0 = initial
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="tok", unit_scale=True, desc=desc)
        self.lines = enabled and self.bar is None

    def update(self, n: int, where: str) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines and time.time() - self.t_last >= _PROGRESS_EVERY_S:
            self.t_last = time.time()
            rate = (self.n - self.n0) / max(self.t_last - self.t0, 1e-9)
            of = f" / {self.total:,} ({100.0 * self.n / self.total:.1f} %)" if self.total else ""
            self.log(f"[data] {self.desc}: {self.n:,}{of} tokens, {rate / 1e6:.2f} M tok/s, {where}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def prepare_tokens(corpus: Corpus, tokenizer: Tokenizer, cache_dir: str, max_tokens: Optional[int] = None,
                   num_workers: int = 0, shard_tokens: int = DEFAULT_SHARD_TOKENS, progress: bool = True,
                   log=print, verify_checksums: Optional[bool] = None) -> TokenManifest:
    """Tokenise `corpus` into `cache_dir` until `max_tokens` (None = all), or reuse/extend the
    cache (see the module docstring). Shards end at source-file ends and at the first chunk end
    after `shard_tokens` tokens. A reused cache is checked against its manifest (config and
    tokenizer hash, each shard's size and, with `verify_checksums`, sha256; default: only on
    global rank 0, env RANK, so DDP ranks do not all hash the same files); a shard that fails is
    re-tokenised, with a warning, together with everything after it.

    Raises DataError when the corpus holds no text at all.
    """
    if tokenizer.vocab_size > np.iinfo(TOKEN_DTYPE).max + 1:
        raise ValueError(f"vocab size {tokenizer.vocab_size} does not fit {TOKEN_DTYPE.__name__}")
    if verify_checksums is None:
        verify_checksums = int(os.environ.get("RANK", "0")) == 0
    out_dir = token_cache_dir(cache_dir, corpus, tokenizer)
    if not check_token_cache(corpus, tokenizer, cache_dir, max_tokens, checksums=verify_checksums):
        total = _read_manifest(out_dir)["total_tokens"]  # ready: no lock needed to read it
        log(f"[data] reusing {total:,} tokens of {corpus.name}/{corpus.split} from {out_dir}"
            + (" (checksums verified)" if verify_checksums else ""))
        return TokenManifest.load(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with _locked(out_dir + ".lock", log):
        return _prepare_locked(corpus, tokenizer, out_dir, max_tokens, num_workers, shard_tokens, progress, log)


def _prepare_locked(corpus, tokenizer, out_dir, max_tokens, num_workers, shard_tokens, progress, log):
    name = f"{corpus.name}/{corpus.split}"
    config_sha = cache_config_sha256(corpus, tokenizer)
    shards: List[Dict[str, object]] = []
    try:
        old = _read_manifest(out_dir)
    except FileNotFoundError:
        old = None
    except (OSError, ValueError) as e:
        log(f"[data] WARNING: {out_dir}/manifest.json unreadable ({e}); re-tokenising")
        old = None
    if old is not None and (old.get("version") != MANIFEST_VERSION or old.get("config_sha256") != config_sha):
        log(f"[data] {out_dir}: written for other settings (config hash differs); re-tokenising")
        old = None
    if old is not None:
        if _covers(old, max_tokens):
            problems = verify_shards(out_dir, old["shards"])
            if not problems:
                log(f"[data] reusing {old['total_tokens']:,} tokens of {name} from {out_dir} (checksums verified)")
                return TokenManifest.load(out_dir)
        for s in old["shards"]:  # keep the verified prefix; a budget-cut last shard is provisional
            bad = verify_shards(out_dir, [s])
            if bad:
                log(f"[data] WARNING: {bad[0]}; re-tokenising from there")
                break
            if s.get("budget_cut"):
                break
            shards.append(s)
    listed = {str(s["file"]) for s in shards}
    for f in os.listdir(out_dir):  # leftovers of a killed run: unlisted shards, temporaries
        if (f.startswith("shard_") and f not in listed) or ".tmp" in f:
            os.remove(os.path.join(out_dir, f))

    total = sum(int(s["tokens"]) for s in shards)
    empty_docs = sum(int(s["empty_docs"]) for s in shards)
    if not shards:
        start_fi, start_doc = 0, 0
    elif shards[-1]["eof"]:
        start_fi, start_doc = int(shards[-1]["source_index"]) + 1, 0
    else:
        start_fi, start_doc = int(shards[-1]["source_index"]), int(shards[-1]["doc_end"])
    resumed_from = total

    def write_manifest(finished: bool, complete: bool) -> None:
        _atomic_json(os.path.join(out_dir, "manifest.json"), {
            "version": MANIFEST_VERSION, "config_sha256": config_sha, "dtype": np.dtype(TOKEN_DTYPE).name,
            "vocab_size": tokenizer.vocab_size, "tokenizer_sha256": tokenizer.sha256,
            "separator": DOC_SEPARATOR, "shard_tokens": shard_tokens, "shards": shards, "total_tokens": total,
            "empty_docs": empty_docs, "complete": complete, "finished": finished, "max_tokens": max_tokens,
            "source": {**corpus.description, "name": corpus.name, "split": corpus.split,
                       "revision": corpus.revision, "text_field": corpus.text_field}})

    if max_tokens is not None and total >= max_tokens:  # a killed run with a larger budget got this far
        write_manifest(True, False)
        log(f"[data] reusing {total:,} tokens of {name} from {out_dir} (checksums verified)")
        return TokenManifest.load(out_dir)
    if resumed_from:
        log(f"[data] resuming {name} in {out_dir}: {len(shards)} verified shard(s), {total:,} tokens")

    # --- tokenise the rest --------------------------------------------------------------------
    t0 = time.time()
    cur: Dict[str, object] = {}
    state = {"f": None, "h": None, "tmp": None}
    bar = _Progress(progress, max_tokens, total, f"tokenise {name}", log)

    def open_shard(fi: int) -> None:
        fname = f"shard_{len(shards):05d}.bin"
        state["tmp"] = os.path.join(out_dir, fname + f".tmp{os.getpid()}")
        state["f"], state["h"] = open(state["tmp"], "wb"), hashlib.sha256()
        cur.clear()
        cur.update(file=fname, tokens=0, source_file=corpus.files[fi].describe(), source_index=fi,
                   docs=0, empty_docs=0)

    def close_shard(doc_end: int, eof: bool, budget_cut: bool) -> None:
        nonlocal empty_docs
        f = state["f"]
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(state["tmp"], os.path.join(out_dir, str(cur["file"])))
        state["f"] = None
        shards.append({**cur, "sha256": state["h"].hexdigest(), "doc_end": doc_end, "eof": eof,
                       "budget_cut": budget_cut})
        empty_docs += int(cur["empty_docs"])
        write_manifest(False, False)
        _after_shard(out_dir, len(shards))

    pool = None
    complete = False
    try:
        chunks = _chunks(corpus, _chunk_chars(shard_tokens), start_fi, start_doc)
        head = list(itertools.islice(chunks, 2))
        chunks = itertools.chain(head, chunks)
        if num_workers > 0 and len(head) > 1:  # one chunk: starting a pool costs more than it saves
            # spawn, not fork: the parent may hold OpenMP/torch threads
            pool = mp.get_context("spawn").Pool(num_workers, initializer=_worker_init,
                                                initargs=(tokenizer.model_proto,))
            results = _bounded_map(pool, chunks, 2 * num_workers)
        else:
            _worker_init(tokenizer.model_proto)
            results = ((c, _encode_chunk(c.texts) if c.texts else b"") for c in chunks)
        for c, data in results:
            if state["f"] is None and not c.texts and c.eof and shards and shards[-1]["source_index"] == c.fi:
                # the file ended right after a shard: extend that shard's record, no empty shard
                shards[-1].update(doc_end=c.doc_end, eof=True, empty_docs=int(shards[-1]["empty_docs"]) + c.empty)
                empty_docs += c.empty
                write_manifest(False, False)
                continue
            if state["f"] is None:
                open_shard(c.fi)
            arr = np.frombuffer(data, dtype=TOKEN_DTYPE)
            budget_hit = max_tokens is not None and total + len(arr) >= max_tokens
            if budget_hit:
                arr = arr[: max_tokens - total]
            buf = arr.tobytes()
            state["f"].write(buf)
            state["h"].update(buf)
            cur["tokens"] += len(arr)
            cur["docs"] += len(c.texts)
            cur["empty_docs"] += c.empty
            total += len(arr)
            bar.update(len(arr), f"file {c.fi + 1}/{len(corpus.files)}")
            if budget_hit:
                close_shard(c.doc_end, c.eof, budget_cut=True)
                break
            if c.eof or cur["tokens"] >= shard_tokens:
                close_shard(c.doc_end, c.eof, budget_cut=False)
        else:
            complete = True
        bar.close()
    except BaseException:
        bar.close()
        if state["f"] is not None:  # the partial shard is not listed: a restart redoes it
            state["f"].close()
            with contextlib.suppress(OSError):
                os.remove(state["tmp"])
        raise
    finally:
        if pool is not None:
            pool.terminate()  # stop reading files the budget does not need
            pool.join()
    if total == 0:
        write_manifest(False, complete)
        raise DataError(f"no usable text in {corpus.description.get('path') or corpus.name} ({corpus.split}): "
                        f"all of its {empty_docs} document(s) were empty; check data.path and "
                        f"data.text_field={corpus.text_field!r}")
    write_manifest(True, complete)
    dt = time.time() - t0
    how = "the whole corpus" if complete else f"the token budget of {max_tokens:,}"
    log(f"[data] tokenised {total - resumed_from:,} tokens of {name} in {dt:.1f}s"
        + (f" (resumed at {resumed_from:,})" if resumed_from else "")
        + f": {total:,} tokens in {len(shards)} shard(s), {how}"
        + (f"; skipped {empty_docs} empty document(s)" if empty_docs else "") + f" -> {out_dir}")
    return TokenManifest.load(out_dir)


def _after_shard(out_dir: str, n_shards: int) -> None:
    """Called after each shard is committed (a seam for interruption tests; does nothing)."""
