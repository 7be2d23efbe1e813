"""Softmax-routed MoE MLPs (SPEC 8.5, 8.6), usable wherever a σ-MoE fits.

A shared block, outside `moeut.baselines` so that the core MoEUT model (`moeut.model`, whose
`build_moe_mlp` picks the MLP by `mlp_type`) does not depend on the baselines package; the old path
`moeut.baselines.routers` re-exports these names. Imports only the cvmm kernel: no cycle.

Two layers, both with the σ-MoE MLP's module contract so that `MoEUTLayer` (shared layers) and the
non-shared transformers in `moeut.baselines.dense` can use them unchanged:

    __init__(cfg); reset_parameters(cfg); forward(x_BTd, gate_in_BTd, g, state) -> y_BTd

`x` feeds the experts, `gate_in` the router (in a peri-LN MoEUT layer: raw residual and LN2(x);
in a pre-LN layer both are LN2(x)). Auxiliary losses go through `state.add_aux` (training only,
summed into `reg_loss`), routing decisions into `state.record` when routing is collected.

- `SwitchMoE` — Switch / GShard top-k softmax routing as used by Du et al. (SPEC 8.6):
  p = softmax(z) over all experts (fp32); top-1 = argmax, top-2 = argmax after masking top-1;
  top-k (k >= 2) gates renormalised g = p / sum(p_selected); top-1 keeps g = p_e1 (Switch: a
  renormalised top-1 gate would be identically 1 and the router would get no gradient from the
  output). Optional capacity C = round_up_to_4(N * CF / E) per batch ("group" = all N tokens of
  the micro-batch): first choices claim slots before second choices, each in token order, and a
  slot over capacity is dropped (its gate is 0; if all of a token's slots drop, the MoE output is
  0 and the residual passes). Load balance E * sum_e f_e P_e (f_e: share of tokens whose top-1
  is e, P_e: mean probability) at weight 0.01, over the tokens of the forward, or in training of
  the whole optimiser step (moeut.lm.StepTotals); router z-loss mean_t logsumexp(z_t)^2 at 0.001.
- `DeepSeekMoE` — fine-grained + shared experts (SPEC 8.5): K_s always-on shared experts;
  s = softmax over the routed experts only; the top (K - K_s) routed experts get gate s (no
  renormalisation); expert-level balance alpha1 * sum_i f_i P_i with f_i = N'/(K'T) * count_i;
  optional device-level balance alpha2 * sum_d f'_d P'_d over D equal groups of routed experts.

Config fields (MoEUTConfig or any config with the same names): `ff_n_experts` = ALL experts
(DeepSeek: mN, shared included), `ff_k` = ALL active experts per token (DeepSeek: mK, shared
included), `ff_expert_size` (= d_expert, the width of one fine-grained expert), `moe_n_shared`
(K_s), `moe_balance_weight`, `moe_zloss_weight`, `moe_capacity_factor` (0 = dropless),
`moe_device_groups`, `moe_device_balance_weight`, `init_scale`, `cvmm_backend`.

Experts are two bias-free matrices with ReLU, exactly like σ-MoE's, and are initialised with σ-MoE's
rule (SPEC 1.6) so that in a comparison only the routing differs [ours]. Du et al. use SwiGLU
experts and DeepSeekMoE SwiGLU FFNs; neither changes the routing maths.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels.cvmm import cvmm, make_plan


# ------------------------------------------------------------------------------------------
# Loss and capacity functions (pure; tested on hand-built routings)
# ------------------------------------------------------------------------------------------

# Every loss below takes an optional `weight_N` (1 = real token, 0 = padding): padded tokens are
# then left out of every count and mean (moeut.outputs "Padding contract"). weight_N=None is all ones.

def _token_weights(weight_N: Optional[torch.Tensor], N: int, device) -> torch.Tensor:
    if weight_N is None:
        return torch.ones(N, device=device, dtype=torch.float32)
    return weight_N.reshape(N).float()


# The balance losses are not linear in the batch: each is computed from sums over tokens
# (`*_stats`, a dict of statistic -> tensor) by a `*_from_stats` function, so that training can
# sum the statistics over a whole step (micro-batches and ranks) before applying it
# (moeut.lm.ForwardState.add_aux_from_stats; docs/architecture.md).

def switch_balance_stats(probs_NE: torch.Tensor, top1_N: torch.Tensor,
                         weight_N: Optional[torch.Tensor] = None) -> dict:
    """Sums over tokens for `switch_balance_from_stats`: {"count": [E] tokens whose first choice
    is e (no gradient), "sum_p": [E] summed router probabilities, "n": 0-dim token count} (fp32)."""
    N, E = probs_NE.shape
    w_N = _token_weights(weight_N, N, probs_NE.device)
    count_E = torch.zeros(E, device=probs_NE.device, dtype=torch.float32)
    count_E.scatter_add_(0, top1_N.long(), w_N)
    return {"count": count_E, "sum_p": (probs_NE.float() * w_N[:, None]).sum(0), "n": w_N.sum()}


def switch_balance_from_stats(stats: dict) -> torch.Tensor:
    """E * sum_e f_e * P_e with f_e = count_e / n, P_e = sum_p_e / n (see switch_balance_stats)."""
    n = stats["n"].clamp_min(1.0)
    f_E, P_E = stats["count"] / n, stats["sum_p"] / n
    return f_E.shape[0] * (f_E * P_E).sum()


def switch_balance_loss(probs_NE: torch.Tensor, top1_N: torch.Tensor,
                        weight_N: Optional[torch.Tensor] = None) -> torch.Tensor:
    """E * sum_e f_e * P_e. f_e (no gradient) = share of tokens whose first choice is e;
    P_e = mean router probability. Uniform routing gives 1; all tokens on one expert with
    probability 1 gives the maximum E."""
    return switch_balance_from_stats(switch_balance_stats(probs_NE, top1_N, weight_N))


def router_z_loss(z_NE: torch.Tensor, weight_N: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(z)^2."""
    sq_N = torch.logsumexp(z_NE.float(), dim=-1).square()
    if weight_N is None:
        return sq_N.mean()
    w_N = _token_weights(weight_N, z_NE.shape[0], z_NE.device)
    return (sq_N * w_N).sum() / w_N.sum().clamp_min(1.0)


def deepseek_balance_stats(scores_NE: torch.Tensor, idx_NK: torch.Tensor,
                           weight_N: Optional[torch.Tensor] = None) -> dict:
    """Sums over tokens for DeepSeekMoE's balance losses: {"count": [N'] selections of each routed
    expert (no gradient), "sum_s": [N'] summed scores, "n": 0-dim token count} (fp32). The
    *_from_stats functions take K' (picks per token) as an argument."""
    N, E = scores_NE.shape
    K = idx_NK.shape[-1]
    w_N = _token_weights(weight_N, N, scores_NE.device)
    counts_E = torch.zeros(E, device=scores_NE.device, dtype=torch.float32)
    counts_E.scatter_add_(0, idx_NK.reshape(-1).long(), w_N[:, None].expand(N, K).reshape(-1))
    return {"count": counts_E, "sum_s": (scores_NE.float() * w_N[:, None]).sum(0), "n": w_N.sum()}


def _routed_share(stats: dict, k: int):
    """(f_E, P_E) of DeepSeekMoE's balance losses: f_i = N'/(K'*N) * #{t selects i}, P_i = mean_t s_i,t."""
    n = stats["n"].clamp_min(1.0)
    E = stats["count"].shape[0]
    return stats["count"] * (E / k) / n, stats["sum_s"] / n


def deepseek_balance_from_stats(stats: dict, k: int) -> torch.Tensor:
    """sum_i f_i P_i from `deepseek_balance_stats` sums, K' = k picks per token."""
    f_E, P_E = _routed_share(stats, k)
    return (f_E * P_E).sum()


def deepseek_device_balance_from_stats(stats: dict, k: int, n_groups: int) -> torch.Tensor:
    """sum_d f'_d P'_d from `deepseek_balance_stats` sums over D = n_groups equal consecutive
    groups of routed experts. Raises ValueError naming moe_device_groups when D does not divide N'."""
    E = stats["count"].shape[0]
    if E % n_groups:
        raise ValueError(f"moe_device_groups: {n_groups} groups do not divide {E} routed experts")
    f_E, P_E = _routed_share(stats, k)
    f_DG, P_DG = f_E.view(n_groups, E // n_groups), P_E.view(n_groups, E // n_groups)
    return (f_DG.mean(1) * P_DG.sum(1)).sum()


def deepseek_balance_loss(scores_NE: torch.Tensor, idx_NK: torch.Tensor,
                          weight_N: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Expert-level balance sum_i f_i P_i (unweighted) over N' routed experts, K' picks per token:
    f_i = N'/(K'*N) * #{t selects i} (no gradient), P_i = mean_t s_{i,t}. Uniform routing gives 1;
    all tokens on the same K' experts holding all the probability mass gives the maximum N'/K'."""
    return deepseek_balance_from_stats(deepseek_balance_stats(scores_NE, idx_NK, weight_N), idx_NK.shape[-1])


def deepseek_device_balance_loss(scores_NE: torch.Tensor, idx_NK: torch.Tensor, n_groups: int,
                                 weight_N: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Device-level balance sum_d f'_d P'_d (unweighted) with D equal consecutive groups of routed
    experts: f'_d = mean of the group's f_i, P'_d = sum of the group's P_i (SPEC 8.5)."""
    E = scores_NE.shape[1]
    if E % n_groups:
        raise ValueError(f"moe_device_groups: {n_groups} groups do not divide {E} routed experts")
    return deepseek_device_balance_from_stats(deepseek_balance_stats(scores_NE, idx_NK, weight_N),
                                              idx_NK.shape[-1], n_groups)


def expert_capacity(n_tokens, capacity_factor: float, n_experts: int):
    """C = round_up_to_4(n_tokens * CF / E) (axlearn's rule, SPEC 8.6). n_tokens: an int (-> int),
    or an integer tensor of per-group token counts (-> int64 tensor; no host synchronisation)."""
    if isinstance(n_tokens, torch.Tensor):  # the same float64 arithmetic as the int branch
        c = torch.ceil(n_tokens.double() * capacity_factor / n_experts)
        return (4 * torch.ceil(c / 4)).long()
    c = math.ceil(n_tokens * capacity_factor / n_experts)
    return int(4 * math.ceil(c / 4))


def capacity_keep_mask(idx_NK: torch.Tensor, n_experts: int, capacity,
                       valid_N: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Which routing slots fit into their expert's capacity: [..., N, K] bool.

    idx_NK: [..., N, K] expert ids; leading dims are independent groups (GShard's "groups"), each
    with its own capacity (an int, or a tensor of the leading shape). valid_N [..., N] bool: padded
    tokens (False) take no capacity and are never kept.
    Priority (GShard): every token's first choice before any second choice; within one choice
    rank, earlier tokens first. A slot is kept iff fewer than `capacity` higher-priority slots
    went to the same expert."""
    *G, N, K = idx_NK.shape
    # [..., K, N, E] one-hot in priority order (choice rank major, token minor).
    onehot_KNE = F.one_hot(idx_NK.transpose(-1, -2).long(), n_experts)
    if valid_N is not None:
        onehot_KNE = onehot_KNE * valid_N[..., None, :, None].long()
    flat = onehot_KNE.reshape(*G, K * N, n_experts)
    position = (flat.cumsum(-2) - flat)  # slots ahead of this one at the same expert
    pos_KN = (position * flat).sum(-1).view(*G, K, N)
    cap = torch.as_tensor(capacity, device=idx_NK.device)
    keep_NK = (pos_KN < cap.view(*cap.shape, *([1] * (pos_KN.dim() - cap.dim())))).transpose(-1, -2)
    if valid_N is not None:
        keep_NK = keep_NK & valid_N[..., None]
    return keep_NK


# ------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------

class _ExpertBank(nn.Module):
    """E two-layer ReLU experts without biases; `run` computes sum_j gate_j * expert_{idx_j}(x)."""

    def __init__(self, n_experts: int, d_model: int, d_expert: int, backend: str):
        super().__init__()
        self.n_experts, self.backend = n_experts, backend
        self.keys = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.values = nn.Parameter(torch.empty(n_experts, d_expert, d_model))

    def reset_parameters(self, init_scale: float, fan_in_values: int) -> None:
        """keys N(0, init_scale / sqrt(d)), values N(0, init_scale / sqrt(fan_in_values)) (SPEC 1.6)."""
        d = self.keys.shape[1]
        nn.init.normal_(self.keys, 0, init_scale / math.sqrt(d))
        nn.init.normal_(self.values, 0, init_scale / math.sqrt(fan_in_values))

    def run(self, x_Nd: torch.Tensor, idx_NK: torch.Tensor, gate_NK: torch.Tensor) -> torch.Tensor:
        """y_Nd [N, d] = sum_j gate_NK[:, j] * expert_{idx_NK[:, j]}(x_Nd), through the cvmm kernel."""
        K = idx_NK.shape[-1]
        plan = make_plan(idx_NK, self.n_experts)
        h_SDe = F.relu(cvmm(x_Nd, self.keys, plan, src_div=K, grouped_out=True, backend=self.backend))
        return cvmm(h_SDe, self.values, plan, grouped_in=True, out_group=K, gates=gate_NK, backend=self.backend)


def _record(state, idx_BTK: torch.Tensor, gate_BTK: torch.Tensor, z_BTE: torch.Tensor) -> None:
    if state.record is not None:
        state.record.mlp_idx = idx_BTK.int()
        state.record.mlp_gate = gate_BTK.detach().float()
        if getattr(state, "collect_logits", False):
            state.record.mlp_logits = z_BTE.detach().float()


# ------------------------------------------------------------------------------------------
# Switch / GShard
# ------------------------------------------------------------------------------------------

class SwitchMoE(nn.Module):
    """Switch / GShard top-k softmax-routed MoE MLP (SPEC 8.6; rules in the module docstring).

    Parameters: `router` [E, d] (W_r, no bias) and `experts` (keys [E, d, d_expert], values
    [E, d_expert, d]). Config fields: see the module docstring."""

    def __init__(self, cfg):
        super().__init__()
        d, E = cfg.d_model, cfg.ff_n_experts
        self.n_experts, self.k = E, cfg.ff_k
        self.balance_weight, self.zloss_weight = cfg.moe_balance_weight, cfg.moe_zloss_weight
        self.capacity_factor = cfg.moe_capacity_factor
        self.router = nn.Parameter(torch.empty(E, d))  # W_r (no bias)
        self.experts = _ExpertBank(E, d, cfg.ff_expert_size, cfg.cvmm_backend)

    @property
    def uses_step_statistics(self) -> bool:
        """True when the balance loss (built from batch statistics) is on; see
        moeut.lm.LanguageModel.uses_step_statistics."""
        return self.balance_weight > 0

    def reset_parameters(self, cfg) -> None:
        """σ-MoE's init rule (SPEC 1.6): router and keys N(0, init_scale / sqrt(d)), values
        N(0, init_scale / sqrt(E * d_expert))."""
        nn.init.normal_(self.router, 0, cfg.init_scale / math.sqrt(cfg.d_model))
        self.experts.reset_parameters(cfg.init_scale, cfg.ff_n_experts * cfg.ff_expert_size)

    def route(self, z_NE: torch.Tensor, seq_len: Optional[int] = None, valid_N: Optional[torch.Tensor] = None):
        """Router logits (fp32) -> probabilities, selected experts and their gates (dropping applied).

        Capacity groups (GShard's "group", SPEC 8.6): in training, all real tokens of the
        micro-batch (the usual choice; by definition it depends on the batch). In eval mode, each
        sequence of `seq_len` consecutive rows is its own group, so that a score depends neither
        on the batch size nor on the other sequences of the batch [ours; unverified what axlearn /
        Du et al. use at evaluation: SPEC 8.6 only says CF 2.0 for train and eval]. Padded rows
        (valid_N False) take no capacity and get gate 0 in both modes."""
        probs_NE = torch.softmax(z_NE, dim=-1)
        # topk(sorted=True) = argmax, then argmax of the rest ("naive" second expert).
        p_sel_NK, idx_NK = probs_NE.topk(self.k, dim=-1, sorted=True)
        gate_NK = p_sel_NK if self.k == 1 else p_sel_NK / p_sel_NK.sum(-1, keepdim=True)
        if self.capacity_factor > 0:
            N = z_NE.shape[0]
            per_sequence = not self.training and seq_len is not None
            L = seq_len if per_sequence else N  # rows per group
            idx_GLK = idx_NK.view(N // L, L, self.k)
            valid_GL = valid_N.view(N // L, L) if valid_N is not None else None
            n_tokens = valid_GL.sum(-1) if valid_GL is not None else L
            cap = expert_capacity(n_tokens, self.capacity_factor, self.n_experts)
            keep_NK = capacity_keep_mask(idx_GLK, self.n_experts, cap, valid_GL).reshape(N, self.k)
            # Renormalised before dropping (GShard): a dropped slot does not re-weight the others.
            gate_NK = gate_NK * keep_NK.to(gate_NK.dtype)
        return probs_NE, idx_NK, gate_NK

    def forward(self, x_BTd: torch.Tensor, gate_in_BTd: torch.Tensor, g: int, state) -> torch.Tensor:
        """y_BTd = sum over kept slots of gate * expert(x_BTd), routed on gate_in_BTd [B, T, d].

        g: unique-layer index (names the aux losses `balance_g{g}`, `zloss_g{g}`); state: the
        forward's `moeut.lm.ForwardState` (padding mask, aux losses in training, routing record)."""
        B, T, d = x_BTd.shape
        valid_N = state.valid.reshape(B * T) if getattr(state, "valid", None) is not None else None
        # Router in fp32 whatever the model's dtype: softmax, top-k ties and the capacity order
        # must not change with bf16 rounding of the logits' exponentials.
        z_NE = F.linear(gate_in_BTd.reshape(B * T, d), self.router).float()
        probs_NE, idx_NK, gate_NK = self.route(z_NE, T, valid_N)
        if state.training:
            if self.balance_weight > 0:  # from batch statistics: the step's totals when split (moeut.lm)
                state.add_aux_from_stats(f"balance_g{g}", self.balance_weight,
                                         switch_balance_stats(probs_NE, idx_NK[:, 0], valid_N),
                                         switch_balance_from_stats)
            if self.zloss_weight > 0:  # a token mean: a step's equal micro-batches average to it
                state.add_aux(f"zloss_g{g}", self.zloss_weight * router_z_loss(z_NE, valid_N))
        _record(state, idx_NK.view(B, T, self.k), gate_NK.view(B, T, self.k), z_NE.view(B, T, -1))
        y_Nd = self.experts.run(x_BTd.reshape(B * T, d), idx_NK, gate_NK)
        return y_Nd.view(B, T, d)


# ------------------------------------------------------------------------------------------
# DeepSeekMoE
# ------------------------------------------------------------------------------------------

class DeepSeekMoE(nn.Module):
    """DeepSeekMoE MLP (SPEC 8.5): K_s always-on shared experts + top-(K - K_s) of the routed ones.

    Parameters: `centroids` [N', d] (e_i of the routed experts), `experts` (N' routed experts),
    `shared_keys` [d, K_s * d_expert] / `shared_values` (None when K_s = 0). Raises ValueError
    naming `ff_k` when ff_k - moe_n_shared is not in [1, ff_n_experts - moe_n_shared]."""

    def __init__(self, cfg):
        super().__init__()
        d, De = cfg.d_model, cfg.ff_expert_size
        self.n_shared = cfg.moe_n_shared
        self.n_routed = cfg.ff_n_experts - cfg.moe_n_shared  # N' = mN - K_s
        self.k_routed = cfg.ff_k - cfg.moe_n_shared  # K' = mK - K_s
        if self.k_routed < 1 or self.k_routed > self.n_routed:
            raise ValueError(f"ff_k: DeepSeekMoE needs 1 <= ff_k - moe_n_shared <= ff_n_experts - moe_n_shared, "
                             f"got ff_k={cfg.ff_k}, moe_n_shared={cfg.moe_n_shared}, ff_n_experts={cfg.ff_n_experts}")
        self.balance_weight = cfg.moe_balance_weight
        self.device_groups = getattr(cfg, "moe_device_groups", 1)
        self.device_weight = getattr(cfg, "moe_device_balance_weight", 0.0)
        self.centroids = nn.Parameter(torch.empty(self.n_routed, d))  # e_i of the routed experts
        self.experts = _ExpertBank(self.n_routed, d, De, cfg.cvmm_backend)
        # K_s shared FFNs with ReLU, summed, are one FFN of width K_s * d_expert: run them densely.
        if self.n_shared > 0:
            self.shared_keys = nn.Parameter(torch.empty(d, self.n_shared * De))
            self.shared_values = nn.Parameter(torch.empty(self.n_shared * De, d))
        else:
            self.register_parameter("shared_keys", None)
            self.register_parameter("shared_values", None)

    @property
    def uses_step_statistics(self) -> bool:
        """True when an expert- or device-level balance loss (built from batch statistics) is on;
        see moeut.lm.LanguageModel.uses_step_statistics."""
        return self.balance_weight > 0 or self.device_weight > 0

    def reset_parameters(self, cfg) -> None:
        """σ-MoE's init rule (SPEC 1.6) for centroids, routed and shared experts; the values'
        fan-in is the width of all experts, shared ones included."""
        sc, d = cfg.init_scale, cfg.d_model
        nn.init.normal_(self.centroids, 0, sc / math.sqrt(d))
        # sigma-MoE rule: values' fan-in over all experts' width (shared ones included).
        fan_in = cfg.ff_n_experts * cfg.ff_expert_size
        self.experts.reset_parameters(sc, fan_in)
        if self.n_shared > 0:
            nn.init.normal_(self.shared_keys, 0, sc / math.sqrt(d))
            nn.init.normal_(self.shared_values, 0, sc / math.sqrt(fan_in))

    def route(self, z_NE: torch.Tensor):
        """Router logits z_NE [N, N'] (fp32) -> (scores_NE softmax over the routed experts,
        idx_NK [N, K'] selected routed experts, gate_NK [N, K'] their scores, not renormalised)."""
        scores_NE = torch.softmax(z_NE, dim=-1)  # over the routed experts only
        gate_NK, idx_NK = scores_NE.topk(self.k_routed, dim=-1, sorted=False)  # no renormalisation
        return scores_NE, idx_NK, gate_NK

    def forward(self, x_BTd: torch.Tensor, gate_in_BTd: torch.Tensor, g: int, state) -> torch.Tensor:
        """y_BTd = shared experts(x) + sum_j gate_j * routed expert_j(x), routed on gate_in_BTd.

        g: unique-layer index (aux losses `balance_g{g}`, `device_balance_g{g}`); state: the
        forward's `moeut.lm.ForwardState`. Records number shared experts 0..K_s-1 (gate 1)."""
        B, T, d = x_BTd.shape
        x_Nd = x_BTd.reshape(B * T, d)
        valid_N = state.valid.reshape(B * T) if getattr(state, "valid", None) is not None else None
        z_NE = F.linear(gate_in_BTd.reshape(B * T, d), self.centroids).float()  # fp32 softmax (see SwitchMoE)
        scores_NE, idx_NK, gate_NK = self.route(z_NE)
        if state.training and self.uses_step_statistics:  # the step's totals when split (moeut.lm)
            stats = deepseek_balance_stats(scores_NE, idx_NK, valid_N)
            K = self.k_routed
            if self.balance_weight > 0:
                state.add_aux_from_stats(f"balance_g{g}", self.balance_weight, stats,
                                         lambda st: deepseek_balance_from_stats(st, K))
            if self.device_weight > 0:
                state.add_aux_from_stats(f"device_balance_g{g}", self.device_weight, stats,
                                         lambda st: deepseek_device_balance_from_stats(st, K, self.device_groups))
        if state.record is not None:
            # Records use the global numbering: shared experts are 0..K_s-1 (always selected, gate 1),
            # routed expert i is K_s + i; so records have ff_k slots over ff_n_experts experts.
            shared_idx = torch.arange(self.n_shared, device=idx_NK.device).expand(B * T, self.n_shared)
            rec_idx = torch.cat([shared_idx, idx_NK + self.n_shared], dim=-1)
            rec_gate = torch.cat([torch.ones_like(gate_NK[:, :self.n_shared]).expand(B * T, self.n_shared), gate_NK], -1)
            _record(state, rec_idx.view(B, T, -1), rec_gate.view(B, T, -1), z_NE.view(B, T, -1))
        y_Nd = self.experts.run(x_Nd, idx_NK, gate_NK)
        if self.n_shared > 0:
            y_Nd = y_Nd + F.relu(x_Nd @ self.shared_keys.to(x_Nd.dtype)) @ self.shared_values.to(x_Nd.dtype)
        return y_Nd.view(B, T, d)

