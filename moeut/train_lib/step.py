"""One optimiser step of training (SPEC §4.1, §4.3, §4.6).

Owns `train_step`: learning rate in, the local batch split into micro-batches, the step's totals
of the auxiliary losses' batch statistics (`step_totals`: a no-grad pre-pass, only when the step
is split and the model has such losses), forward under autocast, loss = CE + regulariser weighted
by each micro-batch's share, backward (DDP syncs the gradients on the last micro-batch only),
global grad-norm clipping, the step itself (skipped on a non-finite loss or non-finite gradients,
identically on every rank), the bias-balancing update of a σ-MoE with model.bias_balance_rate
(from the step's selections, all micro-batches and ranks) and the run-state counters. Deciding *when* to log, validate, save or
stop is the loop's (loop.py); the schedule's value is computed there (schedule.py) and passed in.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from moeut.lm import StepTotals

from .distributed import DistInfo, all_reduce_sum_
from .precision import autocast
from .schedule import set_lr
from .state import TrainState

AUX_LOSS_SCOPES = ("step", "micro_batch")  # train.aux_loss_scope (docs/architecture.md)


class NonFiniteLossError(RuntimeError):
    """Training stopped after `train.max_nonfinite` skipped steps in a row (a non-finite loss or
    non-finite gradients; raised by the loop)."""


@dataclass
class StepResult:
    """What one `train_step` did. step: index of the step run (0-based; `state.step` is now
    step + 1); loss: global mean training loss (CE + reg, nats/token; non-finite when skipped for
    it); lr: learning rate used; grad_norm: global L2 norm of the gradients before clipping (inf or
    NaN when they are not finite); finite: False when the step was skipped; skipped: None, "loss"
    (a non-finite loss) or "gradient" (a finite loss with inf/NaN gradients on some rank);
    routing_missing: routing was requested but the model returned no routing records."""
    step: int
    loss: float
    lr: float
    grad_norm: float
    finite: bool
    routing_missing: bool = False
    skipped: Optional[str] = None


def _sum_stats(into: Dict[str, Dict[str, torch.Tensor]], stats: Dict[str, Dict[str, torch.Tensor]]) -> None:
    for key, st in stats.items():
        acc = into.setdefault(key, {})
        for name, v in st.items():
            acc[name] = acc[name] + v.double() if name in acc else v.double()


def _flat(stats: Dict[str, Dict[str, torch.Tensor]]) -> List[torch.Tensor]:
    return [stats[k][s] for k in sorted(stats) for s in sorted(stats[k])]


@torch.no_grad()
def step_totals(model: torch.nn.Module, micro_batches: List[torch.Tensor], dist: DistInfo,
                autocast_dtype: Optional[torch.dtype], grad_scale: float) -> tuple:
    """The step's totals of the auxiliary losses' batch statistics (moeut.lm.StepTotals): a no-grad
    training-mode forward of every micro-batch ([b, T+1] windows) in order, the local sums
    all-reduced over ranks (one collective). The torch RNG streams (CPU, and `dist.device`'s on
    CUDA) are restored afterwards, so the real forwards draw the same dropout / sampled routing.
    Returns (StepTotals with `grad_scale`, this rank's local sums for the consistency check)."""
    device = dist.device
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    local: Dict[str, Dict[str, torch.Tensor]] = {}
    try:
        for w in micro_batches:
            with autocast(device, autocast_dtype):
                out = model(w[:, :-1])
            _sum_stats(local, out.aux_stats)
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
    totals = {k: {s: v.clone() for s, v in st.items()} for k, st in local.items()}
    if dist.enabled:  # one collective: every rank's keys are the same (same model, same config)
        flat = _flat(totals)
        if flat:
            buf = torch.cat([t.reshape(-1) for t in flat])
            all_reduce_sum_([buf])
            offset = 0
            for t in flat:
                t.copy_(buf[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
    return StepTotals(totals=totals, grad_scale=grad_scale), local


def _check_replay(pre: Dict[str, Dict[str, torch.Tensor]], real: Dict[str, Dict[str, torch.Tensor]]) -> None:
    """Warn when the real forwards' statistics differ from the pre-pass's (a forward that is not
    deterministic: the step's auxiliary losses are then only approximately the full-batch ones)."""
    worst = 0.0
    for key in set(pre) | set(real):
        if set(pre.get(key, {})) != set(real.get(key, {})):
            worst = math.inf
            break
        for s, a in pre[key].items():
            b = real[key][s]
            worst = max(worst, float((a - b).abs().max()) / max(float(a.abs().max()), 1.0))
    if worst > 1e-4:
        warnings.warn("train.aux_loss_scope=step: the training forwards' auxiliary-loss statistics differ from "
                      "the no-grad pre-pass's (a non-deterministic forward, e.g. atomics or torch.compile "
                      "numerics): the step's balance/MIM losses are approximately, not exactly, the "
                      "full-batch ones")


def balance_selection_biases(model: torch.nn.Module, dist: DistInfo, apply: bool) -> None:
    """Bias balancing after an optimiser step (model.bias_balance_rate > 0; docs/training.md "Routing
    stability"): each σ-MoE layer's selections counted by this step's training forwards are summed
    over ranks (one collective) and its `selection_bias` is updated from the step's totals; with
    `apply` False (a skipped step) the counts are dropped. Nothing happens without such layers."""
    mods = [m for m in model.modules() if hasattr(m, "selection_bias") and hasattr(m, "update_selection_bias")]
    if not mods:
        return
    counts = torch.stack([m.load_counts.to(dist.device) if m.load_counts is not None
                          else torch.zeros(m.selection_bias.numel(), dtype=torch.float64, device=dist.device)
                          for m in mods])
    if dist.enabled:
        all_reduce_sum_([counts])
    for m, c in zip(mods, counts):
        if apply:
            m.update_selection_bias(c)
        else:
            m.load_counts = None


def train_step(state: TrainState, fwd_model: torch.nn.Module, window_BT1: torch.Tensor, lr: float, *,
               micro_batch_size: int, autocast_dtype: Optional[torch.dtype], grad_clip: Optional[float],
               collect_routing: bool = False, aux_loss_scope: str = "step") -> StepResult:
    """Run one optimiser step on this rank's windows `window_BT1` ([B/W, T+1] token ids, on the
    device) and advance `state` (step, tokens_seen, the log window, routing accumulators).

    fwd_model: what the forward runs through, `state.model` possibly wrapped by torch.compile and
    DDP (its `no_sync` skips the gradient all-reduce on all but the last micro-batch). Each of
    the B/W / micro_batch_size micro-batches contributes (CE + reg) / n_micro, so gradients equal
    a full-batch step, and DDP's average over ranks gives the global batch's (SPEC 4.3, 4.6).
    aux_loss_scope "step" (train.aux_loss_scope): auxiliary losses built from batch statistics
    (balance, MIM) are computed from the whole step's statistics (`step_totals`, a no-grad
    pre-pass when the step has more than one micro-batch or rank), so the gradients equal a
    full-batch step's; "micro_batch": each forward uses its own tokens' statistics.
    Gradients are clipped to global L2 norm `grad_clip` (None/0: no clipping, the norm is still
    measured). The loss and a non-finite-gradient flag are all-reduced so every rank takes the
    same decision: on a non-finite loss, or inf/NaN gradients on any rank, the gradients are
    dropped, the optimiser does not step (weights and optimiser state unchanged; an fp16 grad
    scaler only lowers its scale), and `state.window.nonfinite_run` counts it; otherwise the step
    is taken and the global mean loss, CE and regulariser enter the log window. The step and
    B x T tokens are counted either way. With `collect_routing` the model's routing records are
    added to `state.routing`. Raises ValueError naming train.aux_loss_scope for another scope.
    """
    if aux_loss_scope not in AUX_LOSS_SCOPES:
        raise ValueError(f"train.aux_loss_scope: {aux_loss_scope!r} is not one of {', '.join(AUX_LOSS_SCOPES)}")
    dist, optimizer, scaler, routing = state.dist, state.optimizer, state.scaler, state.routing
    device = dist.device
    set_lr(optimizer, lr, state.step)
    micro_batches = list(window_BT1.split(micro_batch_size))
    n_micro = len(micro_batches)
    uses_stats = getattr(state.model, "uses_step_statistics", None)
    totals, pre_local, real_local = None, None, {}
    if aux_loss_scope == "step" and (n_micro > 1 or dist.enabled) and callable(uses_stats) and uses_stats():
        # The plain module (no DDP / compile wrapper): no gradient sync, eager numerics.
        totals, pre_local = step_totals(state.model, micro_batches, dist, autocast_dtype,
                                        grad_scale=n_micro * dist.world_size)
    extra = {"step_totals": totals} if totals is not None else {}
    loss_sum = torch.zeros(4, dtype=torch.float64, device=device)  # loss, ce, reg (local means), bad grads
    aux_sum: Dict[str, torch.Tensor] = {}  # each auxiliary loss "aux/<name>" (local mean), logged beside train/reg
    routing_missing = False
    for k, w in enumerate(micro_batches):
        # DDP: all-reduce on the last micro-batch only; FSDP (no `no_sync`) reduce-scatters each
        # micro-batch's gradients and accumulates the shards, which sums the same gradients.
        no_sync = getattr(fwd_model, "no_sync", None)
        sync = contextlib.nullcontext() if (not dist.enabled or k == n_micro - 1 or no_sync is None) else no_sync()
        with sync:
            with autocast(device, autocast_dtype):
                out = fwd_model(w[:, :-1], collect_routing=collect_routing, **extra)
            if totals is not None:
                _sum_stats(real_local, out.aux_stats)
            ce = F.cross_entropy(out.logits.float().flatten(0, 1), w[:, 1:].flatten())
            # Each micro-batch's share of the local batch; DDP averages over ranks (SPEC 4.3/4.6).
            loss = (ce + out.reg_loss) / n_micro
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum[:3] += torch.stack([loss.detach(), ce.detach() / n_micro, out.reg_loss.detach() / n_micro]).double()
        for name, value in (getattr(out, "reg_terms", None) or {}).items():
            if name.startswith("aux/"):
                aux_sum[name] = aux_sum.get(name, 0.0) + value.detach().double() / n_micro
        if collect_routing:
            if out.routing:
                routing.update(out.routing)
            else:
                routing_missing = True
    if totals is not None:
        _check_replay(pre_local, real_local)
    if scaler is not None:
        scaler.unscale_(optimizer)
    clip = grad_clip if grad_clip else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(list(state.model.parameters()), clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: the norm over every rank's shard (a DTensor)
        grad_norm = grad_norm.full_tensor()
    # inf/NaN gradients with a finite loss (an overflow in a low-precision backward, a bad kernel):
    # flagged here, before any weight changes, and all-reduced with the loss (one collective).
    loss_sum[3] = (~torch.isfinite(grad_norm)).double()
    aux_names = sorted(aux_sum)
    aux_vec = torch.stack([aux_sum[n] for n in aux_names]).to(device) if aux_names else None
    if dist.enabled:  # global mean loss for logging / the skip decision on every rank
        all_reduce_sum_([loss_sum] + ([aux_vec] if aux_vec is not None else []))
        loss_sum[:3] /= dist.world_size
        if aux_vec is not None:
            aux_vec /= dist.world_size
    loss_val = loss_sum[0].item()
    window = state.window
    skipped = None if math.isfinite(loss_val) else "loss"
    if skipped is None and loss_sum[3].item() > 0:
        skipped = "gradient"
    if skipped is not None:
        window.nonfinite_run += 1
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:  # the scaler saw the inf/NaN in unscale_: only its scale is lowered
            scaler.update()
    else:
        window.nonfinite_run = 0
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.add(loss_val, loss_sum[1].item(), loss_sum[2].item(),
                   {n: v for n, v in zip(aux_names, aux_vec.tolist())} if aux_vec is not None else None)
    balance_selection_biases(state.model, dist, apply=skipped is None)
    step = state.step
    tokens = window_BT1.shape[0] * dist.world_size * (window_BT1.shape[1] - 1)  # global batch x T
    state.step = step + 1
    state.tokens_seen += tokens
    window.tokens += tokens
    return StepResult(step=step, loss=loss_val, lr=lr, grad_norm=float(grad_norm), finite=skipped is None,
                      routing_missing=routing_missing, skipped=skipped)
