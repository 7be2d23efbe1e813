"""SUT: Sparse Universal Transformer (Tan et al., EMNLP 2023), as ported in the MoEUT training code
(SPEC 8.4, presets 2.6). Re-implemented from the SPEC text.

    x = LN_in(E[tokens] * sqrt(d))                      (non-affine input norm, no LN_out)
    s, R, acc = x, 1, 0
    for l in 1..L:                                      one shared post-LN layer applied L times
        h     = LN2(y + MoE(y)),  y = LN1(s + MoA(s))
        alpha = softmax(W2 GELU(W1 h))[halt]            zero-initialised W2: alpha = 0.5 at init
        p_l   = R * alpha;  R = R * (1 - alpha);  acc = acc + p_l * h
        s     = acc + R * h                             (next layer input)
        a position halts once R < 1 - 0.999; from then on its s, R and acc are frozen and it is
        masked out of the routing statistics
    logits = Head(s)

- **MoE MLP:** router Linear(d,d) -> tanh -> Linear(d, N_E, no bias); p = softmax; top-K
  (`sample_topk` > 0: in training, the last `sample_topk` of the K experts are drawn by multinomial
  from the remaining mass + 1e-6); gates g = p_sel / (sum p_sel + 1e-6); experts 2-layer ReLU MLPs
  with biases.
- **MoA attention:** shared K and V projections d -> heads_per_expert * d_head; the query and the
  output projections are experts (same router structure as the MLP): each of the k selected experts
  gives heads_per_expert query heads over the shared K/V heads and its own output projection;
  outputs weighted by the gates and summed. Learned relative-position logits q_t . r[clip(t - tau,
  0, max_rel)] added to the attention logits (causal, so only non-negative distances exist)
  [verify: the exact relative-position form of shawntan/SUT].
- **MIM loss** (per routed module, MLP and MoA query): over all (token, step) pairs x that are not
  halted, with p(e|x) the router softmax: L = H(E|X) - H(E) = -I(X;E), p(x) uniform. A plain
  forward uses its own statistics; in training (train.aux_loss_scope=step, the default) they are
  the optimiser step's, summed over micro-batches and ranks (SPEC 8.4: accumulated over all calls,
  read once per optimiser step), through moeut.lm.StepTotals.
- **ACT loss:** expected depth sum_l l * p_l + R_final * (last step), averaged over tokens.
- reg_loss = mim_weight * (L_MIM,mlp + L_MIM,att) + act_weight * ACT loss (training only).

KV cache: one entry per step l (the shared layer sees different inputs at every step); halted
positions keep providing their frozen state's K/V, exactly as in a full forward.

The input checks, padding mask, KV cache, routing records (`ForwardState.new_record` /
`finish_record`), auxiliary-loss sum, activation checkpointing and `generate` are moeut.lm's
(`LanguageModel`); this file holds the blocks, the halting loop and the SUT losses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.cvmm import cvmm, make_plan
from ..lm import ForwardState, KVCache, LanguageModel, StepTotals, layer_schedule
from ..model_config import CVMM_BACKENDS, PROBABILITY, SIZE, NON_NEGATIVE, LayerGeometry, _check, check_fields
from ..outputs import LMOutput
from ..validate import in_range


@dataclass
class SUTConfig(LayerGeometry):
    """Sparse Universal Transformer config (SPEC 8.4, presets 2.6): one shared post-LN layer of MoA
    attention and a softmax-routed MoE MLP, applied up to n_layers times with stick-breaking
    halting; MIM and ACT losses weighted by mim_weight / act_weight. group_size = 1, so n_repeats
    (LayerGeometry) = n_layers. Raises ValueError naming the field (validate) on construction."""

    d_model: int = field(metadata=SIZE)
    n_layers: int = field(metadata=SIZE)  # maximum number of ACT steps (applications of the shared layer)
    ff_n_experts: int = field(metadata=SIZE)
    ff_expert_size: int = field(metadata=SIZE)
    ff_k: int = field(metadata=SIZE)
    att_n_experts: int = field(metadata=SIZE)
    att_expert_size: int = field(metadata=SIZE)  # = heads_per_expert * d_head
    att_k: int = field(metadata=SIZE)
    d_head: int = field(metadata=SIZE)
    vocab_size: int = field(default=8000, metadata=SIZE)
    mim_weight: float = field(default=0.001, metadata=NON_NEGATIVE)
    act_weight: float = field(default=0.01, metadata=NON_NEGATIVE)
    # a position halts when its remaining mass < 1 - threshold
    halt_threshold: float = field(default=0.999, metadata=in_range(0.5, 1, lo_open=True, hi_open=True))
    sample_topk: int = field(default=0, metadata=NON_NEGATIVE)  # <= ff_k (validate)
    max_relative_positions: int = field(default=64, metadata=SIZE)
    dropout: float = field(default=0.0, metadata=PROBABILITY)
    cvmm_backend: str = "auto"
    arch: str = "sut"

    ln_placement = "post"  # (not a field: SUT's layer is post-LN)

    def __post_init__(self) -> None:
        self.validate()

    group_size = property(lambda self: 1)
    # MoA routes once per token (not per head): routing records hold its query/output experts as
    # one "head" of att_o_idx [B, T, 1, k] (consumed by moeut.analysis.routing.RoutingStats).
    n_heads = property(lambda self: 1)

    @property
    def heads_per_expert(self) -> int:
        """Attention heads per MoA expert: att_expert_size / d_head."""
        return self.att_expert_size // self.d_head

    def validate(self) -> None:
        """Raises ValueError naming the field for a value outside its declared range,
        att_expert_size not a multiple of d_head, k > experts, sample_topk > ff_k or an unknown
        cvmm_backend."""
        check_fields(self)
        c = type(self).__name__
        _check(self.att_expert_size % self.d_head == 0, c, "att_expert_size",
               f"{self.att_expert_size} is not a multiple of d_head={self.d_head}")
        _check(self.ff_k <= self.ff_n_experts, c, "ff_k", f"K={self.ff_k} > ff_n_experts={self.ff_n_experts}")
        _check(self.att_k <= self.att_n_experts, c, "att_k", f"k={self.att_k} > att_n_experts={self.att_n_experts}")
        _check(self.sample_topk <= self.ff_k, c, "sample_topk", f"must be in [0, ff_k], got {self.sample_topk}")
        _check(self.cvmm_backend in CVMM_BACKENDS, c, "cvmm_backend",
               f"{self.cvmm_backend!r} is not one of {CVMM_BACKENDS}")


# ------------------------------------------------------------------------------------------
# Losses (pure functions, tested by hand)
# ------------------------------------------------------------------------------------------

def mim_loss(probs_XE: torch.Tensor) -> torch.Tensor:
    """H(E|X) - H(E) (nats, 0-dim fp32) with p(x) uniform over the rows and p(e|x) the rows of
    probs_XE [X, E] (each sums to 1): -I(X; E), SPEC 8.4."""
    p = probs_XE.float()
    h_cond = -(p * torch.log(p.clamp_min(1e-20))).sum(-1).mean()
    p_e = p.mean(0)
    h_marg = -(p_e * torch.log(p_e.clamp_min(1e-20))).sum()
    return h_cond - h_marg


class MIMAccumulator:
    """Sums of p(e|x) and of H(p(e|x)) over the active (token, step) pairs of one forward."""

    def __init__(self) -> None:
        self.sum_p: Optional[torch.Tensor] = None
        self.sum_h: Optional[torch.Tensor] = None
        self.count: Optional[torch.Tensor] = None

    def add(self, probs_NE: torch.Tensor, active_N: torch.Tensor) -> None:
        """Add one step's router probabilities probs_NE [N, E] of the positions where active_N [N]
        (bool: not halted, not padded) is True."""
        w = active_N.float()
        p = probs_NE.float()
        h = -(p * torch.log(p.clamp_min(1e-20))).sum(-1)
        sp, sh, n = (w[:, None] * p).sum(0), (w * h).sum(), w.sum()
        if self.sum_p is None:
            self.sum_p, self.sum_h, self.count = sp, sh, n
        else:
            self.sum_p, self.sum_h, self.count = self.sum_p + sp, self.sum_h + sh, self.count + n

    def stats(self) -> dict:
        """The sums so far: {"sum_p": [E], "sum_h": 0-dim, "count": 0-dim} (fp32). Requires one `add`."""
        return {"sum_p": self.sum_p, "sum_h": self.sum_h, "count": self.count}

    def loss(self) -> torch.Tensor:
        """mim_loss over every (token, step) pair added so far (0-dim fp32). Requires one `add`."""
        return mim_loss_from_stats(self.stats())


def mim_loss_from_stats(stats: dict) -> torch.Tensor:
    """H(E|X) - H(E) (0-dim fp32) from `MIMAccumulator.stats()`-shaped sums over (token, step)
    pairs, possibly summed over several forwards (the step's global form)."""
    n = stats["count"].clamp_min(1.0)
    p_e = stats["sum_p"] / n
    h_marg = -(p_e * torch.log(p_e.clamp_min(1e-20))).sum()
    return stats["sum_h"] / n - h_marg


# ------------------------------------------------------------------------------------------
# Router and expert MLP
# ------------------------------------------------------------------------------------------

class MLPRouter(nn.Module):
    """Linear(d,d) -> tanh -> Linear(d, E, no bias); softmax; top-k with optional sampling."""

    def __init__(self, d: int, n_experts: int, k: int, sample_topk: int, dropout: float):
        super().__init__()
        self.hidden = nn.Linear(d, d)
        self.out = nn.Linear(d, n_experts, bias=False)
        self.drop = nn.Dropout(dropout)
        self.k, self.sample_topk = k, sample_topk

    def forward(self, x_Nd: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_Nd [N, d] -> (probs_NE fp32 softmax, idx_NK selected experts, gate_NK = p_sel / (sum
        p_sel + 1e-6)). In training the last `sample_topk` experts are sampled (SPEC 8.4)."""
        z_NE = self.out(self.drop(torch.tanh(self.hidden(x_Nd)))).float()
        probs_NE = torch.softmax(z_NE, dim=-1)
        n_sample = self.sample_topk if self.training else 0
        with torch.no_grad():
            idx_NK = probs_NE.topk(self.k - n_sample, dim=-1).indices
            if n_sample > 0:  # draw the remaining experts from the leftover mass (+1e-6 keeps it valid)
                rest = probs_NE.scatter(-1, idx_NK, 0.0) + 1e-6
                rest = rest.scatter(-1, idx_NK, 0.0)
                idx_NK = torch.cat([idx_NK, torch.multinomial(rest, n_sample)], dim=-1)
        p_sel_NK = probs_NE.gather(-1, idx_NK)
        gate_NK = p_sel_NK / (p_sel_NK.sum(-1, keepdim=True) + 1e-6)
        return probs_NE, idx_NK, gate_NK


class SUTMoE(nn.Module):
    """SUT's MoE MLP (SPEC 8.4): MLPRouter, E two-layer ReLU experts with biases (w1 [E, d, De],
    b1 [E, De], w2 [E, De, d], b2 [E, d]), outputs weighted by the gates."""

    def __init__(self, cfg: SUTConfig):
        super().__init__()
        d, E, De = cfg.d_model, cfg.ff_n_experts, cfg.ff_expert_size
        self.n_experts, self.k, self.backend = E, cfg.ff_k, cfg.cvmm_backend
        self.router = MLPRouter(d, E, cfg.ff_k, cfg.sample_topk, cfg.dropout)
        self.w1 = nn.Parameter(torch.empty(E, d, De))
        self.b1 = nn.Parameter(torch.empty(E, De))
        self.w2 = nn.Parameter(torch.empty(E, De, d))
        self.b2 = nn.Parameter(torch.empty(E, d))

    def reset_parameters(self) -> None:
        """PyTorch Linear defaults per expert and for the router: U(+-1/sqrt(fan_in))."""
        d, De = self.w1.shape[1], self.w1.shape[2]
        # PyTorch Linear defaults per expert: U(+-1/sqrt(fan_in)) for weights and biases.
        for w, b, fan_in in ((self.w1, self.b1, d), (self.w2, self.b2, De)):
            nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
            nn.init.uniform_(b, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        self.router.hidden.reset_parameters()
        self.router.out.reset_parameters()

    def forward(self, x_Nd: torch.Tensor):
        """x_Nd [N, d] -> (y_Nd [N, d], probs_NE, idx_NK, gate_NK) (router outputs as MLPRouter)."""
        probs_NE, idx_NK, gate_NK = self.router(x_Nd)
        plan = make_plan(idx_NK, self.n_experts)
        h_SDe = cvmm(x_Nd, self.w1, plan, src_div=self.k, grouped_out=True, backend=self.backend)
        h_SDe = F.relu(h_SDe + self.b1.to(h_SDe.dtype).index_select(0, plan.sorted_experts.long()))
        y_Nd = cvmm(h_SDe, self.w2, plan, grouped_in=True, out_group=self.k, gates=gate_NK, backend=self.backend)
        # Output biases, weighted by the gates like the rest of each expert's output.
        y_Nd = y_Nd + (gate_NK[..., None].to(y_Nd.dtype) * self.b2.to(y_Nd.dtype)[idx_NK]).sum(1)
        return y_Nd, probs_NE, idx_NK, gate_NK


class MoAAttention(nn.Module):
    """Mixture of attention heads: expert Q and O, shared K and V (SPEC 8.4)."""

    def __init__(self, cfg: SUTConfig):
        super().__init__()
        d, E = cfg.d_model, cfg.att_n_experts
        self.n_experts, self.k, self.backend = E, cfg.att_k, cfg.cvmm_backend
        self.d_head, self.hpe = cfg.d_head, cfg.heads_per_expert
        self.max_rel = cfg.max_relative_positions
        self.router = MLPRouter(d, E, cfg.att_k, 0, cfg.dropout)
        self.k_proj = nn.Linear(d, cfg.att_expert_size, bias=False)
        self.v_proj = nn.Linear(d, cfg.att_expert_size, bias=False)
        self.q = nn.Parameter(torch.empty(E, d, cfg.att_expert_size))
        self.o = nn.Parameter(torch.empty(E, cfg.att_expert_size, d))
        self.rel = nn.Parameter(torch.empty(self.max_rel + 1, cfg.d_head))  # r[distance]

    def reset_parameters(self) -> None:
        """Expert Q/O and shared K/V: PyTorch Linear defaults; relative-position table
        N(0, 1/sqrt(d_head)); router: Linear defaults."""
        d, A = self.q.shape[1], self.q.shape[2]
        nn.init.uniform_(self.q, -1 / math.sqrt(d), 1 / math.sqrt(d))
        nn.init.uniform_(self.o, -1 / math.sqrt(A), 1 / math.sqrt(A))
        self.k_proj.reset_parameters()
        self.v_proj.reset_parameters()
        nn.init.normal_(self.rel, 0, 1 / math.sqrt(self.d_head))
        self.router.hidden.reset_parameters()
        self.router.out.reset_parameters()

    def forward(self, x_BTd: torch.Tensor, l: int, cache: Optional[KVCache]):
        """x_BTd [B, T, d] -> (out [B, T, d], probs_NE, idx_Nk, gate_Nk) with N = B*T. l: step
        (KV-cache entry); cache: KVCache to extend, new positions start at cache.seq_len."""
        B, T, d = x_BTd.shape
        k, hpe, D = self.k, self.hpe, self.d_head
        x_Nd = x_BTd.reshape(B * T, d)
        probs_NE, idx_Nk, gate_Nk = self.router(x_Nd)
        plan = make_plan(idx_Nk, self.n_experts)
        # One query block of hpe heads per selected expert: k*hpe query heads per token.
        q_SA = cvmm(x_Nd, self.q, plan, src_div=k, backend=self.backend)  # [N*k, hpe*D] slot order
        q_BQTD = q_SA.view(B, T, k * hpe, D).transpose(1, 2)  # Q = k*hpe query heads
        k_BhTD = self.k_proj(x_BTd).view(B, T, hpe, D).transpose(1, 2)
        v_BhTD = self.v_proj(x_BTd).view(B, T, hpe, D).transpose(1, 2)
        past = cache.seq_len if cache is not None else 0
        if cache is not None:
            k_BhTD, v_BhTD = cache.append(l, k_BhTD, v_BhTD)
        S = k_BhTD.shape[2]
        # Query head (j, h) reads shared K/V head h: repeat the hpe K/V heads for each of the k experts.
        k_BQSD = k_BhTD.repeat(1, k, 1, 1).to(q_BQTD.dtype)
        v_BQSD = v_BhTD.repeat(1, k, 1, 1).to(q_BQTD.dtype)
        # Relative-position logits q_t . r[clip(t - tau, 0, max_rel)], causal mask as -inf.
        pos_q = torch.arange(past, past + T, device=x_BTd.device)
        dist_TS = pos_q[:, None] - torch.arange(S, device=x_BTd.device)[None, :]
        rel_BQTR = q_BQTD @ self.rel.to(q_BQTD.dtype).t()  # [B, Q, T, max_rel+1]
        bias_BQTS = rel_BQTR.gather(-1, dist_TS.clamp(0, self.max_rel).expand(B, k * hpe, T, S))
        bias_BQTS = bias_BQTS.masked_fill(dist_TS < 0, float("-inf"))
        o_BQTD = F.scaled_dot_product_attention(q_BQTD, k_BQSD, v_BQSD, attn_mask=bias_BQTS)
        o_SA = o_BQTD.transpose(1, 2).reshape(B * T * k, hpe * D)  # slot order (token, expert j)
        out_Nd = cvmm(o_SA, self.o, plan, src_div=1, out_group=k, gates=gate_Nk, backend=self.backend)
        return out_Nd.view(B, T, d), probs_NE, idx_Nk, gate_Nk


class SUTLayer(nn.Module):
    """SUT's shared post-LN layer (SPEC 8.4): y = LN1(s + MoA(s)); h = LN2(y + MoE(y))."""

    def __init__(self, cfg: SUTConfig):
        super().__init__()
        self.attention = MoAAttention(cfg)
        self.moe = SUTMoE(cfg)
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, s_BTd: torch.Tensor, l: int, state: ForwardState, cache: Optional[KVCache]):
        """s_BTd [B, T, d] -> (h_BTd, att_probs_NE, mlp_probs_NE), N = B*T: the layer output and
        both routers' probabilities (for the MIM loss). l: step (KV-cache entry). Writes the
        routing decisions into `state.record` when one is open (MoA's experts, per token, as one
        "head" of att_o_idx [B, T, 1, k])."""
        B, T, d = s_BTd.shape
        a, att_p, att_idx, att_gate = self.attention(s_BTd, l, cache)
        y = self.ln1(s_BTd + self.drop(a))
        m, mlp_p, mlp_idx, mlp_gate = self.moe(y.reshape(B * T, d))
        h = self.ln2(y + self.drop(m.view(B, T, d)))
        if state.record is not None:
            state.record.mlp_idx = mlp_idx.view(B, T, -1).int()
            state.record.mlp_gate = mlp_gate.view(B, T, -1).detach().float()
            state.record.att_o_idx = att_idx.view(B, T, 1, -1).int()
            state.record.att_o_gate = att_gate.view(B, T, 1, -1).detach().float()
        return h, att_p, mlp_p


class StickBreakingHalt(nn.Module):
    """Halting head (SPEC 8.4): alpha = softmax(W2 GELU(W1 h))[1]; W2 (d -> 2, no bias)
    zero-initialised: alpha = 0.5 at init."""

    def __init__(self, d: int):
        super().__init__()
        self.w1 = nn.Linear(d, d)
        self.w2 = nn.Linear(d, 2, bias=False)

    def reset_parameters(self) -> None:
        """W1: PyTorch Linear default; W2: zeros."""
        self.w1.reset_parameters()
        nn.init.zeros_(self.w2.weight)

    def forward(self, h_BTd: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """h_BTd [B, T, d] -> (log alpha, log(1 - alpha)), fp32 [B, T]."""
        logp_BT2 = F.log_softmax(self.w2(F.gelu(self.w1(h_BTd))).float(), dim=-1)
        return logp_BT2[..., 1], logp_BT2[..., 0]


class SUTLM(LanguageModel):
    """The Sparse Universal Transformer LM (SPEC 8.4): non-affine input norm over E[tokens]*sqrt(d),
    the shared layer applied up to n_layers times with stick-breaking halting, untied head with
    bias (no LN_out). reg_loss = MIM + ACT losses (training only). Parameters: `embedding`,
    `layer`, `halt`, `lm_head`. Checks, KV cache, routing records, checkpointing and `generate`:
    moeut.lm.LanguageModel. Raises ValueError naming the field for an invalid config."""

    def __init__(self, cfg: SUTConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        d = cfg.d_model
        self.embedding = nn.Embedding(cfg.vocab_size, d)
        self.layer = SUTLayer(cfg)
        self.halt = StickBreakingHalt(d)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=True)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Embedding kaiming-normal (std 1/sqrt(d)), head PyTorch default, blocks their own rules."""
        nn.init.kaiming_normal_(self.embedding.weight, mode="fan_in", nonlinearity="linear")
        self.lm_head.reset_parameters()
        self.layer.attention.reset_parameters()
        self.layer.moe.reset_parameters()
        self.layer.ln1.reset_parameters()
        self.layer.ln2.reset_parameters()
        self.halt.reset_parameters()

    def execution_order(self) -> List[Tuple[int, int, int]]:
        """(l, 0, l) per step l: the one shared layer at every step (the halting loop may freeze
        positions, never skip a step)."""
        return layer_schedule(1, self.config.n_layers)

    def unique_layer(self, g: int) -> nn.Module:
        """The one shared layer (g = 0)."""
        return self.layer

    def embed(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """LN_in(E[tokens] * sqrt(d)) [B, T, d], a non-affine input norm."""
        d = self.config.d_model
        return F.layer_norm(self.embedding(input_ids_BT) * math.sqrt(d), (d,))

    def head(self, s_BTd: torch.Tensor) -> torch.Tensor:
        """The untied head with bias (no LN_out): logits [B, T, V]."""
        return self.lm_head(s_BTd)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                cache: Optional[KVCache] = None, collect_routing: Union[bool, str] = False,
                return_halting: bool = False, step_totals: Optional[StepTotals] = None) -> LMOutput:
        """input_ids [B, T] int64 -> LMOutput (SPEC 1.8). attention_mask [B, T]: 1 = real, 0 = right
        padding (moeut.outputs "Padding contract"): padded positions are left out of the MIM
        statistics, the ACT loss's average and the routing records' statistics. return_halting:
        also put the per-position halting distribution [L, B, T] (fp32, sums to 1 over L) into
        `reg_terms["halting"]` and its expected depth into `reg_terms["act/expected_depth"]`.
        step_totals: the step's MIM statistics (moeut.lm.StepTotals; the trainer's).
        Raises ValueError for input_ids not [B, T] or a bad attention_mask."""
        return self.run_forward(input_ids, attention_mask, cache=cache, collect_routing=collect_routing,
                                return_halting=return_halting, step_totals=step_totals)

    def uses_step_statistics(self) -> bool:
        """True when the MIM loss is on (mim_weight > 0): it is built from batch statistics
        (see moeut.lm.LanguageModel.uses_step_statistics). The ACT loss is a token mean."""
        return self.config.mim_weight > 0

    def layers_forward(self, s: torch.Tensor, state: ForwardState, cache: Optional[KVCache],
                       return_halting: bool = False) -> torch.Tensor:
        """The halting loop (SPEC 8.4, module docstring) on s [B, T, d]; returns the final state.
        In training adds the weighted MIM and ACT losses to `state` (aux "mim_att", "mim_mlp",
        "act"); return_halting fills `state.extra_terms`."""
        cfg = self.config
        valid = state.valid
        B, T, _ = s.shape
        acc = torch.zeros_like(s)
        log_R = torch.zeros(B, T, device=s.device)  # log remaining mass, fp32
        active = torch.ones(B, T, dtype=torch.bool, device=s.device)
        halt_p: List[torch.Tensor] = []
        expected_depth = torch.zeros(B, T, device=s.device)
        mim_att, mim_mlp = MIMAccumulator(), MIMAccumulator()
        log_thr = math.log(1.0 - cfg.halt_threshold)
        for l, _, r in self.execution_order():
            s_in = s
            state.new_record(l, 0, r)
            h, att_p, mlp_p = self.call_layer(lambda x, st, l=l: self.layer(x, l, st, cache), s, state)
            if state.training and cfg.mim_weight > 0:  # halted and padded positions are masked out of routing stats
                counted = (active if valid is None else active & valid).view(-1)
                mim_att.add(att_p, counted)
                mim_mlp.add(mlp_p, counted)
            if state.record is not None:
                state.finish_record(s_in, h)  # the update of this application: h against its input
            log_a, log_1ma = self.halt(h)
            if l == cfg.n_layers - 1:  # the last step takes all the remaining mass
                log_a, log_1ma = torch.zeros_like(log_a), torch.full_like(log_1ma, float("-inf"))
            p_l = torch.exp(log_R + log_a) * active  # halting probability at step l (0 once halted)
            new_log_R = torch.where(active, log_R + log_1ma, log_R)
            acc = acc + p_l[..., None].to(h.dtype) * h
            s_new = acc + torch.exp(new_log_R)[..., None].to(h.dtype) * h
            s = torch.where(active[..., None], s_new, s)  # halted states are frozen
            halt_p.append(p_l)
            expected_depth = expected_depth + (l + 1) * p_l
            log_R = new_log_R
            # A newly halted position hands its (tiny) remaining mass to its last step.
            # (No data-dependent branch: the forward stays free of host synchronisation.)
            newly = active & (log_R < log_thr)
            if l < cfg.n_layers - 1:
                rem = torch.exp(log_R) * newly
                halt_p[-1] = halt_p[-1] + rem
                expected_depth = expected_depth + (l + 1) * rem
            active = active & ~newly
        if state.training:
            if cfg.mim_weight > 0:  # from batch statistics: the step's totals when split (moeut.lm)
                state.add_aux_from_stats("mim_att", cfg.mim_weight, mim_att.stats(), mim_loss_from_stats)
                state.add_aux_from_stats("mim_mlp", cfg.mim_weight, mim_mlp.stats(), mim_loss_from_stats)
            if cfg.act_weight > 0:
                # Averaged over non-pad tokens (SPEC 8.4).
                depth = expected_depth.mean() if valid is None else \
                    (expected_depth * valid).sum() / valid.sum().clamp_min(1)
                state.add_aux("act", cfg.act_weight * depth)
        if return_halting:  # not losses: only on request, so reg_terms' "aux/" entries sum to reg_loss
            state.extra_terms["act/expected_depth"] = expected_depth.detach().mean()
            state.extra_terms["halting"] = torch.stack(halt_p, 0).detach()
        return s
