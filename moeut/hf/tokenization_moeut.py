"""Hugging Face tokenizer over the run's SentencePiece model (copied into every export).

Encoding is SentencePiece's own, always: `tokenizer(text).input_ids` equals
`moeut.data.tokenizer.Tokenizer.encode(text)` for every text, including text that spells a
control piece ("<s>", "</s>", "<pad>", "<unk>") or the document separator: no special or added
token is split out of the text (transformers' default would turn the text "</s>" into the EOS id),
and no BOS/EOS is added (MoEUT has none, SPEC 1.1/6.1). Decoding gives SentencePiece's decoding
of the text ids (the native `decode`), with a control piece rendered as its name unless
`skip_special_tokens`.

Special tokens, for the standard clients (`generate`, lm-eval's `hf` model):
- eos_token: SentencePiece's `</s>` control piece (else `<pad>`, else `<s>`). Training never used
  it (documents end with the separator "<STORY_SEP>", ordinary text of several pieces), so a
  trained model essentially never produces it: `generate` runs to `max_new_tokens` or the caller's
  stop strings, as the native `generate` does. lm-eval uses it as its stop string and as the
  prefix token of an empty context.
- pad_token: `<pad>` if the model has one, else the EOS piece; a control piece, so encoding text
  never produces it. Left padding by default (for `generate`).
- bos_token: none, `add_bos_token=False`: nothing is prepended (SPEC 6.1: no BOS in scoring).
- unk_token: `<unk>`, the id SentencePiece gives text it has no piece for.
The model never sees the pads: right pads follow the real tokens of a causal model, and left pads
are removed row by row (modeling_moeut.py).
"""
from __future__ import annotations

import os
import shutil
from typing import Dict, List, Optional, Tuple

from transformers import PreTrainedTokenizer


class MoEUTTokenizer(PreTrainedTokenizer):
    """`AutoTokenizer` of an export over its `tokenizer.model` (SentencePiece, SPEC 5.2): encodes
    exactly as the native tokenizer, adds no special tokens, left padding by default; special
    tokens as in the module docstring. Raises ValueError when the model has no control piece and
    no `eos_token` / `pad_token` is given."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, **kwargs):
        import sentencepiece as spm
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        kwargs.setdefault("bos_token", None)
        if kwargs.get("eos_token") is None:
            kwargs["eos_token"] = self.default_eos_piece(self.sp)
        if kwargs.get("pad_token") is None:
            kwargs["pad_token"] = self.default_pad_piece(self.sp)
        if kwargs.get("unk_token") is None and self.sp.unk_id() >= 0:
            kwargs["unk_token"] = self.sp.id_to_piece(self.sp.unk_id())
        kwargs.setdefault("padding_side", "left")
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        self.add_bos_token = False  # read by clients (lm-eval); nothing is ever prepended
        self.add_eos_token = False
        super().__init__(**kwargs)

    @staticmethod
    def _control_piece(sp, ids) -> str:
        for i in ids:
            if 0 <= i < sp.get_piece_size() and sp.is_control(i):
                return sp.id_to_piece(i)
        raise ValueError("tokenizer.model has no control piece (<pad>, </s> or <s>) for the special tokens; "
                         "pass eos_token= and pad_token=")

    @classmethod
    def default_eos_piece(cls, sp) -> str:
        """The control piece used as EOS: `</s>`, else `<pad>`, else `<s>` (never produced by encoding)."""
        return cls._control_piece(sp, (sp.eos_id(), sp.pad_id(), sp.bos_id()))

    @classmethod
    def default_pad_piece(cls, sp) -> str:
        """The control piece to pad with: `<pad>`, else `</s>`, else `<s>` (never produced by encoding)."""
        return cls._control_piece(sp, (sp.pad_id(), sp.eos_id(), sp.bos_id()))

    @property
    def vocab_size(self) -> int:
        """Number of SentencePiece pieces V."""
        return self.sp.get_piece_size()

    def get_vocab(self) -> Dict[str, int]:
        """{piece: id} for every id 0..V-1."""
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def tokenize(self, text: str, **kwargs) -> List[str]:
        """The pieces of SentencePiece's encoding of `text` (one per id; an unknown character is
        "<unk>"): no special or added token is split out of the text first, so the ids equal the
        native `encode` for any text. Keyword arguments (transformers' own) are ignored."""
        return [self.sp.id_to_piece(i) for i in self.sp.encode(text)]

    def _tokenize(self, text: str, **kwargs) -> List[str]:
        return self.tokenize(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp.id_to_piece(int(index))

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        """Text of SentencePiece pieces ("▁" becomes a space)."""
        return self.sp.decode_pieces(list(tokens))

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None,
                **kwargs) -> str:
        """SentencePiece's decoding of the ids (as the native `decode`); a control piece (EOS, pad)
        is its name ("</s>"), or nothing with `skip_special_tokens`."""
        ids = [int(token_ids)] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        text_ids, marks = [], []  # marks: (number of text ids before it, control piece name)
        for i in ids:
            if 0 <= i < self.vocab_size and self.sp.is_control(i):
                marks.append((len(text_ids), self.sp.id_to_piece(i)))
            else:
                text_ids.append(i)
        text = self.sp.decode(text_ids)  # control ids decode to nothing: the native decode
        if skip_special_tokens or not marks:
            return text
        out, at = [], 0
        for n, name in marks:  # each name where the text of the ids before it ends
            cut = len(self.sp.decode(text_ids[:n]))
            cut = cut if text.startswith(self.sp.decode(text_ids[:n])) else at
            out += [text[at:cut], name]
            at = max(at, cut)
        return "".join(out) + text[at:]

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
