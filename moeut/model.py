"""The MoEUT language model (SPEC §1), top to bottom.

    tokens -> embedding -> for r in 0..R-1: for g in 0..G-1: layer_g -> LN_out -> head (bias, untied)

Each unique layer is a peri-LayerNorm block (SPEC 1.2): only what feeds a sigmoid or a softmax is
normalised (Q, K, the attention gates, the MLP gate); values, expert inputs, branch outputs and the
residual stream never are.

    u = LN1(x);  x = x + SwitchHead(q,k,gates <- u; values <- x)
                 x = x + SigmaMoE(gate <- LN2(x); experts <- x)

Parameter names equal the official slim implementation's (`transformer.layers.{g}.attention.v`,
`...ffn.keys`, ...), so official checkpoints load by name (see moeut/official.py).

Shapes: B batch, T time, d model width, H heads, D head width, E experts, K/k active experts,
N = B*T tokens, S = N*k slots. Suffixes name a tensor's shape (x_BTd, idx_BTHk).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MoEUTConfig
from .kernels.cvmm import cvmm, make_plan
from .outputs import LMOutput, RoutingRecord, valid_positions


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
# RoPE (SPEC 1.4): first n_rot channels of each head, rotate-half pairing, absolute positions
# ------------------------------------------------------------------------------------------

def rope_angles(positions_T: torch.Tensor, n_rot: int, base: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, n_rot] in fp32 for absolute positions."""
    inv_freq = base ** (-torch.arange(0, n_rot, 2, device=positions_T.device, dtype=torch.float32) / n_rot)
    theta_Tr = positions_T.float()[:, None] * inv_freq[None, :]  # [T, n_rot/2]
    theta_Tr = torch.cat([theta_Tr, theta_Tr], dim=-1)  # [T, n_rot]
    return theta_Tr.cos(), theta_Tr.sin()


def apply_rope(x_BHTD: torch.Tensor, cos_Tr: torch.Tensor, sin_Tr: torch.Tensor) -> torch.Tensor:
    n_rot = cos_Tr.shape[-1]
    if n_rot == 0:
        return x_BHTD
    rot, rest = x_BHTD[..., :n_rot], x_BHTD[..., n_rot:]
    a, b = rot.chunk(2, dim=-1)
    rotated_half = torch.cat([-b, a], dim=-1)  # rotate_half([a, b]) = [-b, a] (GPT-NeoX pairing)
    rot = (rot.float() * cos_Tr + rotated_half.float() * sin_Tr).to(x_BHTD.dtype)
    return torch.cat([rot, rest], dim=-1)


# ------------------------------------------------------------------------------------------
# Per-call state: regulariser inputs, routing records, KV cache
# ------------------------------------------------------------------------------------------

@dataclass
class KVCache:
    """One (k, v) entry per *absolute* layer: the same weights see different K/V at each of the
    R applications (SPEC 1.9). k is stored after scaling and RoPE; v after expert mixing."""

    k: Dict[int, torch.Tensor] = field(default_factory=dict)  # l -> [B, H, T_cache, D]
    v: Dict[int, torch.Tensor] = field(default_factory=dict)
    seq_len: int = 0  # tokens already in the cache (next token's absolute position)


class ForwardState:
    """Collected during one forward: inputs of the entropy regulariser and routing records.
    Passed down explicitly (no module-level history, SPEC 1.8)."""

    def __init__(self, training: bool, collect_routing: Union[bool, str], valid: Optional[torch.Tensor] = None):
        self.training = training
        # [B, T] bool real positions, None = no padding (moeut.outputs "Padding contract"). Padded
        # positions are kept out of capacity, routing records' statistics and every auxiliary loss.
        self.valid = valid
        self.collect_routing = bool(collect_routing)
        self.collect_logits = collect_routing == "logits"
        # (kind, g) -> list over repetitions of [B, (H,) E] per-sequence log-sum-exp over time of
        # log_softmax(gate logits): the running marginal of SPEC 1.7, kept in log space.
        self.lse: Dict[Tuple[str, int], List[torch.Tensor]] = {}
        # Tokens per sequence: an int, or [B] counts of real tokens when there is padding.
        self.seq_len: Dict[Tuple[str, int], Union[int, torch.Tensor]] = {}
        self.record: Optional[RoutingRecord] = None
        self.records: List[RoutingRecord] = []
        # Extra auxiliary losses of other MoE MLP types (balance, z-loss), already weighted;
        # summed into reg_loss. Only added in training mode.
        self.aux_losses: Dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def finish_record(self, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        """Close the current layer's routing record with the residual's norms (SPEC 7.2 F5)."""
        xi, xo = x_in.float(), x_out.float()
        self.record.in_norm = xi.norm(dim=-1)
        self.record.update_norm = (xo - xi).norm(dim=-1)
        self.record.cos_in_out = F.cosine_similarity(xo, xi, dim=-1)
        self.records.append(self.record)
        self.record = None

    def add_aux(self, name: str, value: torch.Tensor) -> None:
        if self.training:
            self.aux_losses[name] = self.aux_losses[name] + value if name in self.aux_losses else value

    def new_record(self, l: int, g: int, r: int) -> None:
        """Open layer application l's routing record (when routing is collected)."""
        if self.collect_routing:
            self.record = RoutingRecord(l=l, g=g, r=r, valid=self.valid)

    def add_gate_logits(self, kind: str, g: int, z_BTE: torch.Tensor) -> None:
        """z: [B, T, E] or [B, T, H, E] pre-sigmoid logits in fp32."""
        if not self.training:
            return
        # fp32 whatever the model's dtype: a log-sum-exp over T*R terms loses the marginal in bf16.
        lsm = F.log_softmax(z_BTE.float(), dim=-1)
        if self.valid is None:
            self.seq_len[(kind, g)] = z_BTE.shape[1]
        else:
            # Padded positions contribute exp(min - lse) = 0 to the marginal. The most negative
            # finite value rather than -inf keeps a row without real tokens finite in the backward
            # (entropy_reg_term leaves such rows out).
            v = self.valid.view(*self.valid.shape, *([1] * (z_BTE.dim() - 2)))
            lsm = lsm.masked_fill(~v, torch.finfo(lsm.dtype).min)
            self.seq_len[(kind, g)] = self.valid.sum(1)
        lse = torch.logsumexp(lsm, dim=1)  # [B, (H,) E]
        self.lse.setdefault((kind, g), []).append(lse)


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

def sigmoid_topk(z: torch.Tensor, k: int, training: bool, expert_dropout: float):
    s = torch.sigmoid(z)
    with torch.no_grad():
        s_sel = s
        if training and expert_dropout > 0:
            drop = torch.rand_like(s) < expert_dropout
            s_sel = s.masked_fill(drop, float("-inf"))
        idx = s_sel.topk(k, dim=-1, sorted=False).indices
    return idx, s.gather(-1, idx)


# ------------------------------------------------------------------------------------------
# σ-MoE MLP (SPEC 1.5)
# ------------------------------------------------------------------------------------------

class SigmaMoE(nn.Module):
    def __init__(self, cfg: MoEUTConfig):
        super().__init__()
        d, E, De = cfg.d_model, cfg.ff_n_experts, cfg.ff_expert_size
        self.n_experts, self.k, self.expert_dropout = E, cfg.ff_k, cfg.expert_dropout
        self.backend = cfg.cvmm_backend
        self.expert_sel = nn.Parameter(torch.empty(E, d))  # gate W_S
        self.keys = nn.Parameter(torch.empty(E, d, De))  # W1
        self.values = nn.Parameter(torch.empty(E, De, d))  # W2

    def reset_parameters(self, cfg: MoEUTConfig) -> None:
        sc, d = cfg.init_scale, cfg.d_model
        nn.init.normal_(self.expert_sel, 0, sc / math.sqrt(d))
        if cfg.mlp_gate_renorm:  # slim-code parity only (SPEC 1.6 discrepancy)
            renorm_keep_std(self.expert_sel, dim=1)
        nn.init.normal_(self.keys, 0, sc / math.sqrt(d))
        # Fan-in over *all* experts, not K*d_expert (SPEC 1.6).
        nn.init.normal_(self.values, 0, sc / math.sqrt(cfg.ff_n_experts * cfg.ff_expert_size))

    def forward(self, x_BTd: torch.Tensor, gate_in_BTd: torch.Tensor, g: int, state: ForwardState) -> torch.Tensor:
        B, T, d = x_BTd.shape
        z_BTE = F.linear(gate_in_BTd, self.expert_sel).float()  # matmul in autocast dtype, then fp32
        state.add_gate_logits("mlp", g, z_BTE)
        idx_BTK, gate_BTK = sigmoid_topk(z_BTE, self.k, self.training, self.expert_dropout)
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


# ------------------------------------------------------------------------------------------
# SwitchHead attention (SPEC 1.3)
# ------------------------------------------------------------------------------------------

class SwitchHeadAttention(nn.Module):
    def __init__(self, cfg: MoEUTConfig):
        super().__init__()
        d, H, D, E = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.att_n_experts
        self.n_heads, self.d_head, self.n_experts, self.top_k = H, D, E, cfg.att_k
        self.n_rot, self.rope_base = cfg.n_rotate, cfg.rope_base
        self.expert_dropout, self.backend = cfg.expert_dropout, cfg.cvmm_backend
        self.q = nn.Linear(d, H * D, bias=False)
        self.k = nn.Linear(d, H * D, bias=False)
        self.v = nn.Parameter(torch.empty(H * E, d, D))  # expert (h, e) is row h*E + e
        self.o = nn.Parameter(torch.empty(H * E, D, d))
        self.sel_v = nn.Parameter(torch.empty(H * E, d))
        self.sel_o = nn.Parameter(torch.empty(H * E, d))

    def reset_parameters(self, cfg: MoEUTConfig) -> None:
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
        idx_BTHk, gate_BTHk = sigmoid_topk(z_BTHE, self.top_k, self.training, self.expert_dropout)
        # Global expert id h*E + e: each head owns its own bank.
        head_offset = torch.arange(self.n_heads, device=u_BTd.device)[:, None] * self.n_experts
        plan = make_plan((idx_BTHk + head_offset).view(B * T, self.n_heads * self.top_k),
                         self.n_heads * self.n_experts)
        return idx_BTHk, gate_BTHk, plan

    def forward(self, qk_in_BTd, v_in_BTd, g: int, l: int, state: ForwardState,
                cache: Optional[KVCache], causal: bool = True) -> torch.Tensor:
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

        attn_mask, is_causal = None, causal
        if not causal and state.valid is not None:  # bidirectional: keys at padded positions are masked
            attn_mask = state.valid[:, None, None, :]
        if cache is not None:
            if l in cache.k:
                k_BHTD = torch.cat([cache.k[l], k_BHTD], dim=2)
                v_BHTD = torch.cat([cache.v[l], v_BHTD], dim=2)
            cache.k[l], cache.v[l] = k_BHTD, v_BHTD
            if past > 0 and causal:
                # New token i sees every cached position and new positions <= i.
                is_causal = False
                if T > 1:
                    attn_mask = torch.ones(T, past + T, dtype=torch.bool, device=q_BHTD.device).tril(past)
        o_BHTD = F.scaled_dot_product_attention(q_BHTD, k_BHTD.to(q_BHTD.dtype), v_BHTD.to(q_BHTD.dtype),
                                                attn_mask=attn_mask, is_causal=is_causal, scale=1.0)
        # Output experts: sum over heads and selected experts is one weighted reduction.
        o_NHD = o_BHTD.transpose(1, 2).reshape(B * T * H, D)
        out_Nd = cvmm(o_NHD, self.o, plan_o, src_div=k, out_group=H * k, gates=gate_o, backend=self.backend)
        return out_Nd.view(B, T, d)


# ------------------------------------------------------------------------------------------
# One unique layer, and the LM
# ------------------------------------------------------------------------------------------

class MoEUTLayer(nn.Module):
    def __init__(self, cfg: MoEUTConfig):
        super().__init__()
        self.placement = cfg.ln_placement
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.attention = SwitchHeadAttention(cfg)
        if cfg.mlp_type == "sigma_moe":
            self.ffn = SigmaMoE(cfg)
        else:  # Switch / DeepSeekMoE MLPs inside the shared layers (moeut.baselines.routers)
            from .baselines.routers import build_moe_mlp
            self.ffn = build_moe_mlp(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, g: int, l: int, state: ForwardState, cache: Optional[KVCache], causal: bool):
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


class MoEUTLM(nn.Module):
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
        """(l, g, r) for every layer application, in execution order."""
        G, R = self.config.group_size, self.config.n_repeats
        if self.config.layer_order == "abab":
            return [(r * G + g, g, r) for r in range(R) for g in range(G)]
        return [(g * R + r, g, r) for g in range(G) for r in range(R)]  # aabb: l -> g = l div R

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                cache: Optional[KVCache] = None, collect_routing: Union[bool, str] = False,
                causal: bool = True) -> LMOutput:
        """input_ids [B, T] int64. attention_mask [B, T] (1 = real token, 0 = right padding; see
        moeut.outputs "Padding contract"). collect_routing: True, or "logits" to also keep MLP gate
        logits. cache: a KVCache to extend (decoding); no regulariser is computed while decoding."""
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        training = self.training and cache is None
        state = ForwardState(training, collect_routing, valid_positions(attention_mask, input_ids, cache is not None))
        x = self.embedding(input_ids)
        if cfg.ln_placement == "post":
            x = F.layer_norm(x * math.sqrt(cfg.d_model), (cfg.d_model,))
        for l, g, r in self.execution_order():
            x_in = x
            state.new_record(l, g, r)
            x = self.transformer.layers[g](x, g, l, state, cache, causal)
            if state.record is not None:
                state.finish_record(x_in, x)
        if cache is not None:
            cache.seq_len += input_ids.shape[1]
        if self.out_norm is not None:
            x = self.out_norm(x)
        logits = self.lm_head(x)
        reg_loss, reg_terms = self._regulariser(state)
        return LMOutput(logits=logits, reg_loss=reg_loss, reg_terms=reg_terms,
                        routing=state.records if state.collect_routing else None, cache=cache)

    def _regulariser(self, state: ForwardState):
        """gamma * sum_g L_MLP,g + delta * sum_g (L_V,g + L_O,g)  (SPEC 1.7); 0 in eval mode."""
        device = self.lm_head.weight.device
        reg = torch.zeros((), dtype=torch.float32, device=device)
        terms: Dict[str, torch.Tensor] = {}
        weight = {"mlp": self.config.entropy_reg, "att_v": self.config.att_entropy_reg,
                  "att_o": self.config.att_entropy_reg}
        for (kind, g), lse_list in state.lse.items():
            if kind not in weight:  # other MLP types add their own aux losses via "aux" entries
                continue
            term = weight[kind] * entropy_reg_term(lse_list, state.seq_len[(kind, g)])
            terms[f"reg/{kind}_g{g}"] = term.detach()
            reg = reg + term
        for name, value in state.aux_losses.items():
            terms[f"aux/{name}"] = value.detach()
            reg = reg + value
        return reg, terms

    # -- decoding --------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: Optional[int] = None, greedy: bool = False, stop_token: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return generate(self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, greedy=greedy,
                        stop_token=stop_token, generator=generator)


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: Optional[int] = None, greedy: bool = False, stop_token: Optional[int] = None,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Greedy / temperature / top-k sampling with a KV cache. Returns [B, T + new] (sequences that
    emitted `stop_token` are padded with it)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    was_training = model.training
    model.eval()
    cache = KVCache()
    out = input_ids
    logits = model(input_ids, cache=cache).logits[:, -1].float()
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        if greedy:
            nxt = logits.argmax(-1)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
        if stop_token is not None:
            nxt = torch.where(done, torch.full_like(nxt, stop_token), nxt)
            done = done | (nxt == stop_token)
        out = torch.cat([out, nxt[:, None]], dim=1)
        if stop_token is not None and bool(done.all()):
            break
        logits = model(nxt[:, None], cache=cache).logits[:, -1].float()
    model.train(was_training)
    return out
