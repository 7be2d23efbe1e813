"""Tokenise a corpus once into uint16 memmap shards plus a JSON manifest (SPEC 5.2-5.4).

    <cache_dir>/tokens/<corpus>-<split>-<corpus key>-<tokenizer sha[:12]>/
        shard_00000.bin ...   flat little-endian uint16 token ids (np.memmap-able)
        manifest.json         dtype, vocab size, tokenizer hash, source, per-shard counts;
                              written last, so a directory with a manifest is complete

Documents are encoded one at a time with the separator appended (each starts with
SentencePiece's dummy prefix) and concatenated in corpus order; empty documents are skipped
(SPEC 5.3). Only as many source files are read as the token budget needs. Encoding runs in a
process pool; the main process reads files and writes shards in order, so the result does not
depend on the number of workers.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import numpy as np

from .sources import Corpus, DataError
from .tokenizer import DOC_SEPARATOR, Tokenizer, train_tokenizer

MANIFEST_VERSION = 1
TOKEN_DTYPE = np.uint16  # SPEC 5.4 [ours]: uint16 for V <= 65535
_MAX_SENTENCE_CHARS = 4000  # under SentencePiece's 4192-byte max_sentence_length (ASCII text)
_CHUNK_CHARS = 1 << 21  # ~2 MB of text per pool task: large enough to amortise IPC


# ------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------

def tokenizer_sentences(corpus: Corpus, max_files: Optional[int], max_docs: Optional[int],
                        max_chars: Optional[int], split_paragraphs: bool) -> Iterator[str]:
    """Training "sentences" for SentencePiece (SPEC 5.2): each document with the separator
    appended, from the first `max_files` files.

    `split_paragraphs` is for corpora of long documents (books) [ours]: SentencePiece silently
    skips sentences over max_sentence_length (4192 bytes), which would drop every book, so a
    long document is cut at blank lines into pieces of at most ~4000 characters, and each piece
    gets the separator so that "<STORY_SEP>" is as frequent as in a corpus of short documents
    (otherwise '<' falls under the character coverage and the separator becomes <unk>).
    """
    n_docs = n_chars = 0
    for text in corpus.documents(max_files):
        if not text:
            continue
        if split_paragraphs:
            piece = ""
            for para in text.split("\n\n"):
                if piece and len(piece) + len(para) > _MAX_SENTENCE_CHARS:
                    yield piece + DOC_SEPARATOR
                    piece = ""
                piece = f"{piece}\n\n{para}" if piece else para
            if piece.strip():
                yield piece + DOC_SEPARATOR
        else:
            yield text + DOC_SEPARATOR
        n_docs += 1
        n_chars += len(text)
        if (max_docs is not None and n_docs >= max_docs) or (max_chars is not None and n_chars >= max_chars):
            return


def train_corpus_tokenizer(corpus: Corpus, vocab_size: int = 8000, max_files: Optional[int] = None,
                           max_docs: Optional[int] = None, max_chars: Optional[int] = None,
                           split_paragraphs: bool = False, hard_vocab_limit: bool = True) -> Tokenizer:
    sentences = tokenizer_sentences(corpus, max_files, max_docs, max_chars, split_paragraphs)
    return train_tokenizer(sentences, vocab_size=vocab_size, append_separator=False,
                           hard_vocab_limit=hard_vocab_limit)


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


def _chunks(corpus: Corpus) -> Iterator[tuple]:
    """(file index, list of non-empty documents) of about _CHUNK_CHARS characters each."""
    for fi, ref in enumerate(corpus.files):
        from .sources import read_documents
        buf, size = [], 0
        for text in read_documents(ref, corpus.text_field):
            if not text:
                continue
            buf.append(text)
            size += len(text)
            if size >= _CHUNK_CHARS:
                yield fi, buf
                buf, size = [], 0
        if buf:
            yield fi, buf


def _bounded_imap(pool, chunks: Iterator[tuple], max_pending: int) -> Iterator[tuple]:
    """Ordered (file index, encoded bytes) with at most `max_pending` chunks in flight:
    Pool.imap would read the whole corpus ahead of the token budget."""
    from collections import deque
    pending: deque = deque()
    for fi, texts in chunks:
        pending.append((fi, pool.apply_async(_encode_chunk, (texts,))))
        if len(pending) >= max_pending:
            fi0, r = pending.popleft()
            yield fi0, r.get()
    while pending:
        fi0, r = pending.popleft()
        yield fi0, r.get()


# ------------------------------------------------------------------------------------------
# Manifest and shards
# ------------------------------------------------------------------------------------------

@dataclass
class TokenManifest:
    path: str  # directory
    dtype: str
    vocab_size: int
    tokenizer_sha256: str
    shards: List[Dict[str, object]]  # [{"file": name, "tokens": n, "source_files": [...]}]
    total_tokens: int
    complete: bool  # True when the whole corpus was tokenised (no budget cut)
    source: Dict[str, object]

    @classmethod
    def load(cls, directory: str) -> "TokenManifest":
        with open(os.path.join(directory, "manifest.json")) as f:
            m = json.load(f)
        return cls(path=directory, dtype=m["dtype"], vocab_size=m["vocab_size"],
                   tokenizer_sha256=m["tokenizer_sha256"], shards=m["shards"],
                   total_tokens=m["total_tokens"], complete=m["complete"], source=m["source"])

    def shard_paths(self) -> List[str]:
        return [os.path.join(self.path, s["file"]) for s in self.shards]


def token_cache_dir(cache_dir: str, corpus: Corpus, tokenizer: Tokenizer) -> str:
    return os.path.join(cache_dir, "tokens",
                        f"{corpus.name}-{corpus.split}-{corpus.key()}-{tokenizer.sha256[:12]}")


def _usable(directory: str, tokenizer: Tokenizer, max_tokens: Optional[int]) -> Optional[TokenManifest]:
    if not os.path.isfile(os.path.join(directory, "manifest.json")):
        return None
    try:
        m = TokenManifest.load(directory)
    except (OSError, ValueError, KeyError):
        return None
    if m.tokenizer_sha256 != tokenizer.sha256:
        return None
    if not (m.complete or (max_tokens is not None and m.total_tokens >= max_tokens)):
        return None  # cached for a smaller budget: rebuild
    if not all(os.path.isfile(p) for p in m.shard_paths()):
        return None
    return m


def prepare_tokens(corpus: Corpus, tokenizer: Tokenizer, cache_dir: str, max_tokens: Optional[int] = None,
                   num_workers: int = 0, shard_tokens: int = 1 << 28, progress: bool = True,
                   log=print) -> TokenManifest:
    """Tokenise `corpus` into `cache_dir` until `max_tokens` (None = all), or reuse the cache.

    One output shard per source file, split further every `shard_tokens` tokens.
    """
    if tokenizer.vocab_size > np.iinfo(TOKEN_DTYPE).max + 1:
        raise ValueError(f"vocab size {tokenizer.vocab_size} does not fit {TOKEN_DTYPE.__name__}")
    out_dir = token_cache_dir(cache_dir, corpus, tokenizer)
    cached = _usable(out_dir, tokenizer, max_tokens)
    if cached is not None:
        log(f"[data] reusing {cached.total_tokens:,} tokens of {corpus.name}/{corpus.split} from {out_dir}")
        return cached

    tmp = f"{out_dir}.tmp{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    t0 = time.time()
    shards: List[Dict[str, object]] = []
    cur = {"fi": None, "f": None, "n": 0}
    total = 0
    complete = True

    def close_shard():
        if cur["f"] is not None:
            cur["f"].close()
            shards[-1]["tokens"] = cur["n"]
            cur["f"] = None

    def open_shard(fi):
        close_shard()
        name = f"shard_{len(shards):05d}.bin"
        cur.update(fi=fi, f=open(os.path.join(tmp, name), "wb"), n=0)
        shards.append({"file": name, "tokens": 0, "source_file": corpus.files[fi].describe()})

    try:
        from tqdm import tqdm
        bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc=f"tokenise {corpus.name}/{corpus.split}",
                   disable=not (progress and sys.stderr.isatty()))
        if num_workers > 0:
            # spawn, not fork: the parent may hold OpenMP/torch threads
            pool = mp.get_context("spawn").Pool(num_workers, initializer=_worker_init,
                                                initargs=(tokenizer.model_proto,))
            results = _bounded_imap(pool, _chunks(corpus), 2 * num_workers)
        else:
            pool = None
            _worker_init(tokenizer.model_proto)
            results = ((fi, _encode_chunk(texts)) for fi, texts in _chunks(corpus))
        for fi, data in results:
            if cur["fi"] != fi:
                open_shard(fi)  # a new source file starts a new shard
            arr = np.frombuffer(data, dtype=TOKEN_DTYPE)
            if max_tokens is not None and total + len(arr) >= max_tokens:
                arr = arr[: max_tokens - total]
                complete = False
            while len(arr):
                if cur["n"] >= shard_tokens:
                    open_shard(fi)
                part = arr[: shard_tokens - cur["n"]]
                cur["f"].write(part.tobytes())
                cur["n"] += len(part)
                total += len(part)
                bar.update(len(part))
                arr = arr[len(part):]
            if not complete:
                break
        close_shard()
        bar.close()
        if pool is not None:
            pool.terminate()  # stop reading files the budget does not need
            pool.join()
        if total == 0:
            raise DataError(f"no usable text in {corpus.description.get('path') or corpus.name} "
                            f"({corpus.split}): every document was empty")
        manifest = {
            "version": MANIFEST_VERSION, "dtype": np.dtype(TOKEN_DTYPE).name,
            "vocab_size": tokenizer.vocab_size, "tokenizer_sha256": tokenizer.sha256,
            "separator": DOC_SEPARATOR, "shards": shards, "total_tokens": total,
            "complete": complete, "max_tokens": max_tokens,
            "source": {**corpus.description, "name": corpus.name, "split": corpus.split,
                       "revision": corpus.revision, "text_field": corpus.text_field},
        }
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir, ignore_errors=True)
        try:
            os.replace(tmp, out_dir)
        except OSError:  # another process finished the same cache first: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
            if _usable(out_dir, tokenizer, max_tokens) is None:
                raise
    except BaseException:
        close_shard()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dt = time.time() - t0
    log(f"[data] tokenised {total:,} tokens of {corpus.name}/{corpus.split} into {len(shards)} "
        f"shard(s) in {dt:.1f}s -> {out_dir}")
    return TokenManifest.load(out_dir)
