"""The MoEUT model config (SPEC §1) and what every model config shares.

    MoEUTConfig      the architecture of a MoEUT LM (moeut.model.MoEUTLM); ranges as field metadata
    LayerGeometry    derived layer geometry, defined once for every config class: n_repeats (SPEC
                     1.1), init_scale (1.6); RotaryHeads: n_rotate (1.4)
    check_fields     the per-field checks (integer type, declared range) every config's validate runs

The other architectures' config classes live with their models (`moeut.baselines.dense.DenseConfig`
and `.MoETransformerConfig`, `moeut.baselines.sut.SUTConfig`) and use these helpers. A leaf: it
imports only `moeut.validate` (no torch, no model code, no Hydra), so `import moeut` stays light;
the training entry point turns its Hydra config into these dataclasses (`moeut.train_lib.config`,
whose `model.<field>` options are these fields with their types and ranges, through
`moeut.registry.config_fields`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from .validate import at_least, check_value, field_range, in_range, positive

LN_PLACEMENTS = ("peri", "pre", "post")
LAYER_ORDERS = ("abab", "aabb")
CVMM_BACKENDS = ("auto", "triton", "grouped_mm", "torch_loop",
                 # candidates, never the default (docs/kernels.md "Candidates")
                 "triton_buffer", "triton_pad", "triton_pad_buffer", "grouped_mm_pad")
MLP_TYPES = ("sigma_moe", "switch", "deepseek")

# Field metadata shorthands of the config classes (moeut.validate ranges).
SIZE = at_least(1)  # a width, count or k: a positive integer
NON_NEGATIVE = at_least(0)  # a loss weight, a count that may be 0
PROBABILITY = in_range(0, 1, hi_open=True)  # dropout rates


def _check(cond: bool, cls: str, field_name: str, msg: str) -> None:
    """Raise ValueError("<cls>.<field_name>: <msg>") unless `cond` (the config checks' one form)."""
    if not cond:
        raise ValueError(f"{cls}.{field_name}: {msg}")


def _is_int_field(tp: Any) -> bool:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else None
    return tp is int


@functools.lru_cache(maxsize=None)
def _int_fields(cls: type) -> frozenset:
    hints = typing.get_type_hints(cls)
    return frozenset(f.name for f in dataclasses.fields(cls) if _is_int_field(hints.get(f.name)))


def check_fields(cfg: Any) -> None:
    """Check each field of config dataclass `cfg` that declares a range (moeut.validate): an int
    field must hold an int (not a bool), every value must lie in its range; None passes. Raises
    ValueError "<Class>.<field>: must be ..., got <value>" naming the first bad field."""
    c = type(cfg).__name__
    ints = _int_fields(type(cfg))
    for f in dataclasses.fields(cfg):
        rng = field_range(f)
        v = getattr(cfg, f.name)
        if rng is None or v is None:
            continue
        if f.name in ints:
            _check(isinstance(v, int) and not isinstance(v, bool), c, f.name, f"must be an integer, got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{c}.{f.name}: must be a number, got {v!r}")
        check_value(f"{c}.{f.name}", v, rng)


class LayerGeometry:
    """Derived geometry of a config with `n_layers` layer applications of `group_size` unique
    layers (a mixin of every model config class; the one definition of these properties)."""

    ln_placement = "pre"  # a config class with a LayerNorm-placement field overrides this

    @property
    def n_repeats(self) -> int:
        """R = n_layers / group_size: how often the group of G shared layers is applied (SPEC 1.1)."""
        return self.n_layers // self.group_size

    @property
    def init_scale(self) -> float:
        """sigma_scale = sqrt(2/L) for pre-/peri-LN; 1 for post-LN (SPEC 1.6)."""
        return 1.0 if self.ln_placement == "post" else math.sqrt(2.0 / self.n_layers)


class RotaryHeads:
    """Mixin of the configs whose attention heads use RoPE on a fraction of their channels."""

    @property
    def n_rotate(self) -> int:
        """Rotated RoPE channels per head: floor(rotate_fraction*d_head) rounded down to even (SPEC 1.4)."""
        n = int(self.rotate_fraction * self.d_head)
        return n - n % 2


@dataclass
class MoEUTConfig(LayerGeometry, RotaryHeads):
    """Architecture of a MoEUT language model (SPEC §1). Field names follow the official slim
    constructor where one exists (d_model, n_layers, group_size, ff_n_experts, ...). Each numeric
    field declares its range in its metadata; derived: n_repeats, init_scale (LayerGeometry),
    n_rotate (RotaryHeads). Raises ValueError naming the field (validate) on construction."""

    d_model: int = field(metadata=SIZE)
    n_layers: int = field(metadata=SIZE)
    group_size: int = field(metadata=SIZE)
    n_heads: int = field(metadata=SIZE)
    d_head: int = field(metadata=SIZE)
    att_n_experts: int = field(metadata=SIZE)
    ff_n_experts: int = field(metadata=SIZE)
    ff_k: int = field(metadata=SIZE)
    ff_expert_size: int = field(default=128, metadata=SIZE)
    att_k: int = field(default=2, metadata=SIZE)
    vocab_size: int = field(default=8000, metadata=SIZE)
    entropy_reg: float = field(default=0.01, metadata=NON_NEGATIVE)  # gamma, MLP gate (SPEC 1.7)
    att_entropy_reg: float = field(default=0.001, metadata=NON_NEGATIVE)  # delta, V and O gates separately
    norm_init: bool = False  # renorm_keep_std(dim=0) on W_v/W_o; on for sizes >= 126M (SPEC 1.6)
    mlp_gate_renorm: bool = False  # slim-code parity only (training code leaves W_S plain)
    ln_placement: str = "peri"  # peri (paper), pre, post (LN ablations, SPEC 1.2)
    layer_order: str = "abab"  # abab (paper) or aabb (one 244M ablation)
    rope_base: float = field(default=10000.0, metadata=positive())
    rotate_fraction: float = field(default=0.5, metadata=in_range(0, 1, lo_open=True))
    # applied to both branch outputs (training code), 0 in every paper run
    dropout: float = field(default=0.0, metadata=PROBABILITY)
    # gate := -inf before top-k with this probability (training only)
    expert_dropout: float = field(default=0.0, metadata=PROBABILITY)
    # Which MoE MLP the shared layers use. "sigma_moe" is the paper's; the others come from
    # moeut.softmax_moe (Switch/GShard softmax top-k, DeepSeekMoE with shared experts).
    mlp_type: str = "sigma_moe"
    moe_n_shared: int = field(default=0, metadata=NON_NEGATIVE)  # DeepSeekMoE K_s always-on experts (of width ff_expert_size)
    moe_balance_weight: float = field(default=0.01, metadata=NON_NEGATIVE)  # Switch/DeepSeek expert-level balance loss
    moe_zloss_weight: float = field(default=0.001, metadata=NON_NEGATIVE)  # Switch router z-loss weight
    moe_capacity_factor: float = field(default=0.0, metadata=NON_NEGATIVE)  # Switch: 0 = dropless
    cvmm_backend: str = "auto"
    arch: str = "moeut"
    # DeepSeekMoE device-level balance loss (SPEC 8.5): routed experts split into this many
    # consecutive groups ("devices"), weight alpha2 (0 = off, the default at our scale).
    moe_device_groups: int = field(default=1, metadata=SIZE)
    moe_device_balance_weight: float = field(default=0.0, metadata=NON_NEGATIVE)
    # Routing-stability options (docs/training.md "Routing stability"), all off by default.
    # Router z-loss for sigmoid gates (after ST-MoE, Zoph et al. 2022): weight x mean z^2 of the
    # selection logits, per gate application; MLP gate (W_S) and SwitchHead gates (sel_v, sel_o).
    router_zloss: float = field(default=0.0, metadata=NON_NEGATIVE)
    att_router_zloss: float = field(default=0.0, metadata=NON_NEGATIVE)
    # Auxiliary-loss-free bias balancing (Wang et al. 2024; DeepSeek-V3): per-expert bias on the
    # sigma-MoE selection scores for the top-k choice only, updated by this rate after every step.
    bias_balance_rate: float = field(default=0.0, metadata=NON_NEGATIVE)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (run at construction and by `dataclasses.replace`): the declared
        ranges (check_fields), then the choices and cross-field rules. Raises ValueError
        "MoEUTConfig.<field>: <why>" naming the first bad field (SPEC §1, §8.5/8.6 for mlp_type)."""
        check_fields(self)
        c = type(self).__name__
        _check(self.n_layers % self.group_size == 0, c, "group_size",
               f"n_layers={self.n_layers} is not divisible by group_size={self.group_size}")
        _check(self.ff_k <= self.ff_n_experts, c, "ff_k",
               f"K={self.ff_k} active experts > ff_n_experts={self.ff_n_experts}")
        _check(self.att_k <= self.att_n_experts, c, "att_k",
               f"k_att={self.att_k} > att_n_experts={self.att_n_experts}")
        _check(self.ln_placement in LN_PLACEMENTS, c, "ln_placement",
               f"{self.ln_placement!r} is not one of {LN_PLACEMENTS}")
        _check(self.layer_order in LAYER_ORDERS, c, "layer_order",
               f"{self.layer_order!r} is not one of {LAYER_ORDERS}")
        _check(self.cvmm_backend in CVMM_BACKENDS, c, "cvmm_backend",
               f"{self.cvmm_backend!r} is not one of {CVMM_BACKENDS}")
        _check(self.mlp_type in MLP_TYPES, c, "mlp_type", f"{self.mlp_type!r} is not one of {MLP_TYPES}")
        _check(self.moe_n_shared < self.ff_k or self.mlp_type != "deepseek", c, "moe_n_shared",
               f"K_s={self.moe_n_shared} must be < ff_k={self.ff_k}")
        _check(self.mlp_type != "deepseek"
               or (self.ff_n_experts - self.moe_n_shared) % self.moe_device_groups == 0, c, "moe_device_groups",
               f"{self.moe_device_groups} groups do not divide the "
               f"{self.ff_n_experts - self.moe_n_shared} routed experts")
        _check(self.bias_balance_rate == 0 or self.mlp_type == "sigma_moe", c, "bias_balance_rate",
               f"bias balancing is for the sigma-MoE MLP (mlp_type=sigma_moe), not mlp_type={self.mlp_type}")
        _check(self.router_zloss == 0 or self.mlp_type == "sigma_moe", c, "router_zloss",
               f"the sigmoid-gate z-loss is for mlp_type=sigma_moe; {self.mlp_type} has moe_zloss_weight")
