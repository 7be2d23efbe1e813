"""The SPEC §2 closed-form parameter counts, written out independently of the model modules: the
reference the tests check `moeut.compute.total_params` (the package's one counter, which counts a
built model's tensors) and every preset against. Test-only on purpose: a second counter in the
package would be a second answer to the same question.

Totals include embedding V*d, untied head d*V + V (bias), the final LayerNorm (2d, not with post-LN)
and per shared layer: attention, MLP and two LayerNorms (4d). G = group_size unique layers.
"""
from __future__ import annotations


def _arch(cfg) -> str:
    return getattr(cfg, "arch", "moeut")


def _mlp_params(cfg) -> int:
    """One MoE MLP: σ-MoE / Switch: experts (keys + values) + router N_E x d; DeepSeekMoE: experts
    (shared incl.) + centroids of the routed ones only (SPEC 1.5, 8.5, 8.6)."""
    d, NE, De = cfg.d_model, cfg.ff_n_experts, cfg.ff_expert_size
    if cfg.mlp_type == "deepseek":
        return 2 * NE * d * De + (NE - cfg.moe_n_shared) * d
    return 2 * NE * d * De + NE * d


def param_count_formula(cfg) -> int:
    """Closed-form total parameter count of `cfg` (every architecture of moeut.registry.ARCHS).
    Raises ValueError for another arch."""
    V, d = cfg.vocab_size, cfg.d_model
    arch = _arch(cfg)
    if arch == "moeut":  # SPEC 2.1: q, k (dense) + v, o (E_att experts each) + V/O gates + MLP + LNs
        H, dh, Ea = cfg.n_heads, cfg.d_head, cfg.att_n_experts
        per = 2 * d * H * dh + 2 * H * Ea * d * dh + 2 * H * Ea * d + _mlp_params(cfg) + 4 * d
        out_norm = 0 if cfg.ln_placement == "post" else 2 * d  # post-LN has no LN_out
        return V * d + cfg.group_size * per + d * V + V + out_norm
    if arch in ("dense", "moe_transformer"):  # SPEC 2.2 / 8.1: q, fused kv, o; MLP with biases
        H, dh = cfg.n_heads, cfg.d_head
        att = 4 * d * H * dh + 4 * d
        dense_mlp = 2 * d * cfg.d_ff + cfg.d_ff + d
        total = V * d + d * V + V + 2 * d
        for g in range(cfg.group_size):
            moe = arch == "moe_transformer" and cfg.is_moe_layer(g)
            total += att + (_mlp_params(cfg) if moe else dense_mlp)
        return total
    if arch == "sut":  # SPEC 2.6 / 8.4: MoA + MoE MLP with routers, ACT halting unit, one layer
        A, Ea, NE, De = cfg.att_expert_size, cfg.att_n_experts, cfg.ff_n_experts, cfg.ff_expert_size
        router = lambda E: d * d + d + E * d  # Linear(d,d)+bias, Linear(d,E) no bias
        att = 2 * d * A + 2 * Ea * d * A + router(Ea) + (cfg.max_relative_positions + 1) * cfg.d_head
        mlp = NE * (2 * d * De + De + d) + router(NE)
        halt = d * d + d + 2 * d
        return V * d + att + mlp + 4 * d + halt + d * V + V
    raise ValueError(f"param_count_formula: unknown arch {arch!r}")
