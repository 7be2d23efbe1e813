"""Model configurations and size presets, as plain data.

Nothing here imports Hydra: the training entry point converts its Hydra config into these typed
dataclasses (see `moeut.train_lib.config`). Every preset of SPEC §2 is listed with its parameter
count at vocabulary 8000, which `tests/test_presets.py` checks on the meta device.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

LN_PLACEMENTS = ("peri", "pre", "post")
LAYER_ORDERS = ("abab", "aabb")
CVMM_BACKENDS = ("auto", "triton", "grouped_mm", "torch_loop")
MLP_TYPES = ("sigma_moe", "switch", "deepseek")


def _check(cond: bool, cls: str, field_name: str, msg: str) -> None:
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

    def __post_init__(self) -> None:
        self.validate()

    # -- derived -------------------------------------------------------------------------
    @property
    def n_repeats(self) -> int:
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
        return self.n_layers // self.group_size

    @property
    def n_rotate(self) -> int:
        n = int(self.rotate_fraction * self.d_head)
        return n - n % 2

    def validate(self) -> None:
        c = type(self).__name__
        for name in ("d_model", "n_layers", "n_heads", "d_head", "d_ff", "vocab_size", "group_size"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, c, name, f"must be a positive integer, got {v!r}")
        _check(self.n_layers % self.group_size == 0, c, "group_size",
               f"n_layers={self.n_layers} is not divisible by group_size={self.group_size}")
        _check(0.0 <= self.dropout < 1.0, c, "dropout", f"must be in [0, 1), got {self.dropout}")


# Architectures register here: arch name -> (config class, "module:ModelClass").
# Baselines (SUT, ...) add their own entries in moeut/baselines, which the last line of this
# module imports: the registry is complete whatever was imported first.
ARCHS: Dict[str, tuple] = {
    "moeut": (MoEUTConfig, "moeut.model:MoEUTLM"),
    "dense": (DenseConfig, "moeut.baselines.dense:DenseLM"),
}


def register_arch(name: str, config_cls: type, model_path: str) -> None:
    ARCHS[name] = (config_cls, model_path)


def config_from_dict(d: Dict[str, Any]):
    """Rebuild a model config from `dataclasses.asdict(cfg)` (as stored in checkpoints)."""
    d = dict(d)
    arch = d.get("arch", "moeut")
    if arch not in ARCHS:
        _ensure_baselines_registered()
    if arch not in ARCHS:
        raise ValueError(f"model config: unknown arch {arch!r}; known: {sorted(ARCHS)}")
    cls = ARCHS[arch][0]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"model config for arch {arch!r}: unknown fields {unknown}")
    return cls(**d)


def _ensure_baselines_registered() -> None:
    """Kept for callers: the baselines are registered when this module is imported (last line).
    An ImportError in the baselines is re-raised naming what became unavailable, never swallowed:
    a half-registered registry would silently drop architectures and presets."""
    try:
        import moeut.baselines  # noqa: F401
    except ImportError as e:
        raise ImportError(f"moeut.baselines failed to import ({type(e).__name__}: {e}); the baseline "
                          "architectures (dense, moe_transformer, sut) and their presets are unavailable") from e


# ------------------------------------------------------------------------------------------
# Presets (SPEC §2). Counts are totals at V = 8000 including embedding, head and norms.
# ------------------------------------------------------------------------------------------

def _moeut(d, L, G, H, dh, Ea, NE, K, norm_init, **kw) -> MoEUTConfig:
    return MoEUTConfig(d_model=d, n_layers=L, group_size=G, n_heads=H, d_head=dh, att_n_experts=Ea,
                       att_k=kw.pop("att_k", min(2, Ea)), ff_n_experts=NE, ff_k=K,
                       norm_init=norm_init, **kw)


def _dense(d, L, H, dh, dff, **kw) -> DenseConfig:
    return DenseConfig(d_model=d, n_layers=L, n_heads=H, d_head=dh, d_ff=dff, **kw)


PRESETS: Dict[str, Union[MoEUTConfig, DenseConfig]] = {
    # --- test / CPU sizes [ours] ---
    "tiny": _moeut(64, 4, 2, 2, 16, 4, 16, 4, False, ff_expert_size=32, vocab_size=512),
    "mini": _moeut(128, 4, 2, 2, 32, 4, 32, 4, False, ff_expert_size=64),
    "dense_tiny": _dense(64, 4, 2, 32, 256, vocab_size=512),
    # --- CPU-scale comparison (docs/results.md) [ours]: a d=256, L=8 scale-down with G=2 (R=4),
    # its parameter-matched dense model and its MAC-matched dense model ---
    "cpu_moeut": _moeut(256, 8, 2, 4, 64, 4, 32, 8, False),
    "cpu_dense_params": _dense(256, 8, 4, 64, 838),
    "cpu_dense_macs": _dense(256, 8, 4, 64, 1310),
    # --- MoEUT ladder, SPEC 2.1 ---
    "moeut_44m": _moeut(412, 16, 2, 4, 82, 8, 155, 12, False),
    "moeut_126m": _moeut(768, 18, 2, 4, 96, 10, 254, 12, True),
    "moeut_244m": _moeut(1024, 18, 2, 4, 128, 10, 387, 16, True),
    "moeut_319m": _moeut(1024, 24, 3, 4, 128, 10, 338, 16, True),
    "moeut_728m": _moeut(1280, 36, 4, 5, 128, 13, 467, 20, True),
    "moeut_1040m": _moeut(1536, 36, 4, 6, 128, 12, 565, 24, True),
    # --- parameter-matched dense baselines, SPEC 2.2 ---
    "dense_44m": _dense(412, 16, 10, 41, 2053),
    "dense_126m": _dense(768, 16, 16, 48, 3072),
    "dense_244m": _dense(1024, 18, 16, 64, 4110),
    "dense_319m": _dense(1024, 24, 16, 64, 4110),
    "dense_728m": _dense(1280, 36, 20, 64, 5120),
    "dense_1040m": _dense(1536, 36, 24, 64, 6144),
    # --- group-size ablation at 244M, SPEC 2.3 ---
    "moeut_244m_g1": _moeut(1024, 18, 1, 4, 128, 20, 779, 16, True),
    "moeut_244m_g3": _moeut(1024, 18, 3, 4, 128, 6, 260, 16, True),
    "moeut_244m_g6": _moeut(1024, 18, 6, 4, 128, 3, 128, 16, True),
    "moeut_244m_g9": _moeut(1024, 18, 9, 4, 128, 2, 84, 16, True),
    "moeut_244m_g18": _moeut(1024, 18, 18, 4, 128, 1, 40, 16, True),
    "moeut_244m_aabb": _moeut(1024, 18, 2, 4, 128, 10, 387, 16, True, layer_order="aabb"),
    # --- LayerNorm placement ablations, SPEC 2.5 ---
    "moeut_244m_preln": _moeut(1024, 18, 2, 4, 128, 10, 387, 16, True, ln_placement="pre"),
    "moeut_244m_postln": _moeut(1024, 18, 2, 4, 128, 10, 387, 16, True, ln_placement="post"),
    "moeut_44m_postln": _moeut(412, 16, 2, 4, 82, 8, 155, 12, False, ln_placement="post"),
    # --- K and d_expert ablations at 244M, SPEC 2.5 [verify: sweeps missing; N_E derived] ---
    "moeut_244m_k8": _moeut(1024, 18, 2, 4, 128, 10, 387, 8, True),
    "moeut_244m_k24": _moeut(1024, 18, 2, 4, 128, 10, 387, 24, True),
    "moeut_244m_es256": _moeut(1024, 18, 2, 4, 128, 10, 194, 8, True, ff_expert_size=256),
    "moeut_244m_es512": _moeut(1024, 18, 2, 4, 128, 10, 97, 4, True, ff_expert_size=512),
    "moeut_244m_es1024": _moeut(1024, 18, 2, 4, 128, 10, 48, 2, True, ff_expert_size=1024),
    # --- no-sharing sigma-MoE (G = L, E_att = k_att = 1), SPEC 2.4 / 8.2 ---
    "sigma_moe_44m": _moeut(412, 16, 16, 4, 82, 1, 17, 12, False),
    "sigma_moe_126m": _moeut(768, 18, 18, 4, 96, 1, 26, 12, True),
    "sigma_moe_244m": _moeut(1024, 18, 18, 4, 128, 1, 40, 16, True),
    "sigma_moe_319m": _moeut(1024, 24, 24, 4, 128, 1, 40, 16, True),
    "sigma_moe_728m": _moeut(1280, 36, 36, 5, 128, 1, 50, 20, True),
}

# Expected totals (SPEC §2; [code] for the main ladder, [derived] for ablations).
PRESET_PARAMS: Dict[str, int] = {
    "moeut_44m": 44_345_792, "moeut_126m": 125_669_696, "moeut_244m": 243_326_784,
    "moeut_319m": 318_107_456, "moeut_728m": 727_424_320, "moeut_1040m": 1_040_319_296,
    "dense_44m": 44_544_264, "dense_126m": 125_654_336, "dense_244m": 243_568_700,
    "dense_319m": 319_293_584, "dense_728m": 728_694_080, "dense_1040m": 1_044_300_608,
    "moeut_244m_g1": 243_590_000, "moeut_244m_g3": 243_840_000, "moeut_244m_g6": 243_840_000,
    "moeut_244m_g9": 243_840_000, "moeut_244m_g18": 243_840_000, "moeut_244m_aabb": 243_326_784,
    "sigma_moe_44m": 44_130_000, "sigma_moe_126m": 126_070_000, "sigma_moe_244m": 243_840_000,
    "sigma_moe_319m": 319_660_000, "sigma_moe_728m": 731_230_000,
}

# Paper training settings per size (SPEC 2.1/2.2/4.2/4.3): warm-up steps and clip kappa.
PAPER_TRAIN: Dict[str, Dict[str, float]] = {
    "44m": {"warmup": 0, "grad_clip": 0.1},
    "126m": {"warmup": 4000, "grad_clip": 0.25},
    "244m": {"warmup": 4000, "grad_clip": 0.25},
    "319m": {"warmup": 4000, "grad_clip": 0.25},
    "728m": {"warmup": 4000, "grad_clip": 0.25},
    "1040m": {"warmup": 4000, "grad_clip": 0.25},
}


def get_preset(name: str, **overrides):
    """A fresh copy of preset `name`, with field overrides applied (and validated)."""
    if name not in PRESETS:
        _ensure_baselines_registered()  # baselines add their presets (SUT, DeepSeekMoE, ...) on import
    if name not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    base = PRESETS[name]
    return dataclasses.replace(base, **overrides)


def param_count_formula(cfg) -> int:
    """Closed-form total parameter count (SPEC §2 formulas)."""
    V, d = cfg.vocab_size, cfg.d_model
    if isinstance(cfg, MoEUTConfig) and cfg.mlp_type == "sigma_moe":
        H, dh, Ea, NE, de = cfg.n_heads, cfg.d_head, cfg.att_n_experts, cfg.ff_n_experts, cfg.ff_expert_size
        per = 2 * d * H * dh + 2 * H * Ea * d * dh + 2 * H * Ea * d + 2 * NE * d * de + NE * d + 4 * d
        out_norm = 0 if cfg.ln_placement == "post" else 2 * d  # post-LN has no LN_out
        return V * d + cfg.group_size * per + d * V + V + out_norm
    if isinstance(cfg, DenseConfig):
        H, dh, dff = cfg.n_heads, cfg.d_head, cfg.d_ff
        per = 4 * d * H * dh + 2 * d * dff + dff + d + 4 * d
        return V * d + cfg.group_size * per + d * V + V + 2 * d
    # Switch/DeepSeekMoE MLPs and the baseline architectures (SUT, MoE transformer): closed forms
    # live next to the other accounting formulas.
    from .compute import param_count_formula as _baseline_formula
    return _baseline_formula(cfg)


# Register the baselines' architectures and presets (SPEC §8) now, so that ARCHS and PRESETS do
# not depend on whether something imported moeut.baselines first (issue 14.6: the collected test
# set used to change with import order). At the end of the module on purpose: moeut.baselines
# imports names from here (and moeut.model, which imports this module's classes); every one of
# them is defined by now, and the package __init__ imports this module before any other, so the
# cycle always resolves in this order.
from . import baselines as _baselines  # noqa: E402,F401
