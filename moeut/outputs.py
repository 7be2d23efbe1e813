"""The output contract shared by every language model in this package (SPEC 1.8).

Training, evaluation and analysis code consume only these types, so MoEUT and all baselines are
interchangeable behind `model(input_ids, cache=..., collect_routing=...)`.
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


@dataclass
class LMOutput:
    logits: torch.Tensor  # [B, T, V], autocast dtype under autocast
    reg_loss: torch.Tensor  # 0-dim fp32: every auxiliary loss to add to CE with weight 1 (0 in eval)
    reg_terms: Dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars for logging
    routing: Optional[List[RoutingRecord]] = None  # only with collect_routing=True
    cache: Optional[Any] = None  # updated KV cache when a cache was passed
