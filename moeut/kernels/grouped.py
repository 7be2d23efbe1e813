"""Expert-sorted routing plan and the pure-PyTorch grouped GEMMs behind every CVMM backend (SPEC 3.1, 3.8).

A leaf module (imports only torch): `moeut.kernels.cvmm` (dispatch, autograd function) and
`moeut.kernels.ops` (custom ops) both build on it, and neither imports the other at module level
for it, so the kernels package has no import cycle. Public names are re-exported by
`moeut.kernels.cvmm`, the package's entry point.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ExpertPlan:
    """Expert-sorted view of one routing decision (computed once, reused by every projection).

    n_slots S = N * k. Slot n belongs to row n // k and has expert id `expert_ids.flatten()[n]`.
    """

    n_experts: int
    n_slots: int
    k: int  # slots per routing row
    order: torch.Tensor  # [S] int64: slot ids in expert-sorted order (sorted position -> slot)
    inverse: torch.Tensor  # [S] int64: sorted position of each slot (slot -> sorted position)
    sorted_experts: torch.Tensor  # [S] int32: expert id of each sorted position
    offsets: torch.Tensor  # [E] int32: cumulative end of each expert's group (torch._grouped_mm `offs`)


def make_plan(expert_ids: torch.Tensor, n_experts: int) -> ExpertPlan:
    """Sort one routing decision by expert (SPEC 3.1 "Preparation"): `expert_ids` [..., k] integer
    ids in [0, n_experts) (e.g. idx_BTK, or [B, T, H, k] for SwitchHead) -> the `ExpertPlan` of its
    S = numel slots. A stable sort: slots of one expert stay in token order. Ids are not validated
    here: an out-of-range id fails in the `scatter_add_` (RuntimeError; a device assert on CUDA)."""
    k = expert_ids.shape[-1]
    flat_S = expert_ids.reshape(-1)
    # A stable sort keeps slots of one expert in token order: deterministic, and it makes the
    # gathers in the backward pass walk memory mostly forward.
    sorted_experts_S, order_S = torch.sort(flat_S, stable=True)
    inverse_S = torch.empty_like(order_S)
    inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
    # scatter_add, not bincount: bincount's output size is data-dependent (a torch.compile graph break).
    counts_E = torch.zeros(n_experts, dtype=torch.int64, device=flat_S.device)
    counts_E.scatter_add_(0, flat_S.long(), torch.ones_like(flat_S, dtype=torch.int64))
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    return ExpertPlan(n_experts=n_experts, n_slots=flat_S.numel(), k=k, order=order_S,
                      inverse=inverse_S, sorted_experts=sorted_experts_S.to(torch.int32),
                      offsets=offsets_E)


# ------------------------------------------------------------------------------------------
# Grouped GEMM primitives (pure PyTorch)
# ------------------------------------------------------------------------------------------

def _aligned(t: torch.Tensor) -> bool:
    es = t.element_size()
    return all((s * es) % 16 == 0 for s, n in zip(t.stride(), t.shape) if n > 1 and s != 1)


def _counts(offsets: torch.Tensor):
    ends = offsets.tolist()  # host sync: only on the loop fallback (CPU / odd shapes)
    return [b - a for a, b in zip([0] + ends[:-1], ends)]


# torch._grouped_mm's dtypes; others (fp64 references) take the per-expert loop.
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm(a_SI: torch.Tensor, w_EIO: torch.Tensor, offsets: torch.Tensor, force_loop: bool = False):
    """out_SO[s] = a_SI[s] @ w_EIO[e(s)] for rows grouped contiguously by expert: a_SI [S, D_in],
    w_EIO [E, D_in, D_out], offsets [E] int32 cumulative group ends -> [S, D_out] in a's dtype.
    `torch._grouped_mm` when strides are 16-byte aligned and dtypes match (fp32/bf16/fp16), else
    (or with force_loop) a per-expert loop over `torch.split` slices, never `w[e]` indexing (SPEC 3.8)."""
    if not force_loop and _aligned(a_SI) and _aligned(w_EIO) and a_SI.dtype == w_EIO.dtype \
            and a_SI.dtype in _GROUPED_MM_DTYPES:
        return torch._grouped_mm(a_SI, w_EIO, offs=offsets)
    parts = torch.split(a_SI, _counts(offsets))  # split, not slicing: one backward, no zero-fill
    out = [p @ w for p, w in zip(parts, w_EIO.unbind(0)) if p.shape[0] > 0]
    if not out:
        return a_SI.new_zeros(0, w_EIO.shape[-1])
    return torch.cat(out, 0)


def grouped_weight_grad(a_SI: torch.Tensor, g_SO: torch.Tensor, offsets: torch.Tensor, n_experts: int,
                        force_loop: bool = False):
    """dW_EIO[e] = sum over the rows s of expert e's group of a_SI[s]^T g_SO[s]: a_SI [S, D_in],
    g_SO [S, D_out], offsets [E] int32 -> [E, D_in, D_out] in a's dtype; experts without rows get 0."""
    a_IS = a_SI.t()
    if not force_loop and _aligned(a_IS) and _aligned(g_SO) and a_SI.dtype == g_SO.dtype \
            and a_SI.dtype in _GROUPED_MM_DTYPES:
        return torch._grouped_mm(a_IS, g_SO, offs=offsets)
    counts = _counts(offsets)
    out = a_SI.new_zeros(n_experts, a_SI.shape[1], g_SO.shape[1])
    for e, (pa, pg) in enumerate(zip(torch.split(a_SI, counts), torch.split(g_SO, counts))):
        if pa.shape[0] > 0:
            torch.mm(pa.t(), pg, out=out[e])
    return out
