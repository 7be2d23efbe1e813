"""Hugging Face `PreTrainedModel` wrapper around the native MoEUT model.

This file is copied into every export (auto-class registration), and it imports the installed
`moeut` package for the model code itself: `pip install moeut` (this repository) is required to
load an export with `trust_remote_code=True`. Weights are the native state dict under the
prefix `model.` in model.safetensors.

Padding: the model is causal, so right padding needs no mask; `attention_mask` is accepted and
checked (left padding is rejected rather than silently mis-scored).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_moeut import MoEUTHFConfig


class MoEUTForCausalLM(PreTrainedModel):
    config_class = MoEUTHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = []
    _tied_weights_keys = []  # the head is untied

    def __init__(self, config: MoEUTHFConfig):
        super().__init__(config)
        from moeut.checkpoint import build_model
        from moeut.config import config_from_dict
        if not config.moeut_config:
            raise ValueError("MoEUTHFConfig.moeut_config is empty: not a MoEUT export")
        self.model = build_model(config_from_dict(config.moeut_config))
        self.post_init()

    def _init_weights(self, module):
        # The native constructor initialises every parameter (SPEC 1.6); exports are always loaded
        # with all weights present, so nothing is left to initialise here.
        pass

    def get_input_embeddings(self):
        return self.model.embedding

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, return_dict: Optional[bool] = None,
                **kwargs) -> CausalLMOutputWithPast:
        if attention_mask is not None:
            m = attention_mask.bool()
            # right padding only: once a row has a 0, it must stay 0 (cummin over the row)
            if not torch.equal(m, m.int().cummin(dim=-1).values.bool()):
                raise ValueError("MoEUTForCausalLM supports right padding only (attention_mask must be 1...1 0...0)")
        out = self.model(input_ids, attention_mask=attention_mask)  # padded tokens take no expert capacity
        logits = out.logits
        loss = None
        if labels is not None:
            # HF convention: labels are the inputs; shift here; -100 ignored
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
