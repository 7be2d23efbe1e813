"""SentencePiece BPE tokenizer (SPEC 5.2): training through the keyword API and loading.

The `.model` bytes travel with every checkpoint and export, so a run never depends on a tokenizer
file elsewhere on disk. `Tokenizer.sha256` identifies it in manifests.
"""
from __future__ import annotations

import hashlib
import io
import os
from collections import Counter
from typing import Iterable, Iterator, List, Optional, Sequence, Union

import sentencepiece as spm

DOC_SEPARATOR = "<STORY_SEP>"  # appended to every document as ordinary text (SPEC 5.3)


class Tokenizer:
    """Thin wrapper over a SentencePiece model. No BOS/EOS ids are ever added (SPEC 1.1/5.3)."""

    def __init__(self, model_proto: bytes):
        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        self.sha256 = hashlib.sha256(self.model_proto).hexdigest()
        self.train_stats: Optional[dict] = None  # set by train_tokenizer: sentences used / skipped

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Tokenizer":
        """Tokenizer from a SentencePiece `.model` file; FileNotFoundError naming the path."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        with open(path, "rb") as f:
            return cls(f.read())

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the `.model` bytes to `path` (parent directories created; atomic: a temporary file
        is renamed, so a crash never leaves a truncated model)."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(self.model_proto)
        os.replace(tmp, path)

    @property
    def vocab_size(self) -> int:
        """Number of pieces V (ids are 0..V-1; 8000 for the paper's tokenizers, SPEC 5.2)."""
        return self.sp.get_piece_size()

    def encode(self, text: str) -> List[int]:
        """Token ids of `text` (SentencePiece's dummy prefix "▁" included, no BOS/EOS; SPEC 5.3, 6.1)."""
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """`encode` of each text, in one SentencePiece call."""
        return self.sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a sequence of ids (any integer type)."""
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        """The SentencePiece piece (e.g. "▁the") of id `i`."""
        return self.sp.id_to_piece(int(i))


# SentencePiece's trainer skips every input "sentence" longer than this many UTF-8 bytes (its
# default max_sentence_length; checked on the raw bytes, before normalisation), logging it only
# at a level we silence. We pass the value explicitly and count the skips ourselves.
SPM_MAX_SENTENCE_BYTES = 4192


class TokenizerTrainingError(ValueError):
    """The tokenizer corpus leaves nothing (or too little) to train on; names the setting."""


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8000, *, append_separator: bool = True,
                    hard_vocab_limit: bool = True, byte_fallback: bool = False,
                    source: str = "the tokenizer corpus", **extra) -> Tokenizer:
    """Train SentencePiece BPE exactly as SPEC 5.2: model_type bpe, split_digits, other options
    default. Each "sentence" is a whole document with the separator appended.

    `byte_fallback=True` [ours, not the paper's] adds SentencePiece's 256 byte pieces (within
    `vocab_size`): a character without a piece is encoded as its UTF-8 bytes, so no text maps to
    <unk> (data.tokenizer_byte_fallback; the paper's settings leave it off, and then characters
    rarer than SentencePiece's character_coverage, e.g. `Q` or `=` in a small book corpus, become
    <unk>). Either way the characters of the training text that the trained model maps to <unk>
    are counted and warned about (count, distinct characters, naming data.tokenizer_byte_fallback);
    the counts are in `train_stats["unk_chars"]` / `["unk_distinct"]`.

    `hard_vocab_limit=False` is for tiny test corpora that cannot fill the vocabulary.
    Sentences over SPM_MAX_SENTENCE_BYTES bytes are skipped, as SentencePiece's default does (the
    paper's tokenizer was trained that way on C4), but never silently: the skipped count and its
    share of the text bytes are warned about, naming `data.tokenizer_split_paragraphs` (which cuts
    long documents into pieces that fit, see moeut.data.tokenizer_training.split_text_bytes). The counts are
    in the returned tokenizer's `train_stats`.

    Raises TokenizerTrainingError when no sentence is left to train on, or when the corpus is too
    small for `vocab_size`; an error of reading `texts` (e.g. DataError naming file:line) is
    raised as itself.
    """
    import warnings
    max_len = int(extra.pop("max_sentence_length", SPM_MAX_SENTENCE_BYTES))
    stats = {"sentences": 0, "bytes": 0, "empty": 0, "too_long": 0, "too_long_bytes": 0,
             "largest_too_long_bytes": 0}
    chars: Counter = Counter()  # characters of the sentences trained on, for the <unk> count

    failed: list = []  # an error of the text reader, which SentencePiece would wrap in a RuntimeError

    def sentences() -> Iterator[str]:
        try:
            yield from _sentences()
        except Exception as e:
            failed.append(e)
            raise

    def _sentences() -> Iterator[str]:
        for t in texts:
            if not t:
                stats["empty"] += 1
                continue
            s = t + DOC_SEPARATOR if append_separator else t
            n = len(s.encode("utf-8"))
            if n > max_len:  # SentencePiece would drop it without a word: count it instead
                stats["too_long"] += 1
                stats["too_long_bytes"] += n
                stats["largest_too_long_bytes"] = max(stats["largest_too_long_bytes"], n)
                continue
            stats["sentences"] += 1
            stats["bytes"] += n
            chars.update(s)
            yield s

    it = sentences()
    first = next(it, None)

    def lost() -> str:
        total = stats["bytes"] + stats["too_long_bytes"]
        return (f"{stats['too_long']} of {stats['too_long'] + stats['sentences']} sentences "
                f"({100.0 * stats['too_long_bytes'] / max(total, 1):.1f} % of the text bytes, the largest "
                f"{stats['largest_too_long_bytes']:,} bytes) are longer than SentencePiece's "
                f"max_sentence_length of {max_len} bytes")

    if first is None:
        why = (f"{lost()} and would be skipped; set data.tokenizer_split_paragraphs=true to split long "
               f"documents") if stats["too_long"] else (
               f"every document was empty ({stats['empty']}); check data.path, data.text_field and "
               f"data.tokenizer_files / tokenizer_docs / tokenizer_chars")
        raise TokenizerTrainingError(f"nothing to train the tokenizer on in {source}: {why}")

    def all_sentences() -> Iterator[str]:
        yield first
        yield from it

    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=all_sentences(), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
            split_digits=True, hard_vocab_limit=hard_vocab_limit, minloglevel=2,
            # only when asked: an explicit value is stored in the model and changes its hash (paper parity)
            **({"byte_fallback": True} if byte_fallback else {}),
            # only when not the default: an explicit value is stored in the model and changes its hash
            **({} if max_len == SPM_MAX_SENTENCE_BYTES else {"max_sentence_length": max_len}), **extra)
    except RuntimeError as e:
        if failed:  # the reader's own error (e.g. DataError naming file:line), not SentencePiece's
            raise failed[0] from None
        if "Vocabulary size" in str(e) or "vocab_size" in str(e):
            raise TokenizerTrainingError(
                f"data.vocab_size={vocab_size}: {source} ({stats['sentences']} sentences, "
                f"{stats['bytes']:,} bytes) is too small for this vocabulary; give the tokenizer more text "
                f"(data.tokenizer_files / tokenizer_docs / tokenizer_chars) or lower data.vocab_size "
                f"({e})") from e
        raise
    if stats["too_long"]:
        warnings.warn(f"tokenizer training on {source}: {lost()} and were skipped (SentencePiece's default, "
                      f"as in the paper); set data.tokenizer_split_paragraphs=true to split long documents "
                      f"into pieces that fit instead", stacklevel=2)
    tok = Tokenizer(buf.getvalue())
    unk = unk_characters(tok, chars)
    stats["unk_chars"], stats["unk_distinct"] = sum(unk.values()), len(unk)
    if unk:
        top = ", ".join(f"{c!r} x{n:,}" for c, n in unk.most_common(8))
        warnings.warn(f"tokenizer training on {source}: {stats['unk_chars']:,} characters of the training text "
                      f"({len(unk)} distinct; most frequent: {top}) map to <unk>: the trained tokenizer has no "
                      f"piece for them (SentencePiece's character_coverage, the paper's setting); set "
                      f"data.tokenizer_byte_fallback=true for a tokenizer that maps no text to <unk>",
                      stacklevel=2)
    tok.train_stats = dict(stats)
    return tok


def unk_characters(tok: Tokenizer, chars: "Counter[str]") -> "Counter[str]":
    """The characters of `chars` ({character: count}, e.g. a Counter over a text) that `tok`
    encodes to <unk> (alone, i.e. at the character level, where SentencePiece decides it), with
    their counts. Empty for a byte-fallback tokenizer."""
    unk_id = tok.sp.unk_id()
    if unk_id < 0:
        return Counter()
    distinct = list(chars)
    encoded = tok.sp.encode(distinct, out_type=int)
    return Counter({c: chars[c] for c, ids in zip(distinct, encoded) if unk_id in ids})
