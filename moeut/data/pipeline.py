"""What one training run needs from the data pipeline, shared by `train.py` and the separate
preparation command `python -m moeut.prepare_data` (SPEC 5; docs/training.md "Preparing data").

From the typed training config (moeut.train_lib.config.TrainConfig) this module derives the
tokenizer (lookup order: data.tokenizer_path -> <run dir>/tokenizer.model -> the tokenizer cache
-> train one) and the token caches of the train split (budget = the run's train limit + 1),
the validation split and every data.extra_valid set (budget = data.valid_tokens + 1). Both the
command and the training run compute them here, so a cache the command wrote is exactly the one
the run looks for (same directory, same config hash in manifest.json).

Under DDP (WORLD_SIZE > 1) train.py calls `ensure_prepared` first: a missing, partial,
mismatching or tampered cache stops the run with a message naming the command to run, instead
of rank 0 tokenising for hours while the other ranks wait in a barrier that times out.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

from .prepare import TokenCacheError, TokenManifest, check_token_cache, prepare_tokens
from .tokenizer_training import SPLITTER_VERSION, train_corpus_tokenizer
from .sources import Corpus, local_corpus, open_corpus
from .tokenizer import Tokenizer

PREPARE_COMMAND = "python -m moeut.prepare_data"


def data_corpus(d, split: str) -> Corpus:
    """The `data` config's corpus for "train" or "validation"."""
    return open_corpus(d.source, d.path, split, text_field=d.text_field, valid_path=d.valid_path,
                       revision=d.revision, languages=d.languages)


def tokenizer_cache_path(d, corpus: Optional[Corpus] = None) -> str:
    """Where a tokenizer trained from the `data` config is cached: keyed by the train corpus and
    every setting that changes what the tokenizer sees (and the splitter's version) or how it is
    trained (`-bf` for data.tokenizer_byte_fallback; absent when off, so the paper's caches keep
    their names). The token caches are keyed by the tokenizer's hash, so a changed setting is a
    different token cache too."""
    corpus = corpus or data_corpus(d, "train")
    split = f"p{SPLITTER_VERSION}" if d.tokenizer_split_paragraphs else "p0"
    fallback = "-bf" if getattr(d, "tokenizer_byte_fallback", False) else ""
    return os.path.join(d.cache_dir, "tokenizers",
                        f"{corpus.name}-{corpus.key()}-v{d.vocab_size}-f{d.tokenizer_files}"
                        f"-d{d.tokenizer_docs}-c{d.tokenizer_chars}-{split}{fallback}.model")


def find_tokenizer(d, run_dir: Optional[str] = None) -> Tuple[Optional[Tokenizer], str]:
    """(tokenizer or None, where it was looked for / found), without training one."""
    if d.tokenizer_path:
        path = os.path.expanduser(d.tokenizer_path)
        return Tokenizer.load(path), path
    if run_dir and os.path.isfile(os.path.join(run_dir, "tokenizer.model")):
        path = os.path.join(run_dir, "tokenizer.model")
        return Tokenizer.load(path), path
    path = tokenizer_cache_path(d)
    return (Tokenizer.load(path) if os.path.isfile(path) else None), path


def obtain_tokenizer(d, run_dir: Optional[str] = None, log=print) -> Tokenizer:
    """The run's tokenizer; trains and caches it when none exists (SPEC 5.2)."""
    tok, path = find_tokenizer(d, run_dir)
    if tok is None:
        corpus = data_corpus(d, "train")
        log(f"[data] training a {d.vocab_size}-piece SentencePiece BPE tokenizer on {corpus.name} ...")
        tok = train_corpus_tokenizer(corpus, d.vocab_size, max_files=d.tokenizer_files, max_docs=d.tokenizer_docs,
                                     max_chars=d.tokenizer_chars, split_paragraphs=d.tokenizer_split_paragraphs,
                                     byte_fallback=d.tokenizer_byte_fallback, log=log)
        tok.save(path)
    if tok.vocab_size != d.vocab_size:
        raise ValueError(f"data.vocab_size: {d.vocab_size} but the tokenizer {path} has {tok.vocab_size} pieces")
    return tok


def train_token_budget(tc) -> int:
    """The run's train limit in tokens (SPEC 5.4): data.train_tokens, else (steps + 100) x B x T
    (the same formula as train.py's train())."""
    d, t = tc.data, tc.train
    return d.train_tokens or (t.steps + 100) * t.batch_size * d.seq_len


def run_corpora(tc) -> Dict[str, Tuple[Corpus, Optional[int]]]:
    """name -> (corpus, token budget) for "train", "val" and each data.extra_valid entry.
    Budgets are +1: the last window's extra target token."""
    d = tc.data
    valid_budget = None if d.valid_tokens is None else d.valid_tokens + 1
    out = {"train": (data_corpus(d, "train"), train_token_budget(tc) + 1),
           "val": (data_corpus(d, "validation"), valid_budget)}
    for name, path in d.extra_valid.items():
        out[name] = (local_corpus(path, "validation", d.text_field, valid_path=path, name=name), valid_budget)
    return out


def prepare_run_data_caches(tc, workers: int, run_dir: Optional[str] = None, progress: bool = True,
                            log=print) -> Dict[str, TokenManifest]:
    """Tokenizer + every token cache the run of `tc` reads (resumable; reuses what is done)."""
    tok = obtain_tokenizer(tc.data, run_dir, log)
    return {name: prepare_tokens(corpus, tok, tc.data.cache_dir, budget, num_workers=workers, progress=progress,
                                 log=log)
            for name, (corpus, budget) in run_corpora(tc).items()}


def check_prepared(tc, run_dir: Optional[str] = None, checksums: bool = True) -> List[str]:
    """Why the run of `tc` would have to tokenise (empty list: every cache is ready and verified
    against its manifest: config hash, tokenizer hash, token counts, and with `checksums` each
    shard's sha256). Reads only."""
    tok, path = find_tokenizer(tc.data, run_dir)
    if tok is None:
        return [f"no tokenizer at {path}"]
    problems: List[str] = []
    for name, (corpus, budget) in run_corpora(tc).items():
        problems += check_token_cache(corpus, tok, tc.data.cache_dir, budget, checksums=checksums)
    return problems


def prepare_command_line(overrides: Optional[Sequence[str]] = None) -> str:
    """The command that prepares this run's data: the same config overrides as the run (those
    of Hydra itself and of the launcher left out)."""
    if overrides is None:
        try:
            from hydra.core.hydra_config import HydraConfig
            overrides = list(HydraConfig.get().overrides.task)
        except Exception:  # not under Hydra
            overrides = []
    keep = [o for o in overrides if not o.lstrip("+~").startswith("hydra.")]
    return " ".join([PREPARE_COMMAND, *keep])


def ensure_prepared(tc, world_size: int, run_dir: Optional[str] = None,
                    overrides: Optional[Sequence[str]] = None) -> None:
    """Refuse a multi-process run (`world_size` > 1) whose data is not prepared.

    Single-process runs return at once (train.py prepares inline). Under DDP every rank checks
    the manifests and the shards' sizes and checksums, so that all ranks stop together (a rank
    left waiting in init_process_group would hang until the timeout under plain srun). Raises
    TokenCacheError naming the problems and the `python -m moeut.prepare_data ...` command
    (with the run's own overrides) that fixes them.
    """
    if world_size <= 1:
        return
    problems = check_prepared(tc, run_dir, checksums=True)
    if problems:
        shown = "\n  ".join(problems[:5]) + (f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise TokenCacheError(
            f"data: this {world_size}-process run's data is not prepared:\n  {shown}\n"
            f"Under DDP train.py does not tokenise inline (the other ranks would wait in a barrier and time "
            f"out). Prepare it first, with the same overrides, on one machine that sees data.cache_dir="
            f"{tc.data.cache_dir}:\n  {prepare_command_line(overrides)}")
