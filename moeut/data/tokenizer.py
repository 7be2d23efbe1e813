"""SentencePiece BPE tokenizer (SPEC 5.2): training through the keyword API and loading.

The `.model` bytes travel with every checkpoint and export, so a run never depends on a tokenizer
file elsewhere on disk. `Tokenizer.sha256` identifies it in manifests.
"""
from __future__ import annotations

import hashlib
import io
import os
from typing import Iterable, Iterator, List, Optional, Sequence, Union

import sentencepiece as spm

DOC_SEPARATOR = "<STORY_SEP>"  # appended to every document as ordinary text (SPEC 5.3)


class Tokenizer:
    """Thin wrapper over a SentencePiece model. No BOS/EOS ids are ever added (SPEC 1.1/5.3)."""

    def __init__(self, model_proto: bytes):
        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        self.sha256 = hashlib.sha256(self.model_proto).hexdigest()

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Tokenizer":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        with open(path, "rb") as f:
            return cls(f.read())

    def save(self, path: Union[str, os.PathLike]) -> None:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(self.model_proto)
        os.replace(tmp, path)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self.sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8000, *, append_separator: bool = True,
                    hard_vocab_limit: bool = True, **extra) -> Tokenizer:
    """Train SentencePiece BPE exactly as SPEC 5.2: model_type bpe, split_digits, other options
    default. Each "sentence" is a whole document with the separator appended.

    `hard_vocab_limit=False` is for tiny test corpora that cannot fill the vocabulary.
    Note [verify]: SentencePiece's default max_sentence_length (4192 bytes) silently skips longer
    documents during training; we keep the default for parity with the paper.
    """

    def sentences() -> Iterator[str]:
        for t in texts:
            if t:
                yield t + DOC_SEPARATOR if append_separator else t

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        split_digits=True, hard_vocab_limit=hard_vocab_limit, minloglevel=2, **extra)
    return Tokenizer(buf.getvalue())
