"""Numeric precision of a training run (SPEC §4.3): which autocast dtype, whether a GradScaler.

Owns the choice `train.precision` -> (autocast dtype, GradScaler on/off) and the autocast
context every forward of training and validation runs in. Weights stay fp32 (master weights)
in every mode; only the forward's matmuls run in the autocast dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def pick_precision(precision: str, device: torch.device) -> Tuple[Optional[torch.dtype], bool]:
    """`train.precision` on `device` -> (autocast dtype or None for fp32, use a GradScaler).

    SPEC §4.3: "auto" is bf16 without a scaler on GPUs of compute capability >= 8, fp16 with a
    GradScaler on older GPUs, fp32 on CPU. An explicit "fp32" / "bf16" / "fp16" is taken as is
    (fp16 always with a scaler). Raises KeyError for any other value (to_typed rejects those
    first, naming train.precision)."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
        else:
            precision = "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return dtype, precision == "fp16"


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> torch.autocast:
    """The autocast context of a forward on `device`: `dtype` (from `pick_precision`), or
    disabled when `dtype` is None (fp32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
