"""Hugging Face config for MoEUT exports (`model_type="moeut"`).

The native architecture (moeut.model_config.MoEUTConfig, moeut.baselines.dense.DenseConfig, ...) travels verbatim in
`moeut_config` (dataclasses.asdict, with its "arch"), so the export rebuilds exactly the trained
model. Named MoEUTHFConfig in code to avoid clashing with moeut.model_config.MoEUTConfig.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from transformers import PretrainedConfig


class MoEUTHFConfig(PretrainedConfig):
    """transformers config of an export: `moeut_config` is the native config as a dict (with its
    "arch"); vocab_size, hidden_size (d_model) and num_hidden_layers are mirrored from it for
    tools that read them. Untied head. eos/pad ids are the tokenizer's control pieces (set by the
    export; the model never trained on them, SPEC 1.1), no BOS."""

    model_type = "moeut"

    def __init__(self, moeut_config: Optional[Dict[str, Any]] = None, **kwargs):
        self.moeut_config = dict(moeut_config or {})
        kwargs.setdefault("tie_word_embeddings", False)  # the head is untied from the embedding
        if self.moeut_config:
            kwargs.setdefault("vocab_size", self.moeut_config.get("vocab_size"))
            kwargs.setdefault("hidden_size", self.moeut_config.get("d_model"))
            kwargs.setdefault("num_hidden_layers", self.moeut_config.get("n_layers"))
        # eos_token_id / pad_token_id come from the export (control pieces); never a BOS (SPEC 1.1).
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            kwargs.setdefault(k, None)
        super().__init__(**kwargs)
