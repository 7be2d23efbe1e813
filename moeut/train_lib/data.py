"""Glue from the `data` config to tokenizer + train/validation windows for one run.

Tokenizer lookup order: data.tokenizer_path -> <run_dir>/tokenizer.model (a resumed run) -> the
resumed checkpoint's -> <cache_dir>/tokenizers/<corpus key>-v<V>.model -> train one (rank 0) from
the first `tokenizer_files` files of the train split. Nothing here writes into the run dir:
train.py copies the tokenizer there (`commit_run_dir`) once the whole start is validated.
Token shards live in <cache_dir>/tokens/ keyed by (corpus, split, tokenizer hash), so repeated
runs reuse them. Under DDP rank 0 prepares everything; the others wait, then read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional

from ..data.dataset import StreamSampler, TokenStream, WindowDataset, stream_warning
from ..data.pipeline import tokenizer_cache_path
from ..data.prepare import prepare_tokens
from ..data.tokenizer_training import train_corpus_tokenizer
from ..data.sources import Corpus, local_corpus, open_corpus
from ..data.tokenizer import Tokenizer
from .distributed import DistInfo, barrier


@dataclass
class RunData:
    """A run's tokenizer and token windows: `train` and each validation set are WindowDatasets
    of [T+1]-token windows (SPEC 5.5); `valid` maps a name to its set."""
    tokenizer: Tokenizer
    train: WindowDataset
    valid: Dict[str, WindowDataset]  # "val" first, then data.extra_valid entries


def _corpus(d, split: str) -> Corpus:
    return open_corpus(d.source, d.path, split, text_field=d.text_field, valid_path=d.valid_path,
                       revision=d.revision, languages=d.languages)


def resolve_tokenizer(d, run_dir: str, dist: DistInfo, checkpoint_tokenizer: Optional[str] = None,
                      log=print) -> Tokenizer:
    """The run's tokenizer, checked against everything it must agree with; writes nothing into
    the run dir (`commit_run_dir` copies it there once the whole start is validated).

    Lookup: data.tokenizer_path -> <run_dir>/tokenizer.model -> the resumed checkpoint's
    tokenizer.model -> the cache -> train one (rank 0) into the cache.
    Raises ValueError naming the option when its vocabulary size differs from data.vocab_size,
    or when it differs from the run's or the checkpoint's tokenizer (a run keeps one tokenizer).
    """
    run_tok = os.path.join(run_dir, "tokenizer.model")
    if d.tokenizer_path:
        src, key = os.path.expanduser(d.tokenizer_path), "data.tokenizer_path"
        tok = Tokenizer.load(src)
    elif os.path.isfile(run_tok):
        src, key = run_tok, "data.vocab_size"
        tok = Tokenizer.load(run_tok)
    elif checkpoint_tokenizer:
        src, key = checkpoint_tokenizer, "data.vocab_size"
        tok = Tokenizer.load(checkpoint_tokenizer)
    else:
        corpus = _corpus(d, "train")
        cached = tokenizer_cache_path(d, corpus)  # the same file `python -m moeut.prepare_data` writes
        if dist.is_main and not os.path.isfile(cached):
            log(f"[data] training a {d.vocab_size}-piece SentencePiece BPE tokenizer on {corpus.name} ...")
            tok = train_corpus_tokenizer(corpus, d.vocab_size, max_files=d.tokenizer_files,
                                         max_docs=d.tokenizer_docs, max_chars=d.tokenizer_chars,
                                         split_paragraphs=d.tokenizer_split_paragraphs,
                                         byte_fallback=d.tokenizer_byte_fallback, log=log)
            tok.save(cached)
        barrier()
        src, key = cached, "data.vocab_size"
        tok = Tokenizer.load(cached)
    if tok.vocab_size != d.vocab_size:
        raise ValueError(f"{key}: data.vocab_size is {d.vocab_size} but the tokenizer {src} has "
                         f"{tok.vocab_size} pieces")
    for other, what in ((run_tok, "the run's tokenizer"), (checkpoint_tokenizer, "the resumed checkpoint's tokenizer")):
        if other and os.path.abspath(other) != os.path.abspath(src) and os.path.isfile(other):
            if Tokenizer.load(other).sha256 != tok.sha256:
                raise ValueError(f"{key}: the tokenizer {src} differs from {what} {other}; a run keeps one "
                                 f"tokenizer: start a new run (another hydra.run.dir) or drop data.tokenizer_path")
    return tok


def prepare_run_data(d, seq_len: int, train_tokens: int, tok: Tokenizer, dist: DistInfo, log=print) -> RunData:
    """Token windows for training and validation (written to the cache, never to the run dir)."""
    train_corpus = _corpus(d, "train")
    valid_corpora = {"val": _corpus(d, "validation")}
    for name, path in d.extra_valid.items():
        valid_corpora[name] = local_corpus(path, "validation", d.text_field, valid_path=path, name=name)
    budgets = {"train": train_tokens + 1}  # +1: the last window's extra target token
    # +1: the last window's extra target token
    valid_budget = None if d.valid_tokens is None else d.valid_tokens + 1
    manifests = {}
    if dist.is_main:
        progress = True
        manifests["train"] = prepare_tokens(train_corpus, tok, d.cache_dir, budgets["train"],
                                            num_workers=d.num_workers, progress=progress, log=log)
        for name, c in valid_corpora.items():
            manifests[name] = prepare_tokens(c, tok, d.cache_dir, valid_budget, num_workers=d.num_workers,
                                             progress=progress, log=log)
    barrier()
    if not dist.is_main:  # the cache is complete now: these calls only read manifests
        quiet = lambda *a, **k: None  # noqa: E731
        manifests["train"] = prepare_tokens(train_corpus, tok, d.cache_dir, budgets["train"], log=quiet)
        for name, c in valid_corpora.items():
            manifests[name] = prepare_tokens(c, tok, d.cache_dir, valid_budget, log=quiet)
    # An explicit data.train_tokens the stream cannot fill is worth a warning; the default budget's
    # 100-step margin is not: whether data repeats is reported by the start (steps per epoch < train.steps).
    # The training stream's notes are warned about by `train_sampler`, with the sampler's, in one warning.
    train = WindowDataset(TokenStream(manifests["train"]), seq_len, limit_tokens=train_tokens,
                          limit_name="data.train_tokens", warn_short=bool(d.train_tokens), warn=False)
    valid = {name: WindowDataset(TokenStream(manifests[name]), seq_len, limit_tokens=d.valid_tokens,
                                 limit_name=f"data.valid_tokens, validation set {name!r}",
                                 warn=dist.is_main)  # every rank reads the same streams: one warning
             for name in valid_corpora}
    for name, ds in valid.items():
        if len(ds) == 0:
            raise ValueError(f"data: validation set {name!r} has fewer than {seq_len + 1} tokens")
    return RunData(tok, train, valid)


def train_sampler(data: RunData, d, batch_size: int, dist: DistInfo) -> StreamSampler:
    """The training sampler over `data.train` (`d`: the data options: sampler, shuffle_seed), and
    one warning (on the main rank) about the training stream: what its windows leave out (a short stream, a tail shorter
    than a window) and what the sampler leaves out (windows that do not fill one more per stream).
    Raises ValueError when the stream has fewer windows than one batch of `batch_size`."""
    import warnings

    sampler = StreamSampler(len(data.train), batch_size, d.sampler, d.shuffle_seed, dist.rank, dist.world_size,
                            warn=False)
    notes = data.train.notes + sampler.notes
    if notes and dist.is_main:  # every rank reads the same stream: one warning per run
        warnings.warn(stream_warning(data.train.stream, notes), stacklevel=2)
    return sampler
