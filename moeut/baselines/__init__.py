"""Baselines (SPEC §8): dense pre-LN RoPE Transformer and naive UT, σ-MoE without sharing,
Switch/GShard and DeepSeekMoE MLPs (non-shared, every-k-layers, or inside MoEUT's shared layers),
and the Sparse Universal Transformer.

    moeut.baselines.dense    DenseLM (arch "dense", DenseConfig) and
                             MoETransformerLM (arch "moe_transformer", MoETransformerConfig)
    moeut.baselines.sut      SUTLM (arch "sut", SUTConfig)
    moeut.baselines.routers  the Switch/GShard and DeepSeekMoE MLPs (MoEUTConfig.mlp_type)

Their architectures and presets are listed in `moeut.registry` (ARCHS, PRESETS, BASELINE_PRESETS);
importing this package registers nothing and imports no submodule. The baselines' own training
recipes (DeepSeekMoE 2B, Du et al.) are written out in docs/baselines.md.
"""
