"""Baselines (SPEC §8): dense pre-LN RoPE Transformer and naive UT, σ-MoE without sharing,
Switch/GShard and DeepSeekMoE MLPs (non-shared, every-k-layers, or inside MoEUT's shared layers),
and the Sparse Universal Transformer.

    moeut.baselines.dense    DenseLM (arch "dense", DenseConfig) and
                             MoETransformerLM (arch "moe_transformer", MoETransformerConfig)
    moeut.baselines.sut      SUTLM (arch "sut", SUTConfig)
    moeut.baselines.routers  the Switch/GShard and DeepSeekMoE MLPs (MoEUTConfig.mlp_type)

Their architectures and presets are listed in `moeut.registry` (ARCHS, PRESETS, BASELINE_PRESETS);
importing this package registers nothing and imports no submodule. What stays here are the
baselines' own training recipes, as data for experiment overlays (see docs/baselines.md).
"""
from __future__ import annotations

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

__all__ = ["DEEPSEEK_2B_TRAIN", "DU_TRAIN"]
