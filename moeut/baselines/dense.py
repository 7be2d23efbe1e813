"""Dense pre-LN RoPE Transformer (SPEC 8.1), its layer-shared "naive UT" form (8.3), and the same
transformer with MoE MLPs in every k-th layer (the Switch/GShard/DeepSeekMoE baselines of 8.5-8.6).

    tokens -> embedding -> for r in 0..R-1: for g in 0..G-1: layer_g -> LN_out -> head (bias, untied)
    layer:  x = x + Att(LN1 x);  x = x + MLP(LN2 x)

- Attention: Q and a fused K/V projection and the output projection, no biases; RoPE on the first
  n_rot channels of each head (1.4); scale 1/sqrt(d_head); causal. KV cache as MoEUT (1.9).
- MLP: Linear(d, d_ff) + bias -> ReLU -> Linear(d_ff, d) + bias.
- Init (1.6, dense): every Linear inside a layer is drawn trunc-normal(+-2, std 1) and rescaled so
  its empirical std equals sqrt(2 / (L * fan_in)); biases 0; LayerNorms 1/0; embedding
  kaiming-normal (std 1/sqrt(d)); head PyTorch default. L = n_layers (layer applications).
- `DenseConfig.group_size` < n_layers shares layers in the "abab" order; group_size = 1 is the
  naive Universal Transformer (one shared layer widened to match parameters, 8.3 [ours]).

`MoETransformerLM` keeps all of this and replaces the MLP of every `moe_every`-th layer (layers
moe_every-1, 2*moe_every-1, ...: Du et al.'s "last FFN of every 4 layers") with a MoE MLP from
`moeut.model.build_moe_mlp` (switch, deepseek: moeut.softmax_moe; or σ-MoE); expert and router
inputs are both LN2(x).

The forward loop, KV cache and masks, RoPE, routing records, auxiliary losses, activation
checkpointing and `generate` are moeut.lm's (`LanguageModel`); this file holds the blocks, the
parameters and their init.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..lm import ForwardState, KVCache, LanguageModel, apply_rope, attend, layer_schedule, rope_angles
from ..model import build_moe_mlp
from ..model_config import (CVMM_BACKENDS, MLP_TYPES, PROBABILITY, SIZE, NON_NEGATIVE, LayerGeometry, RotaryHeads,
                            _check, check_fields)
from ..validate import in_range, positive


@dataclass
class DenseConfig(LayerGeometry, RotaryHeads):
    """Pre-LN RoPE Transformer baseline (SPEC 8.1). group_size < n_layers shares layers
    (group_size=1 is the naive Universal Transformer of SPEC 8.3). Ranges as field metadata;
    n_repeats / n_rotate from LayerGeometry / RotaryHeads. Raises ValueError naming the field."""

    d_model: int = field(metadata=SIZE)
    n_layers: int = field(metadata=SIZE)
    n_heads: int = field(metadata=SIZE)
    d_head: int = field(metadata=SIZE)
    d_ff: int = field(metadata=SIZE)
    vocab_size: int = field(default=8000, metadata=SIZE)
    group_size: Optional[int] = field(default=None, metadata=SIZE)  # None = n_layers (no sharing)
    rope_base: float = field(default=10000.0, metadata=positive())
    rotate_fraction: float = field(default=0.5, metadata=in_range(0, 1, lo_open=True))
    dropout: float = field(default=0.0, metadata=PROBABILITY)
    arch: str = "dense"

    def __post_init__(self) -> None:
        if self.group_size is None:
            self.group_size = self.n_layers
        self.validate()

    def validate(self) -> None:
        """Check every field (run at construction): declared ranges, then group_size divides
        n_layers. Raises ValueError "DenseConfig.<field>: <why>" naming the first bad field
        (SPEC 8.1, 8.3)."""
        check_fields(self)
        _check(self.n_layers % self.group_size == 0, type(self).__name__, "group_size",
               f"n_layers={self.n_layers} is not divisible by group_size={self.group_size}")


@torch.no_grad()
def dense_init_(w: torch.Tensor, n_layers: int) -> None:
    """Trunc-normal(+-2, std 1), then rescaled to empirical std sqrt(2 / (L * fan_in)) (SPEC 1.6)."""
    nn.init.trunc_normal_(w, mean=0.0, std=1.0, a=-2.0, b=2.0)
    fan_in = w.shape[1]
    w.mul_(math.sqrt(2.0 / (n_layers * fan_in)) / w.std())


class DenseAttention(nn.Module):
    """Multi-head causal attention (SPEC 8.1): Q, fused K/V and output projections without biases,
    RoPE on the first n_rot channels of each head (1.4), logits scaled by 1/sqrt(d_head)."""

    def __init__(self, d_model: int, n_heads: int, d_head: int, n_rot: int, rope_base: float):
        super().__init__()
        self.n_heads, self.d_head, self.n_rot, self.rope_base = n_heads, d_head, n_rot, rope_base
        self.q = nn.Linear(d_model, n_heads * d_head, bias=False)
        self.kv = nn.Linear(d_model, 2 * n_heads * d_head, bias=False)  # fused K/V projection
        self.o = nn.Linear(n_heads * d_head, d_model, bias=False)

    def forward(self, u_BTd: torch.Tensor, l: int, cache: Optional[KVCache]) -> torch.Tensor:
        """u_BTd [B, T, d] (LN1(x)) -> [B, T, d]. l: absolute layer application (KV-cache entry);
        cache: KVCache to extend, new positions start at cache.seq_len."""
        B, T, _ = u_BTd.shape
        H, D = self.n_heads, self.d_head
        q_BHTD = self.q(u_BTd).view(B, T, H, D).transpose(1, 2)
        k_BTHD, v_BTHD = self.kv(u_BTd).view(B, T, 2, H, D).unbind(2)
        k_BHTD, v_BHTD = k_BTHD.transpose(1, 2), v_BTHD.transpose(1, 2)
        past = cache.seq_len if cache is not None else 0
        cos, sin = rope_angles(torch.arange(past, past + T, device=u_BTd.device), self.n_rot, self.rope_base)
        q_BHTD, k_BHTD = apply_rope(q_BHTD, cos, sin), apply_rope(k_BHTD, cos, sin)
        o_BHTD = attend(q_BHTD, k_BHTD, v_BHTD, l, cache)  # causal, scale 1/sqrt(D)
        return self.o(o_BHTD.transpose(1, 2).reshape(B, T, H * D))


class DenseMLP(nn.Module):
    """Linear + bias -> ReLU -> Linear + bias. Same call signature as the MoE MLPs."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)

    def forward(self, x_BTd: torch.Tensor, gate_in_BTd: Optional[torch.Tensor] = None, g: int = 0,
                state: Optional[ForwardState] = None) -> torch.Tensor:
        """x_BTd [B, T, d] -> [B, T, d]; the other arguments (the MoE MLPs' call) are unused."""
        return self.down(F.relu(self.up(x_BTd)))


class DenseLayer(nn.Module):
    """Pre-LN layer (SPEC 8.1): x = x + Att(LN1 x); x = x + MLP(LN2 x), dropout on both branches.
    `mlp`: DenseMLP or any MoE MLP with the call mlp(x_BTd, gate_in_BTd, g, state)."""

    def __init__(self, cfg, mlp: nn.Module):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.attention = DenseAttention(cfg.d_model, cfg.n_heads, cfg.d_head, cfg.n_rotate, cfg.rope_base)
        self.ffn = mlp
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, g: int, l: int, state: ForwardState, cache: Optional[KVCache]) -> torch.Tensor:
        """x [B, T, d] -> x [B, T, d] after one application (absolute layer l) of unique layer g."""
        x = x + self.drop(self.attention(self.ln1(x), l, cache))
        u = self.ln2(x)
        return x + self.drop(self.ffn(u, u, g, state))


class DenseLM(LanguageModel):
    """Dense pre-LN RoPE transformer LM (SPEC 8.1); group_size < n_layers shares layers in "abab"
    order (group_size = 1: naive UT, 8.3). Parameters: `embedding`, `layers.{g}`, `out_norm`,
    `lm_head` (untied, with bias). Forward / generate / checkpointing: moeut.lm.LanguageModel;
    reg_loss holds only MoE MLPs' auxiliary losses. Raises ValueError naming the field for an
    invalid config."""

    def __init__(self, cfg: DenseConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        d = cfg.d_model
        self.embedding = nn.Embedding(cfg.vocab_size, d)
        self.layers = nn.ModuleList([DenseLayer(cfg, self._make_mlp(cfg, g)) for g in range(cfg.group_size)])
        self.out_norm = nn.LayerNorm(d, eps=1e-5)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=True)  # untied, with bias
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def _make_mlp(self, cfg, g: int) -> nn.Module:
        return DenseMLP(cfg.d_model, cfg.d_ff)

    def reset_parameters(self) -> None:
        """SPEC 1.6 (dense): layer Linears `dense_init_` with L = n_layers, biases 0, LayerNorms
        1/0, embedding kaiming-normal, head PyTorch default; MoE MLPs by their own rule."""
        L = self.config.n_layers
        nn.init.kaiming_normal_(self.embedding.weight, mode="fan_in", nonlinearity="linear")
        self.lm_head.reset_parameters()
        self.out_norm.reset_parameters()
        for layer in self.layers:
            layer.ln1.reset_parameters()
            layer.ln2.reset_parameters()
            for lin in (layer.attention.q, layer.attention.kv, layer.attention.o):
                dense_init_(lin.weight, L)
            if isinstance(layer.ffn, DenseMLP):
                for lin in (layer.ffn.up, layer.ffn.down):
                    dense_init_(lin.weight, L)
                    nn.init.zeros_(lin.bias)
            else:  # MoE MLPs keep their own (σ-MoE-style) init
                layer.ffn.reset_parameters(self.config)

    def execution_order(self) -> List[Tuple[int, int, int]]:
        """(l, g, r) per layer application: the G unique layers in turn, R times (l = r*G + g)."""
        return layer_schedule(self.config.group_size, self.config.n_repeats, "abab")

    def unique_layer(self, g: int) -> nn.Module:
        """Unique layer g, `layers[g]`."""
        return self.layers[g]

    def embed(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """Token embedding [B, T, d]."""
        return self.embedding(input_ids_BT)

    def head(self, x_BTd: torch.Tensor) -> torch.Tensor:
        """LN_out then the untied head with bias: logits [B, T, V]."""
        return self.lm_head(self.out_norm(x_BTd))


# ------------------------------------------------------------------------------------------
# Non-shared transformer with MoE MLPs in every k-th layer
# ------------------------------------------------------------------------------------------

@dataclass
class MoETransformerConfig(LayerGeometry, RotaryHeads):
    """Dense pre-LN RoPE transformer whose every `moe_every`-th MLP is a MoE (SPEC 8.5-8.6).
    MoE field names equal MoEUTConfig's so the MoE MLP classes take either config. No sharing:
    group_size = n_layers (so n_repeats = 1); pre-LN, so init_scale = sqrt(2 / n_layers). Raises
    ValueError naming the field (validate)."""

    d_model: int = field(metadata=SIZE)
    n_layers: int = field(metadata=SIZE)
    n_heads: int = field(metadata=SIZE)
    d_head: int = field(metadata=SIZE)
    d_ff: int = field(metadata=SIZE)  # width of the dense MLPs in the non-MoE layers
    ff_n_experts: int = field(metadata=SIZE)
    ff_k: int = field(metadata=SIZE)
    ff_expert_size: int = field(metadata=SIZE)
    mlp_type: str = "switch"  # switch | deepseek | sigma_moe
    moe_every: int = field(default=1, metadata=SIZE)  # 1: every layer is MoE; 4: Du et al.'s "Every-4" placement
    moe_n_shared: int = field(default=0, metadata=NON_NEGATIVE)
    moe_balance_weight: float = field(default=0.01, metadata=NON_NEGATIVE)
    moe_zloss_weight: float = field(default=0.001, metadata=NON_NEGATIVE)
    moe_capacity_factor: float = field(default=0.0, metadata=NON_NEGATIVE)
    moe_device_groups: int = field(default=1, metadata=SIZE)
    moe_device_balance_weight: float = field(default=0.0, metadata=NON_NEGATIVE)
    vocab_size: int = field(default=8000, metadata=SIZE)
    rope_base: float = field(default=10000.0, metadata=positive())
    rotate_fraction: float = field(default=0.5, metadata=in_range(0, 1, lo_open=True))
    dropout: float = field(default=0.0, metadata=PROBABILITY)
    expert_dropout: float = field(default=0.0, metadata=PROBABILITY)  # σ-MoE option
    mlp_gate_renorm: bool = False  # σ-MoE option
    cvmm_backend: str = "auto"
    arch: str = "moe_transformer"

    def __post_init__(self) -> None:
        self.validate()

    group_size = property(lambda self: self.n_layers)  # no sharing

    def is_moe_layer(self, l: int) -> bool:
        """Whether layer l (0-based) has a MoE MLP: l = moe_every-1, 2*moe_every-1, ..."""
        return (l + 1) % self.moe_every == 0

    def validate(self) -> None:
        """Raises ValueError naming the field for a value outside its declared range, an unknown
        mlp_type or cvmm_backend, moe_every > n_layers, ff_k > ff_n_experts or moe_n_shared >= ff_k
        (deepseek)."""
        check_fields(self)
        c = type(self).__name__
        _check(self.mlp_type in MLP_TYPES, c, "mlp_type", f"{self.mlp_type!r} is not one of {MLP_TYPES}")
        _check(self.cvmm_backend in CVMM_BACKENDS, c, "cvmm_backend",
               f"{self.cvmm_backend!r} is not one of {CVMM_BACKENDS}")
        _check(self.moe_every <= self.n_layers, c, "moe_every",
               f"moe_every={self.moe_every} > n_layers={self.n_layers}: no layer would be MoE")
        _check(self.ff_k <= self.ff_n_experts, c, "ff_k", f"K={self.ff_k} > ff_n_experts={self.ff_n_experts}")
        _check(self.mlp_type != "deepseek" or self.moe_n_shared < self.ff_k, c, "moe_n_shared",
               f"K_s={self.moe_n_shared} must be < ff_k={self.ff_k}")


class MoETransformerLM(DenseLM):
    """DenseLM (no sharing) whose every `moe_every`-th layer's MLP is a MoE MLP of
    `cfg.mlp_type` (SPEC 8.5-8.7): Switch / DeepSeekMoE (auxiliary losses in reg_loss) or σ-MoE
    (no entropy regulariser here: that is MoEUT's, SPEC 1.7)."""

    def _make_mlp(self, cfg: MoETransformerConfig, g: int) -> nn.Module:
        if not cfg.is_moe_layer(g):
            return DenseMLP(cfg.d_model, cfg.d_ff)
        return build_moe_mlp(cfg)
