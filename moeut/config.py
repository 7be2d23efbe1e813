"""The model config dataclasses of MoEUT (SPEC §1) and the dense baseline (SPEC 8.1), and their
checks.

A leaf module: it imports nothing from `moeut` (so `import moeut.config` loads no model code) and
nothing from Hydra (the training entry point converts its Hydra config into these dataclasses, see
`moeut.train_lib.config`). The size presets, the table of architectures (arch name -> config class
and model class) and `build_model` live in `moeut.registry`; the other architectures' config
classes live next to their models (`moeut.baselines.dense.MoETransformerConfig`,
`moeut.baselines.sut.SUTConfig`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from .validate import at_least

LN_PLACEMENTS = ("peri", "pre", "post")
LAYER_ORDERS = ("abab", "aabb")
CVMM_BACKENDS = ("auto", "triton", "grouped_mm", "torch_loop",
                 # candidates, never the default (docs/kernels.md "Candidates")
                 "triton_buffer", "triton_pad", "triton_pad_buffer", "grouped_mm_pad")
MLP_TYPES = ("sigma_moe", "switch", "deepseek")


def _check(cond: bool, cls: str, field_name: str, msg: str) -> None:
    """Raise ValueError("<cls>.<field_name>: <msg>") unless `cond` (the config checks' one form)."""
    if not cond:
        raise ValueError(f"{cls}.{field_name}: {msg}")


@dataclass
class MoEUTConfig:
    """Architecture of a MoEUT language model (SPEC §1). Field names follow the official slim
    constructor where one exists (d_model, n_layers, group_size, ff_n_experts, ...)."""

    d_model: int
    n_layers: int
    group_size: int
    n_heads: int
    d_head: int
    att_n_experts: int
    ff_n_experts: int
    ff_k: int
    ff_expert_size: int = 128
    att_k: int = 2
    vocab_size: int = 8000
    entropy_reg: float = 0.01  # gamma, MLP gate (SPEC 1.7)
    att_entropy_reg: float = 0.001  # delta, V and O gates separately
    norm_init: bool = False  # renorm_keep_std(dim=0) on W_v/W_o; on for sizes >= 126M (SPEC 1.6)
    mlp_gate_renorm: bool = False  # slim-code parity only (training code leaves W_S plain)
    ln_placement: str = "peri"  # peri (paper), pre, post (LN ablations, SPEC 1.2)
    layer_order: str = "abab"  # abab (paper) or aabb (one 244M ablation)
    rope_base: float = 10000.0
    rotate_fraction: float = 0.5
    dropout: float = 0.0  # applied to both branch outputs (training code), 0 in every paper run
    expert_dropout: float = 0.0  # gate := -inf before top-k with this probability (training only)
    # Which MoE MLP the shared layers use. "sigma_moe" is the paper's; the others come from
    # moeut.baselines.routers (Switch/GShard softmax top-k, DeepSeekMoE with shared experts).
    mlp_type: str = "sigma_moe"
    moe_n_shared: int = 0  # DeepSeekMoE K_s always-on experts (of width ff_expert_size)
    moe_balance_weight: float = 0.01  # Switch/DeepSeek expert-level balance loss weight
    moe_zloss_weight: float = 0.001  # Switch router z-loss weight
    moe_capacity_factor: float = 0.0  # Switch: 0 = dropless
    cvmm_backend: str = "auto"
    arch: str = "moeut"
    # DeepSeekMoE device-level balance loss (SPEC 8.5): routed experts split into this many
    # consecutive groups ("devices"), weight alpha2 (0 = off, the default at our scale).
    moe_device_groups: int = 1
    moe_device_balance_weight: float = 0.0
    # Routing-stability options (docs/training.md "Routing stability"), all off by default.
    # Router z-loss for sigmoid gates (after ST-MoE, Zoph et al. 2022): weight x mean z^2 of the
    # selection logits, per gate application; MLP gate (W_S) and SwitchHead gates (sel_v, sel_o).
    router_zloss: float = field(default=0.0, metadata=at_least(0))
    att_router_zloss: float = field(default=0.0, metadata=at_least(0))
    # Auxiliary-loss-free bias balancing (Wang et al. 2024; DeepSeek-V3): per-expert bias on the
    # sigma-MoE selection scores for the top-k choice only, updated by this rate after every step.
    bias_balance_rate: float = field(default=0.0, metadata=at_least(0))

    def __post_init__(self) -> None:
        self.validate()

    # -- derived -------------------------------------------------------------------------
    @property
    def n_repeats(self) -> int:
        """R = n_layers / group_size: how often the group of G shared layers is applied (SPEC 1.1)."""
        return self.n_layers // self.group_size

    @property
    def n_rotate(self) -> int:
        """Rotated RoPE channels per head: floor(fraction*d_head) rounded down to even (SPEC 1.4)."""
        n = int(self.rotate_fraction * self.d_head)
        return n - n % 2

    @property
    def init_scale(self) -> float:
        """sigma_scale = sqrt(2/L) for pre-/peri-LN; 1 for post-LN (SPEC 1.6)."""
        return 1.0 if self.ln_placement == "post" else math.sqrt(2.0 / self.n_layers)

    def validate(self) -> None:
        """Check every field (run at construction and by `dataclasses.replace`). Raises ValueError
        "MoEUTConfig.<field>: <why>" naming the first bad field (SPEC §1, §8.5/8.6 for mlp_type)."""
        c = type(self).__name__
        for name in ("d_model", "n_layers", "group_size", "n_heads", "d_head", "att_n_experts",
                     "ff_n_experts", "ff_k", "ff_expert_size", "att_k", "vocab_size"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, c, name, f"must be a positive integer, got {v!r}")
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
        _check(0.0 <= self.dropout < 1.0, c, "dropout", f"must be in [0, 1), got {self.dropout}")
        _check(0.0 <= self.expert_dropout < 1.0, c, "expert_dropout",
               f"must be in [0, 1), got {self.expert_dropout}")
        _check(0.0 < self.rotate_fraction <= 1.0, c, "rotate_fraction", "must be in (0, 1]")
        _check(self.entropy_reg >= 0 and self.att_entropy_reg >= 0, c, "entropy_reg",
               "regulariser weights must be >= 0")
        _check(0 <= self.moe_n_shared < self.ff_k or self.mlp_type != "deepseek", c, "moe_n_shared",
               f"K_s={self.moe_n_shared} must be < ff_k={self.ff_k}")
        _check(self.moe_balance_weight >= 0 and self.moe_zloss_weight >= 0, c, "moe_balance_weight",
               "MoE auxiliary loss weights must be >= 0")
        _check(self.moe_capacity_factor >= 0, c, "moe_capacity_factor",
               f"must be >= 0 (0 = dropless), got {self.moe_capacity_factor}")
        _check(isinstance(self.moe_device_groups, int) and self.moe_device_groups >= 1, c, "moe_device_groups",
               f"must be a positive integer, got {self.moe_device_groups!r}")
        _check(self.mlp_type != "deepseek"
               or (self.ff_n_experts - self.moe_n_shared) % self.moe_device_groups == 0, c, "moe_device_groups",
               f"{self.moe_device_groups} groups do not divide the "
               f"{self.ff_n_experts - self.moe_n_shared} routed experts")
        _check(self.moe_device_balance_weight >= 0, c, "moe_device_balance_weight", "must be >= 0")
        for name in ("router_zloss", "att_router_zloss", "bias_balance_rate"):
            _check(getattr(self, name) >= 0, c, name, f"must be >= 0, got {getattr(self, name)}")
        _check(self.bias_balance_rate == 0 or self.mlp_type == "sigma_moe", c, "bias_balance_rate",
               f"bias balancing is for the sigma-MoE MLP (mlp_type=sigma_moe), not mlp_type={self.mlp_type}")
        _check(self.router_zloss == 0 or self.mlp_type == "sigma_moe", c, "router_zloss",
               f"the sigmoid-gate z-loss is for mlp_type=sigma_moe; {self.mlp_type} has moe_zloss_weight")


@dataclass
class DenseConfig:
    """Pre-LN RoPE Transformer baseline (SPEC 8.1). group_size < n_layers shares layers
    (group_size=1 is the naive Universal Transformer of SPEC 8.3)."""

    d_model: int
    n_layers: int
    n_heads: int
    d_head: int
    d_ff: int
    vocab_size: int = 8000
    group_size: Optional[int] = None  # None = n_layers (no sharing)
    rope_base: float = 10000.0
    rotate_fraction: float = 0.5
    dropout: float = 0.0
    arch: str = "dense"

    def __post_init__(self) -> None:
        if self.group_size is None:
            self.group_size = self.n_layers
        self.validate()

    @property
    def n_repeats(self) -> int:
        """R = n_layers / group_size applications of the group of shared layers (1 = no sharing)."""
        return self.n_layers // self.group_size

    @property
    def n_rotate(self) -> int:
        """Rotated RoPE channels per head: floor(fraction*d_head) rounded down to even (SPEC 1.4)."""
        n = int(self.rotate_fraction * self.d_head)
        return n - n % 2

    def validate(self) -> None:
        """Check every field (run at construction). Raises ValueError "DenseConfig.<field>: <why>"
        naming the first bad field (SPEC 8.1, 8.3)."""
        c = type(self).__name__
        for name in ("d_model", "n_layers", "n_heads", "d_head", "d_ff", "vocab_size", "group_size"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, c, name, f"must be a positive integer, got {v!r}")
        _check(self.n_layers % self.group_size == 0, c, "group_size",
               f"n_layers={self.n_layers} is not divisible by group_size={self.group_size}")
        _check(0.0 <= self.dropout < 1.0, c, "dropout", f"must be in [0, 1), got {self.dropout}")
