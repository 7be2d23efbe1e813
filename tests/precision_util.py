"""Gradient accuracy against a float64 reference of the same weights and batch (issue 13 item 2).

Used by the GPU tests (tests/unit/kernels/test_gpu_cuda.py) to compare the Triton and grouped_mm backends in
bf16 autocast with the truth, and on CPU (tests/unit/kernels/test_gpu_harness.py) to test the harness itself.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import statistics
from typing import Dict, Optional

import torch
import torch.nn.functional as F

REPORT_ENV = "MOEUT_GPU_REPORT"  # a JSON-lines file the GPU suite collects figures from


def loss_of(model, ids: torch.Tensor, autocast_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """Training loss of train.py: next-token cross-entropy (fp32 logits) + the regulariser."""
    with torch.autocast(ids.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = model(ids[:, :-1])
    ce = F.cross_entropy(out.logits.float().flatten(0, 1), ids[:, 1:].flatten())
    return ce + out.reg_loss


def grads(model, ids, autocast_dtype=None) -> Dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_of(model, ids, autocast_dtype).backward()
    # (names without torch.compile's "_orig_mod." prefix, so compiled and eager grads line up)
    out = {n.replace("_orig_mod.", ""): p.grad.detach().double().clone()
           for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def with_backend(model, backend: str):
    """A deep copy of `model` whose expert layers use CVMM backend `backend`."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if hasattr(mod, "backend") and isinstance(getattr(mod, "backend"), str):
            mod.backend = backend
    return m


@contextlib.contextmanager
def fp64_expert_ops():
    """Run the expert matmuls in float64. Without autocast the CVMM op dtype policy (SPEC 3.3) is
    fp32, which would silently make an fp64 "reference" fp32 in every expert projection."""
    import moeut.kernels.cvmm as cv
    saved = cv.op_dtype
    cv.op_dtype = lambda device_type, *inputs: torch.float64
    try:
        yield
    finally:
        cv.op_dtype = saved


def reference_grads(model, ids) -> Dict[str, torch.Tensor]:
    """float64 gradients of the same weights and batch (per-expert loop backend: plain fp64 mm)."""
    ref = with_backend(model, "torch_loop").double()
    with fp64_expert_ops():
        return grads(ref, ids, None)


def relative_errors(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Per parameter ||got - ref|| / ||ref|| (Frobenius); a parameter missing in `got` raises KeyError."""
    out = {}
    for name, r in ref.items():
        denom = r.norm().item()
        if denom == 0.0:
            continue  # e.g. an expert no token chose: both sides are exact zeros
        out[name] = (got[name] - r).norm().item() / denom
    return out


def error_summary(errs: Dict[str, float]) -> dict:
    worst = max(errs, key=errs.get)
    return dict(median=statistics.median(errs.values()), worst=errs[worst], worst_param=worst, n=len(errs))


def report(record: dict) -> None:
    """Print a figure and append it to $MOEUT_GPU_REPORT (JSON lines) when set."""
    print(json.dumps(record))
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
