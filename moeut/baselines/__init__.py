"""Baselines (SPEC §8): dense pre-LN RoPE Transformer and naive UT, σ-MoE without sharing,
Switch/GShard and DeepSeekMoE MLPs (non-shared, every-k-layers, or inside MoEUT's shared layers),
and the Sparse Universal Transformer.

Importing this package registers the extra architectures with `moeut.config.ARCHS` and adds the
baseline presets to `moeut.config.PRESETS` (as data; see docs/baselines.md for the choices):

    arch              config class                 model class
    dense             DenseConfig (moeut.config)   moeut.baselines.dense:DenseLM
    moe_transformer   MoETransformerConfig         moeut.baselines.dense:MoETransformerLM
    sut               SUTConfig                    moeut.baselines.sut:SUTLM
    moeut             MoEUTConfig, mlp_type=switch|deepseek   moeut.model:MoEUTLM (shared layers)
"""
from __future__ import annotations

import dataclasses
from typing import Dict

from ..config import PRESETS, DenseConfig, MoEUTConfig, get_preset, register_arch
from .dense import MoETransformerConfig
from .sut import SUTConfig

register_arch("moe_transformer", MoETransformerConfig, "moeut.baselines.dense:MoETransformerLM")
register_arch("sut", SUTConfig, "moeut.baselines.sut:SUTLM")


def _dense_params(V, d, G, H, dh, dff) -> int:
    return V * d + G * (4 * d * H * dh + 2 * d * dff + dff + d + 4 * d) + d * V + V + 2 * d


def naive_ut_config(target_params: int, n_layers: int, d_model: int, d_head: int = 64,
                    vocab_size: int = 8000) -> DenseConfig:
    """Naive UT (SPEC 8.3 [ours]): ONE shared dense pre-LN RoPE layer applied n_layers times, with
    the given (widened) d_model, H = d_model / d_head heads, and d_ff solved so that the total
    parameter count is as close to `target_params` as an integer d_ff allows."""
    H = d_model // d_head
    fixed = _dense_params(vocab_size, d_model, 1, H, d_head, 0)
    d_ff = round((target_params - fixed) / (2 * d_model + 1))
    if d_ff <= 0:
        raise ValueError(f"naive UT: d_model={d_model} alone exceeds {target_params} parameters")
    return DenseConfig(d_model=d_model, n_layers=n_layers, n_heads=H, d_head=d_head, d_ff=d_ff,
                       vocab_size=vocab_size, group_size=1)


def _variant(base: str, **kw):
    return dataclasses.replace(PRESETS[base], **kw)


BASELINE_PRESETS: Dict[str, object] = {
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

for _name, _cfg in BASELINE_PRESETS.items():
    PRESETS.setdefault(_name, _cfg)

# DeepSeekMoE 2B training recipe (SPEC 8.5), as data for an experiment overlay; not our pipeline's
# defaults (ours: SPEC §4 for every model, so that comparisons differ only in the architecture).
DEEPSEEK_2B_TRAIN = {
    "init_std": 0.006, "adam_betas": (0.9, 0.95), "weight_decay": 0.1, "warmup_steps": 2000,
    "lr": 1.08e-3, "lr_decay": "x0.316 at 80% and 90% of training", "grad_clip": 1.0,
    "batch_sequences": 2048, "seq_len": 2048, "steps": 25_000, "dropout": 0.0,
    "balance_alpha1": 0.01, "device_balance_alpha2": 0.0, "vocab": "8K BPE",
}

# Du et al. training recipe (SPEC 8.7), as data.
DU_TRAIN = {
    "adam_betas": (0.9, 0.95), "adam_eps": 1e-5, "warmup_steps": 2000, "schedule": "cosine to 10% of peak",
    "weight_decay": 0.1, "grad_clip": 1.0, "balance_weight": 0.01, "zloss_weight": 0.001,
    "capacity_factor": 2.0, "tokens_per_param": 20,
}

__all__ = ["BASELINE_PRESETS", "DEEPSEEK_2B_TRAIN", "DU_TRAIN", "MoETransformerConfig", "SUTConfig",
           "naive_ut_config", "get_preset"]
