"""Hugging Face `PreTrainedModel` + `GenerationMixin` wrapper around the native MoEUT model.

This file is copied into every export (auto-class registration), and it imports the installed
`moeut` package for the model code itself: `pip install moeut` (this repository) is required to
load an export with `trust_remote_code=True`. Weights are the native state dict under the
prefix `model.` in model.safetensors. Every architecture of the package (MoEUT, the dense / MoE
Transformer and SUT baselines) goes through the same wrapper: they share the native
`model(input_ids, cache=KVCache)` contract (SPEC 1.8, 1.9).

KV cache (SPEC 1.9): the native cache holds one (k, v) pair per *absolute* layer l = 0..L-1, each
[B, H, T_cache, D]. Between calls it lives in a transformers `Cache` (layer index = l; `generate`
creates a `DynamicCache`), so beam search, `num_return_sequences` and cache cropping work through
the library's own cache operations. Each forward builds a native `KVCache` view of it, runs the
native model and appends the new positions with `Cache.update`.

Padding (`attention_mask`, [B, past + T], 1 = real token): each row must be one contiguous run of
real tokens (0...0 1...1 0...0). A padded batch runs row by row, each row without its pads (its
first real token at RoPE position 0), so every row's result is exactly that of the row alone, for
every architecture (capacity-limited routers give pads no capacity because they never see them),
at the cost of B forwards of batch size 1 per call; logits at padded positions are 0. Unpadded
batches (no mask, or all ones) run batched.
- Left padding (leading zeros) is the `generate` convention and the tokenizer's default side.
- No attention_mask means no padding: every position is a real token, also an id equal to the pad
  id (`generate` would otherwise infer a mask from the pad id; encoding text never produces it,
  but ids from elsewhere may), exactly as the native `model.generate(ids, ...)`.
- `generate` stops a row at `config.eos_token_id` (a control piece the model never trained on, so
  a trained model hardly ever produces it) and pads finished rows with `config.pad_token_id`.
- A right-padded row (trailing zeros) scores correctly but cannot be continued with a cache (the
  next token would follow the pads): that raises, naming `tokenizer.padding_side`.
`inputs_embeds`, `position_ids`, attention weights and hidden states are not supported (raise).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_moeut import MoEUTHFConfig

# transformers 5 names the cache `cache` (input and output); 4.x named it `past_key_values`.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _cached_kv(cache, l: int):
    """(keys, values) [B, H, T, D] of absolute layer l stored in a transformers Cache, or None."""
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56: one CacheLayer per layer index
        if l >= len(layers) or not getattr(layers[l], "is_initialized", True) or layers[l].keys is None \
                or layers[l].keys.numel() == 0:
            return None
        return layers[l].keys, layers[l].values
    keys = getattr(cache, "key_cache", None)  # older DynamicCache
    if keys is None or l >= len(keys) or keys[l] is None or keys[l].numel() == 0:
        return None
    return keys[l], cache.value_cache[l]


def _leading_zeros(mask_BT: torch.Tensor) -> torch.Tensor:
    """Number of leading False entries per row of a bool mask [B, T] -> [B] int64."""
    return (mask_BT.long().cumsum(dim=1) == 0).sum(dim=1)


class MoEUTForCausalLM(PreTrainedModel, GenerationMixin):
    """`AutoModelForCausalLM` of a MoEUT export: the native model (any architecture of the package,
    rebuilt from `config.moeut_config`) under `self.model`, with transformers' `generate`, Cache and
    padding handling as described in the module docstring (SPEC 1.8, 1.9). Raises ValueError when
    `config.moeut_config` is empty (not a MoEUT export)."""

    config_class = MoEUTHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = []
    _tied_weights_keys = []  # the head is untied

    def __init__(self, config: MoEUTHFConfig):
        super().__init__(config)
        from moeut.registry import build_model, config_from_dict
        if not config.moeut_config:
            raise ValueError("MoEUTHFConfig.moeut_config is empty: not a MoEUT export")
        self.model = build_model(config_from_dict(config.moeut_config, source="the export's config.json (moeut_config)"))
        self.post_init()

    def _init_weights(self, module):
        # The native constructor initialises every parameter (SPEC 1.6); exports are always loaded
        # with all weights present, so nothing is left to initialise here.
        pass

    def get_input_embeddings(self):
        """The native token embedding (nn.Embedding [V, d_model])."""
        return self.model.embedding

    def get_output_embeddings(self):
        """The native output head (nn.Linear d_model -> V; untied from the embedding)."""
        return self.model.lm_head

    def generate(self, inputs: Optional[torch.Tensor] = None, generation_config=None, **kwargs):
        """transformers' `generate`, with one rule: without an `attention_mask`, every position of the
        input ids [B, T] is a real token (an all-ones mask is passed), so an id equal to the pad id
        is never taken for padding. Pass the tokenizer's attention_mask for a padded batch."""
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if kwargs.get("attention_mask") is None and isinstance(ids, torch.Tensor) and ids.dim() == 2 \
                and not ids.is_floating_point():
            kwargs["attention_mask"] = torch.ones_like(ids)
        return super().generate(inputs, generation_config, **kwargs)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                cache=None, labels: Optional[torch.LongTensor] = None, use_cache: Optional[bool] = None,
                return_dict: Optional[bool] = None, past_key_values=None, inputs_embeds=None,
                output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                **kwargs) -> CausalLMOutputWithPast:
        """input_ids [B, T] int64 (the new tokens: T = all of them without a cache, the ones after
        the cached `past` positions with one); attention_mask [B, past + T] (see the module
        docstring); cache / past_key_values: a transformers `Cache` to extend (created when
        `use_cache`, default `config.use_cache` in eval mode); labels [B, T]: the inputs, shifted
        here, -100 ignored. Returns logits [B, T, V] in the model's dtype, the mean CE `loss`
        (labels only; the MoE regulariser is not added) and the cache.
        Raises ValueError for inputs_embeds / position_ids, a mask that is not one contiguous run
        per row, a right-padded row continued with a cache, or a row with no real token."""
        if inputs_embeds is not None:
            raise ValueError("MoEUTForCausalLM: inputs_embeds is not supported; pass input_ids")
        if kwargs.get("position_ids") is not None:
            raise ValueError("MoEUTForCausalLM: position_ids is not supported (positions follow the cache and "
                             "attention_mask; RoPE makes left padding position-free)")
        if output_attentions or output_hidden_states:
            raise ValueError("MoEUTForCausalLM: output_attentions / output_hidden_states are not supported "
                             "(use the native model's collect_routing=True for per-layer records)")
        ignored = sorted(k for k, v in kwargs.items() if v is not None and k != "position_ids")
        if ignored:
            warnings.warn(f"MoEUTForCausalLM.forward: ignoring unsupported arguments {ignored}")
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids: expected [B, T] token ids, got "
                             f"{None if input_ids is None else tuple(input_ids.shape)}")
        if cache is None:
            cache = past_key_values
        if use_cache is None:
            use_cache = bool(getattr(self.config, "use_cache", True)) and not self.training
        if cache is None and use_cache:
            from transformers import DynamicCache
            cache = DynamicCache()
        logits = self._forward_cached(input_ids, attention_mask, cache)
        loss = None
        if labels is not None:
            # HF convention: labels are the inputs; shift here; -100 ignored
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
        return out if return_dict is not False else out.to_tuple()

    def _forward_cached(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], cache):
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        span = None
        if attention_mask is not None:
            span = self._check_mask(attention_mask, B, past + T, continuing=past > 0)
        if span is None or bool((span[0] == 0).all() and (span[1] == past + T).all()):  # no padding
            kv = self._native_cache(cache, past, rows=None)
            logits = self.model(input_ids, cache=kv).logits
            self._append(cache, kv, T)
            return logits
        # Padding: row by row, each row's cache and input without its pads, so that its result is
        # that of the row alone (for every architecture, capacity-limited routers included).
        logits = None
        row_caches, row_spans = [], []
        for b in range(B):
            start, end = int(span[0][b]), int(span[1][b])  # real positions [start, end) of past + T
            kv = self._native_cache(cache, past, rows=(b, start)) if cache is not None else None
            s, e = max(0, start - past), end - past  # this row's real positions among the new ones
            out = self.model(input_ids[b:b + 1, s:e], cache=kv).logits
            if logits is None:
                logits = out.new_zeros(B, T, out.shape[-1])
            logits[b, s:e] = out[0]
            row_caches.append(kv)
            row_spans.append((s, e))
        if cache is not None:
            for l in sorted(row_caches[0].k):
                new_k, new_v = [], []
                for kv, (s, e) in zip(row_caches, row_spans):
                    k, v = kv.k[l][:, :, kv.k[l].shape[2] - (e - s):], kv.v[l][:, :, kv.v[l].shape[2] - (e - s):]
                    new_k.append(F.pad(k, (0, 0, s, T - e)))  # zeros stand in for the pads
                    new_v.append(F.pad(v, (0, 0, s, T - e)))
                cache.update(torch.cat(new_k), torch.cat(new_v), l)
        return logits

    @staticmethod
    def _check_mask(attention_mask: torch.Tensor, B: int, total: int, continuing: bool):
        """Validate a 2D padding mask; returns (start, end) [B] each: row b's real positions are
        [start, end) of the past + T positions."""
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (B, total):
            raise ValueError(f"attention_mask: expected shape [B, past + T] = {[B, total]}, got "
                             f"{list(attention_mask.shape)}")
        m = attention_mask.bool()
        lead = _leading_zeros(m)
        trail = _leading_zeros(m.flip(1))
        n_real = m.sum(dim=1)
        for b in range(B):
            if int(n_real[b]) == 0:
                raise ValueError(f"attention_mask: row {b} has no real token (all zeros); MoEUT has no BOS to "
                                 f"start from")
            if int(lead[b] + n_real[b] + trail[b]) != total:
                raise ValueError(f"attention_mask: row {b} is not one contiguous run of 1s (0...0 1...1 0...0); "
                                 f"if a right-padded prompt was continued, pad prompts on the left for "
                                 f"generation (tokenizer.padding_side='left')")
        if continuing and bool((trail > 0).any()):
            b = int((trail > 0).nonzero()[0])
            raise ValueError(f"attention_mask: row {b} ends in padding but a cache is used: the next token would "
                             f"follow the pads; pad prompts on the left for generation "
                             f"(tokenizer.padding_side='left')")
        return lead, total - trail

    def _native_cache(self, cache, past: int, rows):
        """A native KVCache viewing the transformers cache (all rows, or rows=(b, start): row b
        from absolute position `start` on). None without a cache."""
        if cache is None:
            return None
        from moeut.model import KVCache
        kv = KVCache()
        b, start = rows if rows is not None else (None, 0)
        n_layers = len(cache.layers) if hasattr(cache, "layers") else len(getattr(cache, "key_cache", []))
        for l in range(n_layers):
            pair = _cached_kv(cache, l)
            if pair is None:
                continue
            k, v = pair
            if k.shape[2] != past:
                raise ValueError(f"cache: layer {l} holds {k.shape[2]} positions, layer 0 {past}")
            if b is not None:
                k, v = k[b:b + 1, :, start:], v[b:b + 1, :, start:]
            if k.shape[2] > 0:
                kv.k[l], kv.v[l] = k, v
        kv.seq_len = max(0, past - start)
        if kv.seq_len > 0 and not kv.k:
            raise ValueError(f"cache: reports {past} cached positions but holds no MoEUT layer")
        return kv

    @staticmethod
    def _append(cache, kv, T: int) -> None:
        if cache is None:
            return
        for l in sorted(kv.k):
            cache.update(kv.k[l][:, :, -T:], kv.v[l][:, :, -T:], l)
