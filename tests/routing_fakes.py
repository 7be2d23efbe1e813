"""Hand-made routing records for the routing/analysis tests (not a test module itself)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from moeut.outputs import LMOutput, RoutingRecord


def record(l: int, g: int, r: int, mlp_idx, att_v=None, att_o=None, gate=None, in_norm=None,
           update_norm=None) -> RoutingRecord:
    """A RoutingRecord from array-likes; mlp_idx [B, T, K], att_* [B, T, H, k]."""
    t = lambda x, dt: None if x is None else torch.as_tensor(np.asarray(x)).to(dt)  # noqa: E731
    idx = t(mlp_idx, torch.int32)
    return RoutingRecord(l=l, g=g, r=r, mlp_idx=idx,
                         mlp_gate=t(gate, torch.float32) if gate is not None else torch.full(idx.shape, 0.5),
                         att_v_idx=t(att_v, torch.int32), att_o_idx=t(att_o, torch.int32),
                         att_v_gate=None, att_o_gate=None,
                         in_norm=t(in_norm, torch.float32), update_norm=t(update_norm, torch.float32))


def random_sets(rng: np.random.Generator, shape, n_experts: int, k: int) -> np.ndarray:
    """[*shape, k] distinct expert ids per position (like top-k indices)."""
    flat = np.stack([rng.choice(n_experts, size=k, replace=False) for _ in range(int(np.prod(shape)))])
    return flat.reshape(*shape, k)


@dataclass
class FakeMoEConfig:
    """Just the fields the analysis reads (MoEUTConfig names)."""
    group_size: int = 2
    n_layers: int = 4
    ff_n_experts: int = 8
    ff_k: int = 2
    vocab_size: int = 50
    n_heads: int = 2
    att_n_experts: int = 3
    att_k: int = 1
    layer_order: str = "abab"


class FakeMoE(torch.nn.Module):
    """Deterministic routing that depends on the token id and the absolute layer only:
    expert set of token v at layer l = {(v + l*shift + j) mod N_E, j < K}. With shift = 0 every
    token uses the same experts in every layer."""

    def __init__(self, cfg: FakeMoEConfig, shift: int = 0):
        super().__init__()
        self.cfg, self.shift = cfg, shift
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids: torch.Tensor, *, cache=None, collect_routing: bool = False) -> LMOutput:
        c = self.cfg
        B, T = ids.shape
        R = c.n_layers // c.group_size
        logits = torch.zeros(B, T, c.vocab_size)
        recs: Optional[List[RoutingRecord]] = [] if collect_routing else None
        for l in range(c.n_layers):
            r, g = divmod(l, c.group_size)
            if c.layer_order == "aabb":
                g, r = divmod(l, R)
            base = (ids.long() + l * self.shift)[..., None] + torch.arange(c.ff_k)  # [B, T, K]
            idx = (base % c.ff_n_experts).int()
            hv = ((ids.long()[..., None] + torch.arange(c.n_heads)) % c.att_n_experts)[..., None].int()
            if recs is not None:
                recs.append(RoutingRecord(l=l, g=g, r=r, mlp_idx=idx, mlp_gate=torch.full(idx.shape, 0.5),
                                          att_v_idx=hv, att_o_idx=(hv + 1) % c.att_n_experts,
                                          in_norm=torch.full((B, T), float(l + 1)),
                                          update_norm=torch.full((B, T), 0.5 * (l + 1)),
                                          cos_in_out=torch.full((B, T), 0.9)))
        return LMOutput(logits=logits, reg_loss=torch.zeros(()), routing=recs)
