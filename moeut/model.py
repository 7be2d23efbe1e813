"""The MoEUT language model (SPEC §1), top to bottom.

    tokens -> embedding -> for r in 0..R-1: for g in 0..G-1: layer_g -> LN_out -> head (bias, untied)

Each unique layer is a peri-LayerNorm block (SPEC 1.2): only what feeds a sigmoid or a softmax is
normalised (Q, K, the attention gates, the MLP gate); values, expert inputs, branch outputs and the
residual stream never are.

    u = LN1(x);  x = x + SwitchHead(q,k,gates <- u; values <- x)
                 x = x + SigmaMoE(gate <- LN2(x); experts <- x)

Parameter names equal the official slim implementation's (`transformer.layers.{g}.attention.v`,
`...ffn.keys`, ...), so official checkpoints load by name (see moeut/official.py).

The scaffolding shared with the baselines (forward loop, KV cache and masks, RoPE, `ForwardState`,
the regulariser hook, activation checkpointing, `generate`) is `moeut.lm`; this file holds only
what is MoEUT's own. `KVCache`, `ForwardState` and `generate` are re-exported here.

Shapes: B batch, T time, d model width, H heads, D head width, E experts, K/k active experts,
N = B*T tokens, S = N*k slots. Suffixes name a tensor's shape (x_BTd, idx_BTHk).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model_config import MoEUTConfig
from .kernels.cvmm import cvmm, make_plan
from .lm import (ForwardState, KVCache, LanguageModel, StepTotals, apply_rope, attend, generate, layer_schedule,
                 rope_angles)
from .outputs import LMOutput
from .softmax_moe import DeepSeekMoE, SwitchMoE

__all__ = ["MoEUTLM", "MoEUTLayer", "SigmaMoE", "SwitchHeadAttention", "Transformer", "build_moe_mlp",
           "entropy_reg_term", "gate_zloss", "knock_out", "sigmoid_topk", "renorm_keep_std", "renorm_rows",
           # shared scaffolding (moeut.lm), re-exported for existing imports
           "ForwardState", "KVCache", "apply_rope", "generate", "rope_angles"]


# ------------------------------------------------------------------------------------------
# Initialisation helpers (SPEC 1.6, official semantics)
# ------------------------------------------------------------------------------------------

@torch.no_grad()
def renorm_keep_std(w: torch.Tensor, dim: int) -> None:
    """Normalise along `dim`, then restore the tensor's global std."""
    std = w.std()
    w.div_(w.norm(dim=dim, keepdim=True))
    w.mul_(std / w.std())


@torch.no_grad()
def renorm_rows(w: torch.Tensor) -> None:
    """Unit-norm rows scaled back by each row's own std over the global std (≈ no-op, kept for parity)."""
    std_rows = w.std(dim=-1, keepdim=True)
    w.div_(w.norm(dim=-1, keepdim=True))
    w.mul_(std_rows / w.std())


# ------------------------------------------------------------------------------------------
# The entropy regulariser (SPEC 1.7); its inputs are collected by moeut.lm.ForwardState
# ------------------------------------------------------------------------------------------

def entropy_reg_term(lse_list: List[torch.Tensor], T: Union[int, torch.Tensor]) -> torch.Tensor:
    """-mean over (b[, h]) of H(p) with p the per-sequence marginal over time and repetitions.
    T: tokens per sequence, or [B] real-token counts of a padded batch (rows without any real
    token are left out of the mean)."""
    R = len(lse_list)
    lse_RBE = torch.stack(lse_list, 0)
    if isinstance(T, torch.Tensor):
        shape = (-1,) + (1,) * (lse_RBE.dim() - 2)  # [B, (1,) 1] against [B, (H,) E]
        has_tokens = (T > 0).view(shape)
        lse_RBE = torch.where(has_tokens, lse_RBE, torch.zeros_like(lse_RBE))  # any finite value
        T = T.clamp_min(1).to(lse_RBE.dtype).view(shape)
        m_BE = lse_RBE.detach().amax(0)
        log_p = m_BE + (lse_RBE - m_BE).exp().sum(0).log() - torch.log(T * R)
        entropy = -(log_p.exp() * log_p).sum(-1)  # [B, (H)]
        w = has_tokens.view(has_tokens.shape[:-1]).expand_as(entropy).to(entropy.dtype)
        return -(entropy * w).sum() / w.sum().clamp_min(1)
    # logsumexp over repetitions, written out with a detached max shift. Equivalent to
    # torch.logsumexp(lse_RBE, 0), but torch 2.13's inductor (CPU) miscompiles the gradient of a
    # logsumexp over stacked logsumexp results (>100% relative error; eager and aot_eager agree).
    m_BE = lse_RBE.detach().amax(0)
    log_p = m_BE + (lse_RBE - m_BE).exp().sum(0).log() - math.log(T * R)  # [B, (H,) E]
    entropy = -(log_p.exp() * log_p).sum(-1)
    return -entropy.mean()


# ------------------------------------------------------------------------------------------
# Gating shared by the MLP and attention: sigmoid, top-k without gradient, values with gradient
# ------------------------------------------------------------------------------------------

def sigmoid_topk(z: torch.Tensor, k: int, training: bool, expert_dropout: float,
                 choice_bias: Optional[torch.Tensor] = None):
    """(idx, gate) of the k largest sigmoid(z) along the last dim (SPEC 1.3, 1.5): z [..., E] logits;
    idx [..., k] int64 chosen without gradient (in training, expert dropout sets each expert's
    score to -inf with probability `expert_dropout` for the choice only); gate [..., k] = sigmoid(z)
    at idx, with gradient. choice_bias [E]: added to the scores for the choice only (bias
    balancing, `SigmaMoE`); the gate values stay sigmoid(z)."""
    s = torch.sigmoid(z)
    with torch.no_grad():
        s_sel = s if choice_bias is None else s + choice_bias.to(s.dtype)
        if training and expert_dropout > 0:
            drop = torch.rand_like(s) < expert_dropout
            s_sel = s_sel.masked_fill(drop, float("-inf"))
        idx = s_sel.topk(k, dim=-1, sorted=False).indices
    return idx, s.gather(-1, idx)


def gate_zloss(z: torch.Tensor, valid_BT: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of z^2 over the real tokens (and heads, experts) of one sigmoid-gate application:
    z [B, T, E] or [B, T, H, E] selection logits, valid_BT [B, T] bool real positions or None
    (nothing padded). 0-dim, fp32 (fp64 for fp64 logits). The router z-loss for sigmoid gates (docs/training.md "Routing
    stability"): a per-token mean, so a step split into micro-batches of equal size gets the
    full batch's value and gradient."""
    z2 = z.to(torch.promote_types(z.dtype, torch.float32)).pow(2)  # fp32 at least
    if valid_BT is None:
        return z2.mean()
    w = valid_BT.view(*valid_BT.shape, *([1] * (z2.dim() - 2))).to(z2.dtype)
    per_token = z2[0, 0].numel()
    return (z2 * w).sum() / (w.sum() * per_token).clamp_min(1)


def knock_out(z: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor, mask: Optional[torch.Tensor], k: int,
              training: bool, expert_dropout: float,
              choice_bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(idx, gate) of `sigmoid_topk` with the experts of `mask` knocked out (the causal knock-out
    analysis, docs/analysis.md): z [..., E] the gate logits, idx/gate [..., k] the selection without
    knock-out, mask a bool tensor broadcastable to z (True = knocked out) or None (idx, gate
    returned as they are). Positions that selected a knocked-out expert choose again among the
    others (its logit set to -inf before the top-k; if fewer than k are left, the knocked-out ones
    fill up with gate sigmoid(-inf) = 0, so they contribute nothing); every other position keeps
    its selection exactly, so knocking out an expert no position selects changes nothing.
    choice_bias: as in `sigmoid_topk` (bias balancing), used for the new choice too."""
    if mask is None:
        return idx, gate
    hit = mask.expand_as(z).gather(-1, idx).any(-1, keepdim=True)  # [..., 1]
    idx_ko, gate_ko = sigmoid_topk(z.masked_fill(mask, float("-inf")), k, training, expert_dropout,
                                   choice_bias=choice_bias)
    return torch.where(hit, idx_ko, idx), torch.where(hit, gate_ko, gate)


# ------------------------------------------------------------------------------------------
# σ-MoE MLP (SPEC 1.5)
# ------------------------------------------------------------------------------------------

class SigmaMoE(nn.Module):
    """σ-MoE MLP (SPEC 1.5): y = sum over the top-K experts e of sigmoid(W_S u)_e * W2_e ReLU(W1_e x).

    Parameters (official names): `expert_sel` [E, d] (gate W_S), `keys` [E, d, d_expert] (W1),
    `values` [E, d_expert, d] (W2). Experts run through the cvmm kernel (moeut.kernels.cvmm)."""

    def __init__(self, cfg: MoEUTConfig):
        super().__init__()
        d, E, De = cfg.d_model, cfg.ff_n_experts, cfg.ff_expert_size
        self.n_experts, self.k, self.expert_dropout = E, cfg.ff_k, cfg.expert_dropout
        self.backend = cfg.cvmm_backend
        # {"mlp": bool mask broadcastable to [B, T, E]} of knocked-out experts (see `knock_out`); None = none
        self.knockout: Optional[Dict[str, torch.Tensor]] = None
        self.expert_sel = nn.Parameter(torch.empty(E, d))  # gate W_S
        self.keys = nn.Parameter(torch.empty(E, d, De))  # W1
        self.values = nn.Parameter(torch.empty(E, De, d))  # W2
        self.zloss = getattr(cfg, "router_zloss", 0.0)
        self.bias_balance_rate = getattr(cfg, "bias_balance_rate", 0.0)
        if self.bias_balance_rate > 0:
            # Bias balancing (Wang et al. 2024; DeepSeek-V3): a per-expert bias on the selection
            # scores for the top-k choice only, saved with the weights; and the selections of the
            # training forwards since the last update (a plain attribute, not a buffer: DDP would
            # overwrite every rank's counts with rank 0's), read by `update_selection_bias`.
            self.register_buffer("selection_bias", torch.zeros(E))
            self.load_counts: Optional[torch.Tensor] = None

    def reset_parameters(self, cfg: MoEUTConfig) -> None:
        """SPEC 1.6: W_S and W1 N(0, init_scale / sqrt(d)); W2 N(0, init_scale / sqrt(E * d_expert))."""
        sc, d = cfg.init_scale, cfg.d_model
        nn.init.normal_(self.expert_sel, 0, sc / math.sqrt(d))
        if cfg.mlp_gate_renorm:  # slim-code parity only (SPEC 1.6 discrepancy)
            renorm_keep_std(self.expert_sel, dim=1)
        nn.init.normal_(self.keys, 0, sc / math.sqrt(d))
        # Fan-in over *all* experts, not K*d_expert (SPEC 1.6).
        nn.init.normal_(self.values, 0, sc / math.sqrt(cfg.ff_n_experts * cfg.ff_expert_size))

    def forward(self, x_BTd: torch.Tensor, gate_in_BTd: torch.Tensor, g: int, state: ForwardState) -> torch.Tensor:
        """y_BTd [B, T, d]: experts read x_BTd (the raw residual in a peri-LN layer), the gate reads
        gate_in_BTd (LN2(x)). g: unique layer (the regulariser's key); state: this forward's
        ForwardState (gate logits for SPEC 1.7 in training, the routing record)."""
        B, T, d = x_BTd.shape
        z_BTE = F.linear(gate_in_BTd, self.expert_sel).float()  # matmul in autocast dtype, then fp32
        state.add_gate_logits("mlp", g, z_BTE)
        if self.zloss > 0:
            state.add_aux("router_zloss", self.zloss * gate_zloss(z_BTE, state.valid))
        bias = getattr(self, "selection_bias", None)
        idx_BTK, gate_BTK = sigmoid_topk(z_BTE, self.k, self.training, self.expert_dropout, choice_bias=bias)
        if self.knockout is not None:  # the knock-out analysis only
            idx_BTK, gate_BTK = knock_out(z_BTE, idx_BTK, gate_BTK, self.knockout.get("mlp"), self.k, self.training,
                                          self.expert_dropout, choice_bias=bias)
        if bias is not None and state.training and torch.is_grad_enabled() and not state.recomputing:
            self.count_selections(idx_BTK, state.valid)
        if state.record is not None:
            state.record.mlp_idx = idx_BTK.int()
            state.record.mlp_gate = gate_BTK.detach().float()
            if state.collect_logits:
                state.record.mlp_logits = z_BTE.detach()
        plan = make_plan(idx_BTK.view(B * T, self.k), self.n_experts)
        # Hidden activations stay in expert-sorted order between the two projections.
        h_SDe = F.relu(cvmm(x_BTd.reshape(B * T, d), self.keys, plan, src_div=self.k, grouped_out=True,
                            backend=self.backend))
        # Raw sigmoid weights, no renormalisation, applied as the reduction weight (SPEC 1.5).
        y_Nd = cvmm(h_SDe, self.values, plan, grouped_in=True, out_group=self.k, gates=gate_BTK,
                    backend=self.backend)
        return y_Nd.view(B, T, d)


    @torch.no_grad()
    def count_selections(self, idx_BTK: torch.Tensor, valid_BT: Optional[torch.Tensor]) -> None:
        """Add the experts chosen for the real tokens (idx [B, T, K]; valid [B, T] bool or None)
        to `load_counts` [E] (float64), the bias balancing's load since the last update."""
        idx = idx_BTK if valid_BT is None else idx_BTK[valid_BT]
        counts = torch.bincount(idx.reshape(-1), minlength=self.n_experts).double()
        self.load_counts = counts if self.load_counts is None else self.load_counts + counts

    @torch.no_grad()
    def update_selection_bias(self, load_E: torch.Tensor) -> None:
        """One bias-balancing update from the step's total selections per expert load_E [E]
        (summed over micro-batches, ranks and repetitions of this layer): bias_e += rate x
        sign(mean load - load_e) (Wang et al. 2024, DeepSeek-V3 sec. 2.1.2); `load_counts` restarts."""
        load = load_E.to(self.selection_bias.device, torch.float64)
        self.selection_bias += (self.bias_balance_rate * torch.sign(load.mean() - load)).to(self.selection_bias.dtype)
        self.load_counts = None


def build_moe_mlp(cfg) -> nn.Module:
    """The MoE MLP selected by `cfg.mlp_type`: "sigma_moe" -> SigmaMoE (SPEC 1.5); "switch" ->
    SwitchMoE, "deepseek" -> DeepSeekMoE (moeut.softmax_moe, SPEC 8.5-8.6). All share the call
    `mlp(x_BTd, gate_in_BTd, g, state) -> y_BTd`. Raises ValueError naming `mlp_type` otherwise."""
    if cfg.mlp_type == "sigma_moe":
        return SigmaMoE(cfg)
    if cfg.mlp_type == "switch":
        return SwitchMoE(cfg)
    if cfg.mlp_type == "deepseek":
        return DeepSeekMoE(cfg)
    raise ValueError(f"mlp_type: unknown MoE MLP {cfg.mlp_type!r}; known: sigma_moe, switch, deepseek")


# ------------------------------------------------------------------------------------------
# SwitchHead attention (SPEC 1.3)
# ------------------------------------------------------------------------------------------

class SwitchHeadAttention(nn.Module):
    """SwitchHead attention (SPEC 1.3): H heads with dense Q and K projections and E value and
    output experts per head, k of each selected per token and head by sigmoid gates; RoPE on the
    first n_rot channels (1.4); logits scaled by 1/sqrt(D) (D^-1/4 on q and on k).

    Parameters (official names): `q`, `k` Linear(d, H*D, no bias); `v` [H*E, d, D], `o` [H*E, D, d]
    (expert (h, e) is row h*E + e); `sel_v`, `sel_o` [H*E, d] gates."""

    def __init__(self, cfg: MoEUTConfig):
        super().__init__()
        d, H, D, E = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.att_n_experts
        self.n_heads, self.d_head, self.n_experts, self.top_k = H, D, E, cfg.att_k
        self.n_rot, self.rope_base = cfg.n_rotate, cfg.rope_base
        self.expert_dropout, self.backend = cfg.expert_dropout, cfg.cvmm_backend
        self.zloss = getattr(cfg, "att_router_zloss", 0.0)  # router z-loss weight of the sel_v / sel_o gates
        # {"att_v" / "att_o": bool mask broadcastable to [B, T, H, E]} of knocked-out experts; None = none
        self.knockout: Optional[Dict[str, torch.Tensor]] = None
        self.q = nn.Linear(d, H * D, bias=False)
        self.k = nn.Linear(d, H * D, bias=False)
        self.v = nn.Parameter(torch.empty(H * E, d, D))  # expert (h, e) is row h*E + e
        self.o = nn.Parameter(torch.empty(H * E, D, d))
        self.sel_v = nn.Parameter(torch.empty(H * E, d))
        self.sel_o = nn.Parameter(torch.empty(H * E, d))

    def reset_parameters(self, cfg: MoEUTConfig) -> None:
        """SPEC 1.6: q, k, v N(0, init_scale / sqrt(d)); o N(0, init_scale / sqrt(H * D)); gates
        N(0, init_scale / sqrt(d)) with row renormalisation; v and o renormalised (norm_init)."""
        sc, d = cfg.init_scale, cfg.d_model
        for w in (self.q.weight, self.k.weight, self.v):
            nn.init.normal_(w, 0, sc / math.sqrt(d))
        nn.init.normal_(self.o, 0, sc / math.sqrt(self.n_heads * self.d_head))
        for w in (self.sel_v, self.sel_o):
            nn.init.normal_(w, 0, sc / math.sqrt(d))
            renorm_rows(w)
        if cfg.norm_init:  # sizes >= 126M (SPEC 1.6)
            renorm_keep_std(self.v, dim=0)
            renorm_keep_std(self.o, dim=0)

    def _gate(self, w_sel: torch.Tensor, u_BTd: torch.Tensor, kind: str, g: int, state: ForwardState):
        B, T, _ = u_BTd.shape
        z_BTHE = F.linear(u_BTd, w_sel).float().view(B, T, self.n_heads, self.n_experts)
        state.add_gate_logits(kind, g, z_BTHE)
        if self.zloss > 0:
            state.add_aux("att_router_zloss", self.zloss * gate_zloss(z_BTHE, state.valid))
        idx_BTHk, gate_BTHk = sigmoid_topk(z_BTHE, self.top_k, self.training, self.expert_dropout)
        if self.knockout is not None:  # the knock-out analysis only
            idx_BTHk, gate_BTHk = knock_out(z_BTHE, idx_BTHk, gate_BTHk, self.knockout.get(kind), self.top_k,
                                            self.training, self.expert_dropout)
        # Global expert id h*E + e: each head owns its own bank.
        head_offset = torch.arange(self.n_heads, device=u_BTd.device)[:, None] * self.n_experts
        plan = make_plan((idx_BTHk + head_offset).view(B * T, self.n_heads * self.top_k),
                         self.n_heads * self.n_experts)
        return idx_BTHk, gate_BTHk, plan

    def forward(self, qk_in_BTd: torch.Tensor, v_in_BTd: torch.Tensor, g: int, l: int, state: ForwardState,
                cache: Optional[KVCache], causal: bool = True) -> torch.Tensor:
        """Attention output [B, T, d]. qk_in_BTd feeds Q, K and both gates (LN1(x) in a peri-LN
        layer), v_in_BTd the value experts (the raw residual). g: unique layer (regulariser key);
        l: absolute layer application (KV-cache entry); cache: KVCache to extend, positions start
        at cache.seq_len; causal=False: bidirectional, padded keys masked (state.valid)."""
        B, T, d = qk_in_BTd.shape
        H, D, k = self.n_heads, self.d_head, self.top_k
        idx_v, gate_v, plan_v = self._gate(self.sel_v, qk_in_BTd, "att_v", g, state)  # source side
        idx_o, gate_o, plan_o = self._gate(self.sel_o, qk_in_BTd, "att_o", g, state)  # destination side
        if state.record is not None:
            state.record.att_v_idx, state.record.att_v_gate = idx_v.int(), gate_v.detach().float()
            state.record.att_o_idx, state.record.att_o_gate = idx_o.int(), gate_o.detach().float()

        # Values from the raw residual, mixed over each head's k selected experts.
        v_NHD = cvmm(v_in_BTd.reshape(B * T, d), self.v, plan_v, src_div=H * k, out_group=k, gates=gate_v,
                     backend=self.backend)
        v_BHTD = v_NHD.view(B, T, H, D).transpose(1, 2)

        scale = D ** -0.25  # on both q and k: the product carries 1/sqrt(D)
        q_BHTD = (self.q(qk_in_BTd) * scale).view(B, T, H, D).transpose(1, 2)
        k_BHTD = (self.k(qk_in_BTd) * scale).view(B, T, H, D).transpose(1, 2)
        past = cache.seq_len if cache is not None else 0
        cos, sin = rope_angles(torch.arange(past, past + T, device=q_BHTD.device), self.n_rot, self.rope_base)
        q_BHTD, k_BHTD = apply_rope(q_BHTD, cos, sin), apply_rope(k_BHTD, cos, sin)  # queries at absolute positions

        # The cache stores k after scaling and RoPE, v after expert mixing (SPEC 1.9).
        o_BHTD = attend(q_BHTD, k_BHTD, v_BHTD, l, cache, causal=causal, valid_BT=state.valid, scale=1.0)
        # Output experts: sum over heads and selected experts is one weighted reduction.
        o_NHD = o_BHTD.transpose(1, 2).reshape(B * T * H, D)
        out_Nd = cvmm(o_NHD, self.o, plan_o, src_div=k, out_group=H * k, gates=gate_o, backend=self.backend)
        return out_Nd.view(B, T, d)


# ------------------------------------------------------------------------------------------
# One unique layer, and the LM
# ------------------------------------------------------------------------------------------

class MoEUTLayer(nn.Module):
    """One unique MoEUT layer (SPEC 1.2): SwitchHead attention then the MoE MLP (σ-MoE, or Switch /
    DeepSeekMoE by `mlp_type`), each a residual branch with dropout. `ln_placement`: "peri" (the
    paper's: LNs only on what feeds Q/K and the gates), "pre" or "post" (ablations, SPEC 1.2)."""

    def __init__(self, cfg: MoEUTConfig):
        super().__init__()
        self.placement = cfg.ln_placement
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.attention = SwitchHeadAttention(cfg)
        self.ffn = build_moe_mlp(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, g: int, l: int, state: ForwardState, cache: Optional[KVCache],
                causal: bool = True) -> torch.Tensor:
        """x [B, T, d] -> x [B, T, d] after one application (absolute layer l) of unique layer g."""
        if self.placement == "peri":
            u = self.ln1(x)
            x = x + self.drop(self.attention(u, x, g, l, state, cache, causal))
            x = x + self.drop(self.ffn(x, self.ln2(x), g, state))
        elif self.placement == "pre":
            u = self.ln1(x)
            x = x + self.drop(self.attention(u, u, g, l, state, cache, causal))
            u = self.ln2(x)
            x = x + self.drop(self.ffn(u, u, g, state))
        else:  # post
            x = self.ln1(x + self.drop(self.attention(x, x, g, l, state, cache, causal)))
            x = self.ln2(x + self.drop(self.ffn(x, x, g, state)))
        return x


class Transformer(nn.Module):
    """Holds the G unique layers (name kept for official key parity: `transformer.layers.{g}`)."""

    def __init__(self, cfg: MoEUTConfig):
        super().__init__()
        self.layers = nn.ModuleList([MoEUTLayer(cfg) for _ in range(cfg.group_size)])


class MoEUTLM(LanguageModel):
    """The MoEUT LM (SPEC §1): embedding, G unique layers applied R times in `layer_order`
    ("abab": r*G + g, the paper's; "aabb": g*R + r), LN_out (none for post-LN), untied head with
    bias. The loop, KV cache, `generate`, routing records and activation checkpointing are
    moeut.lm.LanguageModel's; the regulariser is SPEC 1.7's entropy terms plus the auxiliary losses
    of Switch / DeepSeekMoE MLPs. Raises ValueError naming the field for an invalid config."""

    def __init__(self, cfg: MoEUTConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        d = cfg.d_model
        self.embedding = nn.Embedding(cfg.vocab_size, d)
        self.transformer = Transformer(cfg)
        # Post-LN: embeddings scaled by sqrt(d), then a non-affine input norm, and no LN_out.
        self.out_norm = nn.LayerNorm(d, eps=1e-5) if cfg.ln_placement != "post" else None
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=True)  # untied, with bias
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """SPEC 1.6: embedding kaiming-normal (std 1/sqrt(d)), head PyTorch's default, LayerNorms
        1/0, attention and MLP by their own rules."""
        cfg = self.config
        nn.init.kaiming_normal_(self.embedding.weight, mode="fan_in", nonlinearity="linear")  # std 1/sqrt(d)
        self.lm_head.reset_parameters()  # PyTorch default U(+-1/sqrt(d)) for weight and bias
        for layer in self.transformer.layers:
            layer.ln1.reset_parameters()
            layer.ln2.reset_parameters()
            layer.attention.reset_parameters(cfg)
            layer.ffn.reset_parameters(cfg)
        if self.out_norm is not None:
            self.out_norm.reset_parameters()

    def execution_order(self) -> List[Tuple[int, int, int]]:
        """(l, g, r) for every layer application in execution order: "abab" runs the G unique
        layers in turn R times (l = r*G + g), "aabb" each unique layer R times in a row (l = g*R + r)."""
        return layer_schedule(self.config.group_size, self.config.n_repeats, self.config.layer_order)

    def unique_layer(self, g: int) -> nn.Module:
        """Unique layer g (0..G-1), `transformer.layers[g]`."""
        return self.transformer.layers[g]

    def embed(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """Token embedding [B, T, d]; post-LN: scaled by sqrt(d), then a non-affine input norm."""
        x_BTd = self.embedding(input_ids_BT)
        if self.config.ln_placement == "post":
            x_BTd = F.layer_norm(x_BTd * math.sqrt(self.config.d_model), (self.config.d_model,))
        return x_BTd

    def head(self, x_BTd: torch.Tensor) -> torch.Tensor:
        """LN_out (not for post-LN) and the untied head with bias: logits [B, T, V]."""
        if self.out_norm is not None:
            x_BTd = self.out_norm(x_BTd)
        return self.lm_head(x_BTd)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                cache: Optional[KVCache] = None, collect_routing: Union[bool, str] = False,
                causal: bool = True, step_totals: Optional[StepTotals] = None) -> LMOutput:
        """input_ids [B, T] int64 -> LMOutput (SPEC 1.8). attention_mask [B, T] (1 = real token,
        0 = right padding; see moeut.outputs "Padding contract"). collect_routing: True, or
        "logits" to also keep MLP gate logits. cache: a KVCache to extend (decoding); no
        regulariser is computed while decoding. causal=False: bidirectional attention.
        step_totals: the step's auxiliary-loss statistics (moeut.lm.StepTotals; the trainer's).
        Raises ValueError for input_ids not [B, T] or a bad attention_mask."""
        return self.run_forward(input_ids, attention_mask, cache=cache, collect_routing=collect_routing,
                                causal=causal, step_totals=step_totals)

    def regulariser_terms(self, state: ForwardState) -> Dict[str, torch.Tensor]:
        """gamma * L_MLP,g and delta * (L_V,g + L_O,g) per unique layer g (SPEC 1.7), as
        "reg/<kind>_g<g>" -> 0-dim fp32; empty in eval mode. Other MLP types' balance / z-losses
        are auxiliary losses (moeut.lm.LanguageModel.regulariser adds them)."""
        terms: Dict[str, torch.Tensor] = {}
        weight = {"mlp": self.config.entropy_reg, "att_v": self.config.att_entropy_reg,
                  "att_o": self.config.att_entropy_reg}
        for (kind, g), lse_list in state.lse.items():
            if kind not in weight:  # other MLP types add their own aux losses via "aux" entries
                continue
            terms[f"reg/{kind}_g{g}"] = weight[kind] * entropy_reg_term(lse_list, state.seq_len[(kind, g)])
        return terms
