"""Learning-rate schedule (SPEC 4.2), as a closed form of the optimiser step index.

The official code calls `CosineAnnealingLR.step(epoch)` (deprecated); we compute the same value
directly, including its quirk: the cosine is indexed by i - W but spans S (not S - W), so runs
with warm-up end above lr_min (2.5888e-5 instead of 2.5e-5 for W = 4000, S = 100000).
"""
from __future__ import annotations

import math
from typing import Optional


def lr_at(i: int, lr_max: float, warmup: int, total_steps: int, min_ratio: float = 0.1,
          schedule: str = "cosine") -> float:
    """Learning rate for optimiser step i = 0, 1, ... (set before the step), SPEC 4.2: warm-up over
    `warmup` steps, then a cosine from `lr_max` to `min_ratio * lr_max` indexed by i - warmup but
    spanning `total_steps`; "constant" keeps `lr_max` (after the same warm-up). Raises ValueError
    naming optim.schedule for another schedule."""
    if schedule == "constant":
        lr = lr_max
    elif schedule == "cosine":
        lr_min = min_ratio * lr_max
        c = max(0, i - warmup)
        lr = lr_min + (lr_max - lr_min) * (1 + math.cos(math.pi * c / total_steps)) / 2
    else:
        raise ValueError(f"optim.schedule: unknown schedule {schedule!r}")
    if i < warmup:
        lr = lr * (i + 1) / warmup  # c = 0 here, so this is lr_max * (i+1)/W for the cosine
    return lr


def set_lr(optimizer, lr: float, step: Optional[int] = None) -> None:
    """Set the schedule's `lr` for optimiser step `step` on every parameter group of `optimizer`
    (one schedule for all parameters, SPEC 4.1), scaled by a group's own `lr_mult` and warm-up ramp
    when it has them (optim.groups, moeut.train_lib.optim.group_lr)."""
    from .optim import group_lr
    for group in optimizer.param_groups:
        group["lr"] = group_lr(lr, group, step)
