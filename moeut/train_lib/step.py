"""One optimiser step of training (SPEC §4.1, §4.3, §4.6).

Owns `train_step`: learning rate in, the local batch split into micro-batches, forward under
autocast, loss = CE + regulariser weighted by each micro-batch's share, backward (DDP syncs the
gradients on the last micro-batch only), global grad-norm clipping, the step itself (skipped on
a non-finite loss) and the run-state counters. Deciding *when* to log, validate, save or stop is
the loop's (loop.py); the schedule's value is computed there (schedule.py) and passed in.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .distributed import all_reduce_sum_
from .precision import autocast
from .schedule import set_lr
from .state import TrainState


class NonFiniteLossError(RuntimeError):
    """Training stopped after `train.max_nonfinite` non-finite losses in a row (raised by the loop)."""


@dataclass
class StepResult:
    """What one `train_step` did. step: index of the step run (0-based; `state.step` is now
    step + 1); loss: global mean training loss (CE + reg, nats/token; non-finite when skipped);
    lr: learning rate used; grad_norm: global L2 norm of the gradients before clipping;
    finite: False when the step was skipped for a non-finite loss; routing_missing: routing was
    requested but the model returned no routing records."""
    step: int
    loss: float
    lr: float
    grad_norm: float
    finite: bool
    routing_missing: bool = False


def train_step(state: TrainState, fwd_model: torch.nn.Module, window_BT1: torch.Tensor, lr: float, *,
               micro_batch_size: int, autocast_dtype: Optional[torch.dtype], grad_clip: Optional[float],
               collect_routing: bool = False) -> StepResult:
    """Run one optimiser step on this rank's windows `window_BT1` ([B/W, T+1] token ids, on the
    device) and advance `state` (step, tokens_seen, the log window, routing accumulators).

    fwd_model: what the forward runs through, `state.model` possibly wrapped by torch.compile and
    DDP (its `no_sync` skips the gradient all-reduce on all but the last micro-batch). Each of
    the B/W / micro_batch_size micro-batches contributes (CE + reg) / n_micro, so gradients equal
    a full-batch step, and DDP's average over ranks gives the global batch's (SPEC 4.3, 4.6).
    Gradients are clipped to global L2 norm `grad_clip` (None/0: no clipping, the norm is still
    measured). The logged loss is all-reduced so every rank takes the same non-finite decision:
    on a non-finite loss the gradients are dropped, the optimiser does not step, and
    `state.window.nonfinite_run` counts it; otherwise the step is taken and the global mean loss,
    CE and regulariser enter the log window. The step and B x T tokens are counted either way.
    With `collect_routing` the model's routing records are added to `state.routing`.
    """
    dist, optimizer, scaler, routing = state.dist, state.optimizer, state.scaler, state.routing
    device = dist.device
    set_lr(optimizer, lr)
    n_micro = window_BT1.shape[0] // micro_batch_size
    loss_sum = torch.zeros(3, dtype=torch.float64, device=device)  # loss, ce, reg (local means)
    routing_missing = False
    for k, w in enumerate(window_BT1.split(micro_batch_size)):
        sync = contextlib.nullcontext() if (not dist.enabled or k == n_micro - 1) else fwd_model.no_sync()
        with sync:
            with autocast(device, autocast_dtype):
                out = fwd_model(w[:, :-1], collect_routing=collect_routing)
            ce = F.cross_entropy(out.logits.float().flatten(0, 1), w[:, 1:].flatten())
            # Each micro-batch's share of the local batch; DDP averages over ranks (SPEC 4.3/4.6).
            loss = (ce + out.reg_loss) / n_micro
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += torch.stack([loss.detach(), ce.detach() / n_micro, out.reg_loss.detach() / n_micro]).double()
        if collect_routing:
            if out.routing:
                routing.update(out.routing)
            else:
                routing_missing = True
    if scaler is not None:
        scaler.unscale_(optimizer)
    clip = grad_clip if grad_clip else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(list(state.model.parameters()), clip)
    if dist.enabled:  # global mean loss for logging / the non-finite decision on every rank
        all_reduce_sum_([loss_sum])
        loss_sum /= dist.world_size
    loss_val = loss_sum[0].item()
    window = state.window
    finite = math.isfinite(loss_val)
    if not finite:
        window.nonfinite_run += 1
        optimizer.zero_grad(set_to_none=True)
    else:
        window.nonfinite_run = 0
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.add(loss_val, loss_sum[1].item(), loss_sum[2].item())
    step = state.step
    tokens = window_BT1.shape[0] * dist.world_size * (window_BT1.shape[1] - 1)  # global batch x T
    state.step = step + 1
    state.tokens_seen += tokens
    window.tokens += tokens
    return StepResult(step=step, loss=loss_val, lr=lr, grad_norm=float(grad_norm), finite=finite,
                      routing_missing=routing_missing)
