"""The output contract shared by every language model in this package (SPEC 1.8).

Training, evaluation and analysis code consume only these types, so MoEUT and all baselines are
interchangeable behind `model(input_ids, attention_mask=..., cache=..., collect_routing=...)`.

Padding contract (every LM here): `attention_mask` [B, T] (named as in Hugging Face; 1 = real
token, 0 = padding; bool or integer) marks the valid positions of a right-padded batch. Padded
positions take no expert capacity (capacity-limited routers), enter no routing statistic (routing
records carry the mask as `valid`; `moeut.analysis.routing.RoutingStats` skips them) and no auxiliary loss
or regulariser; their logits are unspecified. Only right padding is supported (each row 1...1 0...0):
the models are causal, so a real position never attends to a later padded one, and absolute
positions (RoPE) stay those of the unpadded sequence. A score therefore never depends on padding
or on the other rows of the batch (tests/unit/model/test_padding_invariance.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch


@dataclass
class RoutingRecord:
    """Routing decisions of one absolute layer application l = r*G + g (execution order).

    All tensors are detached. Index tensors are int32; gates are the selected sigmoid values (fp32).
    Attention indices are the expert index *within the head* (0..E_att-1). Fields a model does not
    have (e.g. attention experts in a dense baseline) are None.
    """

    l: int  # absolute layer index in execution order
    g: int  # group member (unique layer)
    r: int  # repetition
    mlp_idx: Optional[torch.Tensor] = None  # [B, T, K] int32
    mlp_gate: Optional[torch.Tensor] = None  # [B, T, K] fp32
    att_v_idx: Optional[torch.Tensor] = None  # [B, T, H, k_att] int32
    att_v_gate: Optional[torch.Tensor] = None  # [B, T, H, k_att] fp32
    att_o_idx: Optional[torch.Tensor] = None  # [B, T, H, k_att] int32
    att_o_gate: Optional[torch.Tensor] = None  # [B, T, H, k_att] fp32
    mlp_logits: Optional[torch.Tensor] = None  # [B, T, N_E] fp32, only if asked (memory)
    in_norm: Optional[torch.Tensor] = None  # [B, T] fp32: ||x_in|| of the residual entering the layer
    update_norm: Optional[torch.Tensor] = None  # [B, T] fp32: ||x_out - x_in||
    cos_in_out: Optional[torch.Tensor] = None  # [B, T] fp32: cos(x_out, x_in)
    # [B, T] bool: real (non-padded) positions, or None when every position is real. Consumers of
    # the per-position tensors above must skip positions where this is False.
    valid: Optional[torch.Tensor] = None


@dataclass
class LMOutput:
    """What every LM's forward returns (SPEC 1.8): logits, the regulariser / auxiliary-loss sum to
    add to the cross-entropy, its terms for logging, routing records on request, the KV cache."""

    logits: torch.Tensor  # [B, T, V], autocast dtype under autocast
    reg_loss: torch.Tensor  # 0-dim fp32: every auxiliary loss to add to CE with weight 1 (0 in eval)
    reg_terms: Dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars for logging
    routing: Optional[List[RoutingRecord]] = None  # only with collect_routing=True
    cache: Optional[Any] = None  # updated KV cache when a cache was passed
    # Training only: detached sums over this forward's tokens of the statistics of each auxiliary
    # loss built from batch statistics (moeut.lm.ForwardState.add_aux_from_stats), by key.
    aux_stats: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)


def valid_positions(attention_mask: Optional[torch.Tensor], input_ids: torch.Tensor,
                    has_cache: bool = False) -> Optional[torch.Tensor]:
    """Check an `attention_mask` (see "Padding contract" above) and return it as a [B, T] bool
    tensor, or None when there is no padding (None, or all ones), so that unpadded calls run
    exactly the unmasked code.

    Raises ValueError (naming `attention_mask`) for a shape other than input_ids' [B, T], values
    other than 0/1, left or interior padding, or padding combined with a KV cache (decoding).
    One host synchronisation when a mask is given."""
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} must equal input_ids' "
                         f"[B, T] = {tuple(input_ids.shape)}")
    m = attention_mask.to(device=input_ids.device)
    if m.dtype != torch.bool:
        if bool(((m != 0) & (m != 1)).any()):
            raise ValueError("attention_mask: values must be 0 (padding) or 1 (real token)")
        m = m != 0
    not_prefix_B = (m[:, 1:] & ~m[:, :-1]).any(-1)  # a real token after a padded one
    all_valid, bad = torch.stack([m.all(), not_prefix_B.any()]).tolist()
    if bad:
        row = int(not_prefix_B.nonzero()[0, 0])
        raise ValueError(f"attention_mask: only right padding is supported (each row 1...1 0...0); "
                         f"row {row} has a real token after padding")
    if all_valid:
        return None
    if has_cache:
        raise ValueError("attention_mask: padding cannot be combined with a KV cache (decoding); "
                         "decode each sequence unpadded")
    return m
