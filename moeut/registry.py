"""The one table of architectures and size presets (SPEC §2, §8), and `build_model`.

    ARCHS      arch name -> Arch(config class, "module:ModelClass")
               moeut            MoEUTConfig (moeut.model_config) moeut.model:MoEUTLM
                                (mlp_type sigma_moe | switch | deepseek: the MLP of the shared layers)
               dense            DenseConfig (baselines.dense)  moeut.baselines.dense:DenseLM
               moe_transformer  MoETransformerConfig           moeut.baselines.dense:MoETransformerLM
               sut              SUTConfig                      moeut.baselines.sut:SUTLM
    PRESETS    preset name -> config instance: the MoEUT ladder and its ablations (SPEC 2.1-2.5), the
               parameter-matched dense models (2.2), our CPU sizes, and the baselines of SPEC §8
               (BASELINE_PRESETS, also in PRESETS). The training config offers each as a Hydra
               `model` group entry (moeut.train_lib.config.register_configs; no YAML files).
    config_fields  the fields of every registered config class (the training schema's `model.<field>`).
    PRESET_PARAMS, PAPER_TRAIN   the SPEC's expected totals and per-size warm-up/clip, as data.

Everything is defined when this module has been imported, whatever was imported before it: the
table is written out here, nothing registers itself as a side effect of importing another module.
Users add their own architecture with `register_arch` and their own presets with `register_preset`.

Layer (tools/import_graph.py LAYERS): above the models, below data/eval/checkpoint and training.
Imports the config classes from the model layer (moeut.model_config, moeut.baselines.dense / .sut,
which import the model code); model classes are imported by `build_model` from their
"module:Class" path. Nothing above the model layer is imported (tests/unit/tools/test_import_graph.py).
"""
from __future__ import annotations

import dataclasses
import importlib
import typing
import warnings
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch

from .baselines.dense import DenseConfig, MoETransformerConfig
from .baselines.sut import SUTConfig
from .model_config import MoEUTConfig


# ------------------------------------------------------------------------------------------
# Architectures
# ------------------------------------------------------------------------------------------

class Arch(NamedTuple):
    """One registered architecture: its config dataclass and its model class as "module:Class"
    (imported only when a model is built, so that the table needs no model module)."""

    config_cls: type
    model_path: str


ARCHS: Dict[str, Arch] = {
    "moeut": Arch(MoEUTConfig, "moeut.model:MoEUTLM"),
    "dense": Arch(DenseConfig, "moeut.baselines.dense:DenseLM"),
    "moe_transformer": Arch(MoETransformerConfig, "moeut.baselines.dense:MoETransformerLM"),
    "sut": Arch(SUTConfig, "moeut.baselines.sut:SUTLM"),
}


def register_arch(name: str, config_cls: type, model_path: str) -> None:
    """Add a user architecture: `config_cls` is a dataclass whose `arch` field defaults to `name`
    (so its checkpoints' model_config.json name it), `model_path` is "package.module:ModelClass",
    a class constructed as `ModelClass(cfg)`. Re-registering the same entry is a no-op.
    Raises ValueError naming the argument when one is malformed or `name` is taken by another entry."""
    if not dataclasses.is_dataclass(config_cls) or not isinstance(config_cls, type):
        raise ValueError(f"register_arch({name!r}): config_cls must be a dataclass type, got {config_cls!r}")
    arch_field = {f.name: f for f in dataclasses.fields(config_cls)}.get("arch")
    if arch_field is None or arch_field.default != name:
        raise ValueError(f"register_arch({name!r}): {config_cls.__name__} needs a field `arch: str = {name!r}` "
                         "(checkpoints store it to find the architecture again)")
    module, _, cls_name = model_path.partition(":")
    if not module or not cls_name:
        raise ValueError(f"register_arch({name!r}): model_path must be 'package.module:ModelClass', got {model_path!r}")
    entry = Arch(config_cls, model_path)
    if name in ARCHS and ARCHS[name] != entry:
        raise ValueError(f"register_arch({name!r}): already registered as {ARCHS[name]}")
    ARCHS[name] = entry


def model_class(arch: str) -> type:
    """The model class registered for `arch` (imported on first use). Raises ValueError for an
    unknown arch (naming the known ones) and ImportError naming the registered path when the
    module or class does not exist."""
    if arch not in ARCHS:
        raise ValueError(f"model.arch: unknown architecture {arch!r}; known: {sorted(ARCHS)}")
    path = ARCHS[arch].model_path
    module_name, cls_name = path.split(":")
    try:
        return getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"ARCHS[{arch!r}] = {path!r} cannot be imported: {type(e).__name__}: {e}") from e


def build_model(cfg) -> torch.nn.Module:
    """A freshly initialised model for config `cfg`: the class registered for `cfg.arch`, called
    as `Class(cfg)` (on the current default device, e.g. inside `with torch.device("meta")`).
    Raises ValueError for an unknown arch and TypeError when `cfg` is not the arch's config class."""
    arch = getattr(cfg, "arch", None)
    cls = model_class(arch)
    expected = ARCHS[arch].config_cls
    if not isinstance(cfg, expected):
        raise TypeError(f"build_model: arch {arch!r} takes a {expected.__name__}, got {type(cfg).__name__}")
    return cls(cfg)


def _plain_type(tp: Any) -> Any:
    """Optional[X] -> X; any other annotation unchanged."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def config_fields() -> Dict[str, Tuple[Any, dataclasses.Field]]:
    """{field name: (type, dataclasses.Field)} over the config classes of every registered
    architecture, `arch` left out, sorted by name: the architecture fields the training config
    offers as `model.<field>` (moeut.train_lib.config builds its model schema from this). A name
    used by several classes means one thing: raises ValueError naming the field and both classes
    when their types (Optional ignored) or declared ranges (field metadata) differ."""
    out: Dict[str, Tuple[Any, dataclasses.Field, type]] = {}
    for arch in ARCHS.values():
        cls = arch.config_cls
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "arch":
                continue
            tp = _plain_type(hints.get(f.name, f.type))
            if f.name not in out:
                out[f.name] = (tp, f, cls)
                continue
            tp0, f0, cls0 = out[f.name]
            if tp != tp0 or dict(f.metadata) != dict(f0.metadata):
                raise ValueError(f"config field {f.name!r}: {cls0.__name__} declares {tp0} {dict(f0.metadata)}, "
                                 f"{cls.__name__} {tp} {dict(f.metadata)} (one meaning per field name)")
    return {name: (tp, f) for name, (tp, f, _) in sorted(out.items())}


def config_from_dict(d: Dict[str, Any], source: Optional[str] = None):
    """Rebuild a model config from `dataclasses.asdict(cfg)` (as stored in a checkpoint's
    model_config.json); "arch" selects the class ("moeut" when absent, the oldest checkpoints).
    Options absent from `d` (added after it was written) take their defaults; with `source` (the
    file `d` came from) one warning names them (docs/architecture.md "New options and old checkpoints").
    Raises ValueError naming an unknown arch or the unknown fields, and the config's own
    ValueError (naming the field) for a bad value."""
    d = dict(d)
    arch = d.get("arch", "moeut")
    if arch not in ARCHS:
        raise ValueError(f"model config: unknown arch {arch!r}; known: {sorted(ARCHS)}")
    cls = ARCHS[arch].config_cls
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"model config for arch {arch!r}: unknown fields {unknown}")
    cfg = cls(**d)
    filled = sorted(names - set(d) - {"arch"})
    if source is not None and filled:
        warnings.warn(f"{source} predates " + ", ".join(f"model.{k}" for k in filled) + "; loaded with "
                      + ", ".join(f"model.{k}={getattr(cfg, k)!r}" for k in filled) + " (their defaults)")
    return cfg


# ------------------------------------------------------------------------------------------
# Presets (SPEC §2, §8). Parameter counts are totals at V = 8000 incl. embedding, head, norms.
# ------------------------------------------------------------------------------------------

def _moeut(d, L, G, H, dh, Ea, NE, K, norm_init, **kw) -> MoEUTConfig:
    return MoEUTConfig(d_model=d, n_layers=L, group_size=G, n_heads=H, d_head=dh, att_n_experts=Ea,
                       att_k=kw.pop("att_k", min(2, Ea)), ff_n_experts=NE, ff_k=K,
                       norm_init=norm_init, **kw)


def _dense(d, L, H, dh, dff, **kw) -> DenseConfig:
    return DenseConfig(d_model=d, n_layers=L, n_heads=H, d_head=dh, d_ff=dff, **kw)


def _dense_params(V, d, G, H, dh, dff) -> int:
    # Closed form of DenseLM's total parameters, needed to SOLVE for d_ff below (tests check the
    # resulting presets against moeut.compute.total_params, the counter).
    return V * d + G * (4 * d * H * dh + 2 * d * dff + dff + d + 4 * d) + d * V + V + 2 * d


def naive_ut_config(target_params: int, n_layers: int, d_model: int, d_head: int = 64,
                    vocab_size: int = 8000) -> DenseConfig:
    """Naive UT (SPEC 8.3 [ours]): ONE shared dense pre-LN RoPE layer applied n_layers times, with
    the given (widened) d_model, H = d_model / d_head heads, and d_ff solved so that the total
    parameter count is as close to `target_params` as an integer d_ff allows.
    Raises ValueError when the embedding, head and attention alone exceed `target_params`."""
    H = d_model // d_head
    fixed = _dense_params(vocab_size, d_model, 1, H, d_head, 0)
    d_ff = round((target_params - fixed) / (2 * d_model + 1))
    if d_ff <= 0:
        raise ValueError(f"naive UT: d_model={d_model} alone exceeds {target_params} parameters")
    return DenseConfig(d_model=d_model, n_layers=n_layers, n_heads=H, d_head=d_head, d_ff=d_ff,
                       vocab_size=vocab_size, group_size=1)


_MODEL_PRESETS: Dict[str, Any] = {
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


def _variant(base: str, **kw):
    return dataclasses.replace(_MODEL_PRESETS[base], **kw)


# The baselines of SPEC §8 (choices: docs/baselines.md).
BASELINE_PRESETS: Dict[str, Any] = {
    # --- naive UT (8.3): width chosen [ours]: d_model widened to 1344 / 3840 (multiples of
    # d_head 64), d_ff solved to match the MoEUT preset's total parameters ---
    "naive_ut_44m": naive_ut_config(44_345_792, 16, 1344),
    "naive_ut_244m": naive_ut_config(243_326_784, 18, 3840),
    # --- router ablations at σ-MoE-44M geometry (G = L, E_att = k_att = 1, 17 x 128, K = 12):
    # only the MLP routing differs from sigma_moe_44m [ours] ---
    "switch_44m": _variant("sigma_moe_44m", mlp_type="switch"),
    "switch_244m": _variant("sigma_moe_244m", mlp_type="switch"),
    # DeepSeekMoE (8.5 [ours]): same total experts (mN = 17) and active width (mK = 12, of which
    # K_s = 2 shared), so total params and K*d_expert match σ-MoE-44M (router 15 x d instead of 17 x d).
    "deepseek_44m": _variant("sigma_moe_44m", mlp_type="deepseek", moe_n_shared=2),
    "deepseek_244m": _variant("sigma_moe_244m", mlp_type="deepseek", moe_n_shared=2),
    # --- the MoE MLPs inside MoEUT's shared layers (same experts, K, attention) ---
    "moeut_switch_44m": _variant("moeut_44m", mlp_type="switch"),
    "moeut_deepseek_44m": _variant("moeut_44m", mlp_type="deepseek", moe_n_shared=2),
    "moeut_switch_244m": _variant("moeut_244m", mlp_type="switch"),
    "moeut_deepseek_244m": _variant("moeut_244m", mlp_type="deepseek", moe_n_shared=2),
    # --- Du et al. (8.7) "Every-4" placement on the dense-44M backbone: the last MLP of every 4
    # layers becomes 8 experts of the dense width, top-2, capacity factor 2.0 [ours: size] ---
    "du_every4_44m": MoETransformerConfig(d_model=412, n_layers=16, n_heads=10, d_head=41, d_ff=2053,
                                          ff_n_experts=8, ff_k=2, ff_expert_size=2053, mlp_type="switch",
                                          moe_every=4, moe_capacity_factor=2.0),
    # --- DeepSeekMoE 2B validation model (8.5, appendix Table 7) as data: 9 layers, d 1280, 10 x 128
    # heads, every FFN a MoE of 1 shared + 63 routed experts of 0.25 x FFN (N 16, m 4 -> 64 total;
    # K 2 -> mK = 8 active incl. the shared one). [verify] the standard FFN width is not in the
    # SPEC: we take 4d = 5120 with a 2-matrix ReLU expert (1280 wide), which reproduces the stated
    # 2.0B total / 0.3B activated; DeepSeekMoE itself uses SwiGLU experts. Vocabulary 8K. ---
    "deepseek_2b": MoETransformerConfig(d_model=1280, n_layers=9, n_heads=10, d_head=128, d_ff=5120,
                                        ff_n_experts=64, ff_k=8, ff_expert_size=1280, mlp_type="deepseek",
                                        moe_n_shared=1, moe_every=1, moe_balance_weight=0.01,
                                        moe_zloss_weight=0.0),
    # --- SUT (2.6 / 8.4) ---
    "sut_44m": SUTConfig(d_model=412, n_layers=16, ff_n_experts=152, ff_expert_size=256, ff_k=2,
                         att_n_experts=24, att_expert_size=256, att_k=2, d_head=64,
                         mim_weight=0.001, act_weight=0.01),
    "sut_244m": SUTConfig(d_model=1024, n_layers=18, ff_n_experts=192, ff_expert_size=512, ff_k=4,
                          att_n_experts=21, att_expert_size=512, att_k=2, d_head=128,
                          mim_weight=0.01, act_weight=0.01, sample_topk=1),
    # --- CPU scale (d 128, 4 layers, vocab 8000; tests shrink the vocabulary) [ours] ---
    "cpu_dense": DenseConfig(d_model=128, n_layers=4, n_heads=4, d_head=32, d_ff=512),
    "cpu_naive_ut": DenseConfig(d_model=192, n_layers=4, n_heads=6, d_head=32, d_ff=1024, group_size=1),
    "cpu_sigma_moe": _variant("mini", group_size=4, att_n_experts=1, att_k=1, ff_n_experts=16, ff_k=4),
    "cpu_switch": _variant("mini", group_size=4, att_n_experts=1, att_k=1, ff_n_experts=16, ff_k=2,
                           mlp_type="switch"),
    "cpu_deepseek": _variant("mini", group_size=4, att_n_experts=1, att_k=1, ff_n_experts=16, ff_k=4,
                             mlp_type="deepseek", moe_n_shared=1),
    "cpu_moeut_switch": _variant("mini", mlp_type="switch"),
    "cpu_moeut_deepseek": _variant("mini", mlp_type="deepseek", moe_n_shared=1),
    "cpu_du_every2": MoETransformerConfig(d_model=128, n_layers=4, n_heads=4, d_head=32, d_ff=512,
                                          ff_n_experts=4, ff_k=2, ff_expert_size=512, mlp_type="switch",
                                          moe_every=2, moe_capacity_factor=2.0),
    "cpu_sut": SUTConfig(d_model=128, n_layers=4, ff_n_experts=16, ff_expert_size=64, ff_k=2,
                         att_n_experts=4, att_expert_size=64, att_k=2, d_head=32, max_relative_positions=16),
}

assert not set(_MODEL_PRESETS) & set(BASELINE_PRESETS), "a preset name is defined twice"
PRESETS: Dict[str, Any] = {**_MODEL_PRESETS, **BASELINE_PRESETS}

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


def register_preset(name: str, cfg) -> None:
    """Add a user preset `name` (a config instance of a registered architecture). Then
    `get_preset(name)` and the training config's `model.preset=<name>` find it (in the process that
    registered it; `model=<name>` too once `moeut.train_lib.config.register_configs()` runs after it,
    as train.py and moeut.sweep do before composing).
    Raises ValueError when `name` is taken or `cfg.arch` is not registered, TypeError when `cfg`
    is not that arch's config class."""
    if name in PRESETS:
        raise ValueError(f"register_preset({name!r}): a preset of that name exists")
    arch = getattr(cfg, "arch", None)
    if arch not in ARCHS:
        raise ValueError(f"register_preset({name!r}): unknown arch {arch!r}; known: {sorted(ARCHS)} "
                         "(register_arch first)")
    if not isinstance(cfg, ARCHS[arch].config_cls):
        raise TypeError(f"register_preset({name!r}): arch {arch!r} takes a {ARCHS[arch].config_cls.__name__}, "
                        f"got {type(cfg).__name__}")
    PRESETS[name] = cfg


def get_preset(name: str, **overrides):
    """A fresh copy of preset `name` with field `overrides` applied and validated (the config's
    checks run again). Raises ValueError "model.preset: unknown preset ..." listing the known
    presets, TypeError for an override that is not a field, or the config's ValueError naming
    the bad field."""
    if name not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


__all__ = ["ARCHS", "Arch", "BASELINE_PRESETS", "PAPER_TRAIN", "PRESETS", "PRESET_PARAMS", "build_model",
           "config_from_dict", "get_preset", "model_class", "naive_ut_config", "register_arch",
           "register_preset"]
