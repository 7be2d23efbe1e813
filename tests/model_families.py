"""One small configuration of every model family (MoEUT and each baseline of SPEC §8), for tests
that must hold for all architectures (precision, padding invariance). Vocabulary 256 keeps them
fast on CPU; geometry comes from the CPU-scale presets of each family."""
from __future__ import annotations

from moeut.registry import build_model, get_preset

V = 256

# family name -> (preset, overrides)
FAMILIES = {
    "moeut": ("tiny", {}),  # σ-MoE MLP + SwitchHead, shared layers, peri-LN
    "moeut_postln": ("tiny", {"ln_placement": "post"}),
    "dense": ("cpu_dense", {}),
    "naive_ut": ("cpu_naive_ut", {}),
    "sigma_moe": ("cpu_sigma_moe", {}),  # no sharing
    "switch": ("cpu_switch", {}),  # dropless
    "switch_capacity": ("cpu_switch", {"moe_capacity_factor": 1.0}),  # drops at CF 1
    "deepseek": ("cpu_deepseek", {}),
    "moeut_switch": ("cpu_moeut_switch", {"moe_capacity_factor": 1.25}),
    "moeut_deepseek": ("cpu_moeut_deepseek", {}),
    "du_every2": ("cpu_du_every2", {}),  # Du et al. placement, capacity factor 2
    "sut": ("cpu_sut", {}),
}


def family_config(name: str):
    preset, overrides = FAMILIES[name]
    return get_preset(preset, vocab_size=V, **overrides)


def build_family(name: str):
    return build_model(family_config(name))


def is_capacity_limited(cfg) -> bool:
    return getattr(cfg, "moe_capacity_factor", 0) > 0 and getattr(cfg, "mlp_type", "") == "switch"


__all__ = ["FAMILIES", "V", "build_family", "family_config", "is_capacity_limited"]
