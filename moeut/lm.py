"""The language-model scaffolding every architecture of the package shares (SPEC 1.4, 1.8, 1.9).

    tokens -> embed -> for (l, g, r) in execution_order: x = unique_layer[g](x) -> head -> logits

A model file (moeut/model.py for MoEUT; moeut/baselines/dense.py for dense, naive UT and the
MoE transformers; moeut/baselines/sut.py for SUT) defines only its blocks, its parameters and their
init, and subclasses `LanguageModel` with four small hooks:

    execution_order()   (l, g, r) per layer application: which unique layer g runs at depth l
    unique_layer(g)     the module of unique layer g
    embed(input_ids)    tokens -> residual stream x_BTd
    head(x_BTd)         residual stream -> logits_BTV

and, where it has one, `regulariser_terms(state)` (its own regulariser, e.g. MoEUT's entropy
terms, SPEC 1.7) or its own `layers_forward` (SUT's halting loop). Everything else lives here
once: input checks and the padding mask (moeut.outputs "Padding contract"), the per-call
`ForwardState` (regulariser inputs, auxiliary losses, routing records), the KV cache and the
causal / padding masks of attention with a cache, activation checkpointing, the regulariser hook
that turns the state into `reg_loss`, `LMOutput` assembly, and `generate`.

Shapes: B batch, T time (new positions), d model width, H heads, D head width, E experts,
V vocabulary. Suffixes name a tensor's shape (x_BTd, k_BHTD).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .outputs import LMOutput, RoutingRecord, valid_positions


# ------------------------------------------------------------------------------------------
# RoPE (SPEC 1.4): first n_rot channels of each head, rotate-half pairing, absolute positions
# ------------------------------------------------------------------------------------------

def rope_angles(positions_T: torch.Tensor, n_rot: int, base: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, n_rot] in fp32 for the absolute positions_T [T] (SPEC 1.4).

    Frequencies base^(-2i / n_rot), i = 0..n_rot/2-1, each used for two channels (rotate-half)."""
    inv_freq = base ** (-torch.arange(0, n_rot, 2, device=positions_T.device, dtype=torch.float32) / n_rot)
    theta_Tr = positions_T.float()[:, None] * inv_freq[None, :]  # [T, n_rot/2]
    theta_Tr = torch.cat([theta_Tr, theta_Tr], dim=-1)  # [T, n_rot]
    return theta_Tr.cos(), theta_Tr.sin()


def apply_rope(x_BHTD: torch.Tensor, cos_Tr: torch.Tensor, sin_Tr: torch.Tensor) -> torch.Tensor:
    """Rotate the first n_rot = cos_Tr.shape[-1] channels of each head of x_BHTD [B, H, T, D]
    (GPT-NeoX rotate-half pairing, SPEC 1.4), in fp32; returns x's dtype and shape. n_rot = 0: x."""
    n_rot = cos_Tr.shape[-1]
    if n_rot == 0:
        return x_BHTD
    rot, rest = x_BHTD[..., :n_rot], x_BHTD[..., n_rot:]
    a, b = rot.chunk(2, dim=-1)
    rotated_half = torch.cat([-b, a], dim=-1)  # rotate_half([a, b]) = [-b, a] (GPT-NeoX pairing)
    rot = (rot.float() * cos_Tr + rotated_half.float() * sin_Tr).to(x_BHTD.dtype)
    return torch.cat([rot, rest], dim=-1)


# ------------------------------------------------------------------------------------------
# KV cache and attention with a cache (SPEC 1.9)
# ------------------------------------------------------------------------------------------

@dataclass
class KVCache:
    """One (k, v) entry per *absolute* layer application l: a shared layer's weights see different
    K/V at each of its applications (SPEC 1.9). Each model stores K/V in the form its attention
    reads them (MoEUT: k after scaling and RoPE, v after expert mixing)."""

    k: Dict[int, torch.Tensor] = field(default_factory=dict)  # l -> [B, H, T_cache, D]
    v: Dict[int, torch.Tensor] = field(default_factory=dict)
    seq_len: int = 0  # tokens already in the cache (next token's absolute position)

    def append(self, l: int, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions' k/v [B, H, T, D] to entry l; returns the whole entry
        [B, H, T_cache + T, D] (the caller's model advances `seq_len` once per forward)."""
        if l in self.k:
            k_BHTD = torch.cat([self.k[l], k_BHTD], dim=2)
            v_BHTD = torch.cat([self.v[l], v_BHTD], dim=2)
        self.k[l], self.v[l] = k_BHTD, v_BHTD
        return k_BHTD, v_BHTD


def attend(q_BHTD: torch.Tensor, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor, l: int,
           cache: Optional[KVCache], *, causal: bool = True, valid_BT: Optional[torch.Tensor] = None,
           scale: Optional[float] = None) -> torch.Tensor:
    """Scaled dot-product attention of the T new queries over the cache entry l plus the new keys.

    q/k/v [B, H, T, D], RoPE already applied at absolute positions; k and v are appended to
    `cache` (when given) under layer application l. Masks: causal (new query i sees every cached
    position and the new positions <= i); bidirectional (causal=False) masks the keys at padded
    positions (valid_BT [B, T] bool, None = no padding). scale: the logits' factor (None:
    1/sqrt(D)). Returns o_BHTD [B, H, T, D] in q's dtype."""
    T = q_BHTD.shape[2]
    past = cache.seq_len if cache is not None else 0
    attn_mask, is_causal = None, causal
    if not causal and valid_BT is not None:  # bidirectional: keys at padded positions are masked
        attn_mask = valid_BT[:, None, None, :]
    if cache is not None:
        k_BHTD, v_BHTD = cache.append(l, k_BHTD, v_BHTD)
        if past > 0 and causal:
            # New token i sees every cached position and new positions <= i.
            is_causal = False
            if T > 1:
                attn_mask = torch.ones(T, past + T, dtype=torch.bool, device=q_BHTD.device).tril(past)
    return F.scaled_dot_product_attention(q_BHTD, k_BHTD.to(q_BHTD.dtype), v_BHTD.to(q_BHTD.dtype),
                                          attn_mask=attn_mask, is_causal=is_causal, scale=scale)


# ------------------------------------------------------------------------------------------
# The layer schedule (SPEC 1.1): which unique layer runs at each depth
# ------------------------------------------------------------------------------------------

def layer_schedule(group_size: int, n_repeats: int, order: str = "abab") -> List[Tuple[int, int, int]]:
    """(l, g, r) for every one of the G*R layer applications, in execution order: absolute depth l,
    unique layer g, repetition r. "abab" runs the G unique layers in turn R times (l = r*G + g,
    the paper's order); "aabb" runs each unique layer R times in a row (l = g*R + r).
    Raises ValueError naming `layer_order` for another order."""
    G, R = group_size, n_repeats
    if order == "abab":
        return [(r * G + g, g, r) for r in range(R) for g in range(G)]
    if order == "aabb":
        return [(g * R + r, g, r) for g in range(G) for r in range(R)]
    raise ValueError(f"layer_order: {order!r} is not 'abab' or 'aabb'")


# ------------------------------------------------------------------------------------------
# Per-call state: regulariser inputs, auxiliary losses, routing records
# ------------------------------------------------------------------------------------------

@dataclass
class StepTotals:
    """The optimiser step's totals of the batch statistics of auxiliary losses, passed into a
    training forward so that its losses take the global-batch form (moeut.train_lib.step computes
    them; docs/architecture.md "Batch statistics of auxiliary losses").

    totals: key -> {statistic name -> detached tensor}, each statistic summed over every
    micro-batch and rank of the step (keys as in `LMOutput.aux_stats`). grad_scale: the factor by
    which the trainer divides this forward's loss (micro-batches per rank x ranks), so that the
    step's gradient of each loss g is exactly grad g(totals) . d(statistics of the step)."""

    totals: Dict[str, Dict[str, torch.Tensor]]
    grad_scale: float = 1.0


class ForwardState:
    """What one forward collects: inputs of MoEUT's entropy regulariser (SPEC 1.7), auxiliary
    losses of other routers, and routing records (SPEC 1.8). Passed down to the layers explicitly
    (no module-level history).

    training: regulariser inputs and auxiliary losses are collected only when True (the model's
    training mode without a KV cache). collect_routing: False, True, or "logits" (records also keep
    the MLP gate logits). valid: [B, T] bool real positions, or None when nothing is padded.
    step_totals: a `StepTotals` (training steps split into micro-batches or ranks), or None: each
    auxiliary loss built from batch statistics (`add_aux_from_stats`) then uses this forward's
    own statistics."""

    def __init__(self, training: bool, collect_routing: Union[bool, str], valid: Optional[torch.Tensor] = None,
                 step_totals: Optional[StepTotals] = None):
        self.training = training
        self.step_totals = step_totals
        self.recomputing = False  # activation checkpointing's replay of a layer (for_recomputation)
        # key -> {statistic -> detached local sum} of every loss built by add_aux_from_stats, and
        # name -> how many such losses were built so far (the n of key "name#n").
        self.aux_stats: Dict[str, Dict[str, torch.Tensor]] = {}
        self.aux_counts: Dict[str, int] = {}
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
        # Detached values a model reports in reg_terms that are not losses (SUT's halting).
        self.extra_terms: Dict[str, torch.Tensor] = {}

    def for_recomputation(self, aux_counts: Optional[Dict[str, int]] = None) -> "ForwardState":
        """A throwaway state with the same flags, for activation checkpointing's recomputation of
        a layer in backward: the layer runs the same operations (so the same tensors are saved)
        but writes nothing into this forward's records, regulariser inputs or losses, which were
        consumed already (nothing is counted twice). aux_counts: `aux_counts` as they were when
        the layer first ran, so that its losses get the same keys (and step totals) again."""
        scratch = ForwardState(self.training, "logits" if self.collect_logits else self.collect_routing, self.valid,
                               self.step_totals)
        scratch.aux_counts = dict(aux_counts or {})
        scratch.recomputing = True
        if self.collect_routing:
            scratch.record = RoutingRecord(l=-1, g=-1, r=-1, valid=self.valid)
        return scratch

    def new_record(self, l: int, g: int, r: int) -> None:
        """Open layer application l's routing record (when routing is collected): unique layer g,
        repetition r."""
        if self.collect_routing:
            self.record = RoutingRecord(l=l, g=g, r=r, valid=self.valid)

    @torch.no_grad()
    def finish_record(self, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        """Close the current layer's routing record with the residual's norms (SPEC 7.2 F5):
        x_in/x_out [B, T, d] the residual stream entering / leaving the layer application."""
        xi, xo = x_in.float(), x_out.float()
        self.record.in_norm = xi.norm(dim=-1)
        self.record.update_norm = (xo - xi).norm(dim=-1)
        self.record.cos_in_out = F.cosine_similarity(xo, xi, dim=-1)
        self.records.append(self.record)
        self.record = None

    def add_aux(self, name: str, value: torch.Tensor) -> None:
        """Add an already-weighted 0-dim auxiliary loss under `name` (summed with an earlier value
        of the same name); ignored outside training."""
        if self.training:
            self.aux_losses[name] = self.aux_losses[name] + value if name in self.aux_losses else value

    def add_aux_from_stats(self, name: str, weight: float, stats: Dict[str, torch.Tensor],
                           loss_fn: Callable[[Dict[str, torch.Tensor]], torch.Tensor]) -> None:
        """Add the auxiliary loss weight * loss_fn(S) under `name`, where S = `stats` are sums over
        this forward's tokens (statistic name -> tensor; differentiable where the loss needs it) and
        loss_fn is not linear in them (balance losses, MIM). Ignored outside training.

        Without `step_totals` S is this forward's own sums (the per-micro-batch form). With them, S
        is replaced by T + c (S - S.detach()) where T are the step's totals and c the trainer's
        grad_scale: the value is loss_fn(T) exactly, and summed over the step's forwards the
        gradient is grad loss_fn(T) . dT, the full-batch step's (docs/architecture.md). Each call
        gets its own key `name#n` (n-th call with that name in this forward: a shared layer's
        repetitions); the detached local sums are kept in `aux_stats` for the trainer.
        Raises RuntimeError when the step's totals have no entry for the key (the forward that
        computed them registered other losses)."""
        if not self.training:
            return
        n = self.aux_counts.get(name, 0)
        self.aux_counts[name] = n + 1
        key = f"{name}#{n}"
        self.aux_stats[key] = {s: v.detach() for s, v in stats.items()}
        if self.step_totals is not None:
            tot = self.step_totals.totals.get(key)
            if tot is None:
                raise RuntimeError(f"step totals have no statistics for the auxiliary loss {key!r} "
                                   f"(have {sorted(self.step_totals.totals)})")
            c = self.step_totals.grad_scale
            stats = {s: tot[s].to(v.dtype) + c * (v - v.detach()) for s, v in stats.items()}
        self.add_aux(name, weight * loss_fn(stats))

    def add_gate_logits(self, kind: str, g: int, z_BTE: torch.Tensor) -> None:
        """Record the entropy regulariser's input (SPEC 1.7) of one gate application: z [B, T, E]
        or [B, T, H, E] pre-sigmoid logits; kind "mlp", "att_v" or "att_o"; g the unique layer.
        Training only."""
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


# ------------------------------------------------------------------------------------------
# The LM
# ------------------------------------------------------------------------------------------

class LanguageModel(nn.Module):
    """Base class of every LM here (MoEUTLM, DenseLM, MoETransformerLM, SUTLM): the forward loop,
    the regulariser hook, activation checkpointing and `generate`. Holds no parameters, so state
    dicts are the subclasses' own. Subclasses implement `execution_order`, `unique_layer`,
    `embed` and `head` (see the module docstring); layers are called as
    `unique_layer(g)(x_BTd, g, l, state, cache, **layer_kwargs)` and return x_BTd."""

    def __init__(self) -> None:
        super().__init__()
        self._activation_checkpointing = False

    # -- hooks ------------------------------------------------------------------------------
    def execution_order(self) -> List[Tuple[int, int, int]]:
        """(l, g, r) for every layer application in execution order: absolute depth l, unique
        layer g, repetition r. Raises NotImplementedError in the base class."""
        raise NotImplementedError(f"{type(self).__name__} must define execution_order()")

    def unique_layer(self, g: int) -> nn.Module:
        """The module of unique layer g. Raises NotImplementedError in the base class."""
        raise NotImplementedError(f"{type(self).__name__} must define unique_layer(g)")

    def embed(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] int64 -> residual stream x_BTd. Raises NotImplementedError here."""
        raise NotImplementedError(f"{type(self).__name__} must define embed(input_ids)")

    def head(self, x_BTd: torch.Tensor) -> torch.Tensor:
        """Residual stream x_BTd -> logits_BTV. Raises NotImplementedError in the base class."""
        raise NotImplementedError(f"{type(self).__name__} must define head(x)")

    def regulariser_terms(self, state: ForwardState) -> Dict[str, torch.Tensor]:
        """The model's own weighted regulariser terms (name -> 0-dim fp32), added to reg_loss before
        the auxiliary losses of `state.aux_losses`. None here; MoEUT: its entropy terms (SPEC 1.7)."""
        return {}

    # -- activation checkpointing -----------------------------------------------------------
    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each layer application's activations in backward instead of keeping them
        (torch.utils.checkpoint, use_reentrant=False; trades one extra layer forward for memory).

        Only active in training with gradients enabled (no KV cache): eval, decoding and
        no_grad run the plain code. Parameters, state-dict keys, outputs and gradients are
        unchanged: the recomputation replays the RNG state (dropout, expert dropout, sampled
        routing) and writes into a throwaway `ForwardState`, so routing records, regulariser
        inputs and auxiliary losses are counted once. Raises TypeError if `enabled` is not a bool."""
        if not isinstance(enabled, bool):
            raise TypeError(f"set_activation_checkpointing: enabled must be a bool, got {enabled!r}")
        self._activation_checkpointing = enabled

    def call_layer(self, fn: Callable[[torch.Tensor, ForwardState], object], x: torch.Tensor,
                   state: ForwardState):
        """fn(x, state): one layer application, checkpointed when activation checkpointing is on
        and this forward trains. Returns fn's output (a tensor, or a tuple of tensors)."""
        if not (self._activation_checkpointing and state.training and torch.is_grad_enabled()):
            return fn(x, state)
        calls = []
        counts_before = dict(state.aux_counts)  # this layer's losses are keyed from here on

        def run(x_in):
            # First call: the real forward. Later calls: the recomputation in backward.
            st = state if not calls else state.for_recomputation(counts_before)
            calls.append(None)
            return fn(x_in, st)

        return checkpoint(run, x, use_reentrant=False)

    # -- forward ----------------------------------------------------------------------------
    def layers_forward(self, x_BTd: torch.Tensor, state: ForwardState, cache: Optional[KVCache],
                       **layer_kwargs) -> torch.Tensor:
        """Run every layer application of `execution_order()` on x_BTd [B, T, d], opening and
        closing each application's routing record. SUT overrides this with its halting loop."""
        for l, g, r in self.execution_order():
            x_in = x_BTd
            state.new_record(l, g, r)
            # Defaults bind this application's layer, g and l: the recomputation in backward runs
            # after the loop has moved on.
            x_BTd = self.call_layer(lambda x, st, layer=self.unique_layer(g), g=g, l=l:
                                    layer(x, g, l, st, cache, **layer_kwargs), x_BTd, state)
            if state.record is not None:  # update magnitudes are meaningful for dense models too (7.2)
                state.finish_record(x_in, x_BTd)
        return x_BTd

    def uses_step_statistics(self) -> bool:
        """True when a training forward builds an auxiliary loss from batch statistics
        (`ForwardState.add_aux_from_stats`: Switch/GShard and DeepSeekMoE balance losses, SUT's
        MIM loss, with a nonzero weight), so that a step split into micro-batches or ranks needs
        the step's totals (`StepTotals`) to equal the full-batch step. Asks every submodule with
        a `uses_step_statistics` attribute; SUTLM adds its own MIM loss."""
        return any(bool(getattr(m, "uses_step_statistics", False)) for m in self.modules() if m is not self)

    def run_forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                    cache: Optional[KVCache] = None, collect_routing: Union[bool, str] = False,
                    step_totals: Optional[StepTotals] = None, **layer_kwargs) -> LMOutput:
        """The shared forward (SPEC 1.8): checks, embed, layers, head, regulariser, LMOutput.

        input_ids [B, T] int64. attention_mask [B, T] (1 = real token, 0 = right padding;
        moeut.outputs "Padding contract"). cache: a KVCache to extend (decoding; no regulariser
        or auxiliary loss is computed while decoding). collect_routing: True, or "logits" to also
        keep MLP gate logits. step_totals: the step's totals of auxiliary-loss statistics
        (`StepTotals`; training only, set by the trainer). layer_kwargs go to `layers_forward`.
        Raises ValueError for input_ids that are not [B, T] and for a bad attention_mask (see
        valid_positions)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        state = ForwardState(self.training and cache is None, collect_routing,
                             valid_positions(attention_mask, input_ids, cache is not None), step_totals)
        x_BTd = self.embed(input_ids)
        x_BTd = self.layers_forward(x_BTd, state, cache, **layer_kwargs)
        if cache is not None:
            cache.seq_len += input_ids.shape[1]
        logits = self.head(x_BTd)
        reg_loss, reg_terms = self.regulariser(state, logits.device)
        reg_terms.update(state.extra_terms)
        return LMOutput(logits=logits, reg_loss=reg_loss, reg_terms=reg_terms,
                        routing=state.records if state.collect_routing else None, cache=cache,
                        aux_stats=state.aux_stats)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                cache: Optional[KVCache] = None, collect_routing: Union[bool, str] = False,
                step_totals: Optional[StepTotals] = None) -> LMOutput:
        """input_ids [B, T] int64 -> LMOutput (logits [B, T, V], reg_loss, reg_terms, routing,
        cache, aux_stats); see `run_forward` for the arguments and the errors raised (SPEC 1.8)."""
        return self.run_forward(input_ids, attention_mask, cache=cache, collect_routing=collect_routing,
                                step_totals=step_totals)

    def regulariser(self, state: ForwardState, device: torch.device) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(reg_loss, reg_terms): 0-dim fp32 sum of `regulariser_terms(state)` and the auxiliary
        losses (0 in eval mode and while decoding), and their detached values by name
        ("aux/<name>" for auxiliary losses) for logging."""
        reg = torch.zeros((), dtype=torch.float32, device=device)
        terms: Dict[str, torch.Tensor] = {}
        for name, term in self.regulariser_terms(state).items():
            terms[name] = term.detach()
            reg = reg + term
        for name, value in state.aux_losses.items():
            terms[f"aux/{name}"] = value.detach()
            reg = reg + value.float()
        return reg, terms

    # -- decoding ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: Optional[int] = None, greedy: bool = False, stop_token: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Decode with a KV cache; see `moeut.lm.generate`."""
        return generate(self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, greedy=greedy,
                        stop_token=stop_token, generator=generator)


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: Optional[int] = None, greedy: bool = False, stop_token: Optional[int] = None,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Greedy / temperature / top-k sampling with a KV cache (SPEC 1.9), in eval mode (the model's
    mode is restored). input_ids [B, T] int64 (unpadded). Returns [B, T + new] int64: sequences that
    emitted `stop_token` are padded with it; decoding stops early once all have.
    Raises ValueError for max_new_tokens < 0 or, when sampling, temperature <= 0."""
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
