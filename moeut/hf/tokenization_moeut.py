"""Hugging Face tokenizer over the run's SentencePiece model (copied into every export).

Adds no special tokens: MoEUT has no BOS/EOS (SPEC 1.1), so `tokenizer(text).input_ids` equals
`moeut.data.tokenizer.Tokenizer.encode(text)`.

Padding: the pad token is a SentencePiece *control* piece (`<pad>` if the model has one, else
`</s>`, else `<s>`), which encoding text never produces, so a pad id is never mistaken for text
(generate may infer the attention mask from it). The model never sees the pads: right pads follow
the real tokens of a causal model, and left pads (the default side, for `generate`) are removed
row by row (modeling_moeut.py).
"""
from __future__ import annotations

import os
import shutil
from typing import Dict, List, Optional, Tuple

from transformers import PreTrainedTokenizer


class MoEUTTokenizer(PreTrainedTokenizer):
    """`AutoTokenizer` of an export over its `tokenizer.model` (SentencePiece, SPEC 5.2): no special
    tokens added, left padding by default, pad = a control piece (see the module docstring).
    Raises ValueError when the model has no control piece and no `pad_token` is given."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, **kwargs):
        import sentencepiece as spm
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        for k in ("bos_token", "eos_token", "unk_token"):
            kwargs.setdefault(k, None)
        if kwargs.get("pad_token") is None:
            kwargs["pad_token"] = self.default_pad_piece(self.sp)
        kwargs.setdefault("padding_side", "left")
        super().__init__(**kwargs)

    @staticmethod
    def default_pad_piece(sp) -> str:
        """A control piece of the SentencePiece model to pad with (never produced by encoding)."""
        for i in (sp.pad_id(), sp.eos_id(), sp.bos_id()):
            if 0 <= i < sp.get_piece_size() and sp.is_control(i):
                return sp.id_to_piece(i)
        raise ValueError("tokenizer.model has no control piece (<pad>, </s> or <s>) to pad with; pass pad_token=")

    @property
    def vocab_size(self) -> int:
        """Number of SentencePiece pieces V."""
        return self.sp.get_piece_size()

    def get_vocab(self) -> Dict[str, int]:
        """{piece: id} for every id 0..V-1."""
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text: str, **kwargs) -> List[str]:
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp.id_to_piece(int(index))

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        """Text of SentencePiece pieces ("▁" becomes a space)."""
        return self.sp.decode_pieces(list(tokens))

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        """The ids unchanged (a pair is concatenated): MoEUT adds no BOS/EOS (SPEC 1.1)."""
        return list(token_ids_0) + (list(token_ids_1) if token_ids_1 else [])

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> Tuple[str]:
        """Copy tokenizer.model (as `<prefix>-tokenizer.model` with a prefix) into `save_directory`;
        returns its path as a 1-tuple."""
        name = (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model"
        dst = os.path.join(save_directory, name)
        if os.path.abspath(self.vocab_file) != os.path.abspath(dst):
            shutil.copyfile(self.vocab_file, dst)
        return (dst,)
