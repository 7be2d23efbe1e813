"""CVMM as `torch.library` custom ops in the `moeut` namespace (SPEC 3.4).

Three ops, each with a fake (meta) implementation so `torch.compile` traces through them without
graph breaks, and with `register_autograd` tying them together:

    moeut::cvmm      forward                      -> out
    moeut::cvmm_dx   input + gate gradients       -> (dx, d_gates)
    moeut::cvmm_dw   weight gradient              -> dW  (in the weights' dtype)

Each op takes the layout of `moeut.kernels.cvmm.cvmm` (src_div, grouped_in, out_group,
grouped_out; see that module's docstring) plus `impl`:

    "triton"                   the kernels of `moeut.kernels.cvmm_triton` (CUDA tensors, or any
                               tensor under TRITON_INTERPRET=1)
    "triton_buffer"            the same kernels with no fp32 atomics (a candidate, see
                               docs/kernels.md "Candidates"): every k-way combine and src_div-way
                               input-gradient sum goes through a per-slot buffer in the op dtype
                               summed in a fixed order, and the weight-gradient split through
                               partials summed in a fixed order (the deterministic mode's
                               arithmetic, with autotuning left on)
    "grouped_mm" / "torch_loop" PyTorch (`torch._grouped_mm`, or its per-expert loop), the same
                               math as the "grouped_mm"/"torch_loop" backends of cvmm.py

The PyTorch implementation is what CPU tensors run. It has to sit behind a custom op for
`torch.compile`: dynamo cannot trace `torch._grouped_mm` on CPU fp32 (its fake kernel insists on
bf16) nor the `.tolist()` of the loop fallback, whereas an opaque op with a fake needs neither.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .grouped import ExpertPlan, grouped_mm, grouped_weight_grad

IMPLS = ("triton", "triton_buffer", "grouped_mm", "torch_loop")
TRITON_IMPLS = ("triton", "triton_buffer")


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"moeut::cvmm: impl must be one of {IMPLS}, got {impl!r}")


def _no_atomics(impl: str) -> bool:
    """Combines and split weight gradients without atomics: impl "triton_buffer", or the
    deterministic mode (MOEUT_CVMM_DETERMINISTIC / torch.use_deterministic_algorithms)."""
    from .cvmm_triton import deterministic
    return impl == "triton_buffer" or deterministic()


# ------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------

@torch.library.custom_op("moeut::cvmm", mutates_args=())
def cvmm_fwd(x: torch.Tensor, w: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor,
             sorted_experts: torch.Tensor, offsets: torch.Tensor, gates: Optional[torch.Tensor],
             src_div: int, grouped_in: bool, out_group: int, grouped_out: bool, impl: str) -> torch.Tensor:
    """Forward of `moeut::cvmm` (SPEC 3.1, 3.4): the expert matmul in the layout of
    `moeut.kernels.cvmm.cvmm`, with the plan passed as its tensors (order/inverse [S] int64,
    sorted_experts [S] int32, offsets [E] int32). x: [M, D_in] scattered or [S, D_in] sorted
    (grouped_in), in the op dtype; w: [E, D_in, D_out] master weights (cast to x.dtype);
    gates: [S] in slot order or None. Returns [S, D_out] sorted if grouped_out, else
    [S // out_group, D_out] in row order, in x.dtype. ValueError for an unknown `impl`."""
    _check_impl(impl)
    a_idx_S = None if grouped_in else order // src_div  # source row of each sorted slot
    scale_S = gates.index_select(0, order) if gates is not None else None  # gates in sorted order
    if impl in TRITON_IMPLS:
        from . import cvmm_triton as kt
        if grouped_out:
            out, _ = kt.fwd(x, w, sorted_experts, offsets, a_idx=a_idx_S, scale=scale_S)
        elif out_group == 1:
            out, _ = kt.fwd(x, w, sorted_experts, offsets, a_idx=a_idx_S, o_idx=order, scale=scale_S)
        elif _no_atomics(impl):
            # Deterministic combine: each slot stored once in slot order, then a fixed-order sum.
            y_SN, _ = kt.fwd(x, w, sorted_experts, offsets, a_idx=a_idx_S, o_idx=order, scale=scale_S)
            out = y_SN.view(-1, out_group, y_SN.shape[1]).sum(1)
        else:
            # Combine in the kernel: fp32 atomics into [rows, N]; no [S, N] buffer.
            out, _ = kt.fwd(x, w, sorted_experts, offsets, a_idx=a_idx_S, o_idx=order // out_group,
                            atomic=True, out_rows=order.numel() // out_group, scale=scale_S)
        return out
    xs_SI = x if grouped_in else x.index_select(0, a_idx_S)
    ys_SO = grouped_mm(xs_SI, w.to(x.dtype), offsets, force_loop=impl == "torch_loop")
    if scale_S is not None:
        ys_SO = ys_SO * scale_S.to(ys_SO.dtype)[:, None]
    if grouped_out:
        return ys_SO
    if out_group == 1:
        return ys_SO.index_select(0, inverse)
    # A gather-reduce over each row's slots (fastest CPU combine, SPEC 3.8).
    return F.embedding_bag(inverse.view(-1, out_group), ys_SO, mode="sum")


@cvmm_fwd.register_fake
def _(x, w, order, inverse, sorted_experts, offsets, gates, src_div, grouped_in, out_group, grouped_out, impl):
    S = order.shape[0]
    rows = S if grouped_out else S // out_group
    return x.new_empty(rows, w.shape[2])


# ------------------------------------------------------------------------------------------
# Input and gate gradients
# ------------------------------------------------------------------------------------------

@torch.library.custom_op("moeut::cvmm_dx", mutates_args=())
def cvmm_dx(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor,
            sorted_experts: torch.Tensor, offsets: torch.Tensor, gates: Optional[torch.Tensor],
            src_div: int, grouped_in: bool, out_group: int, grouped_out: bool, need_dgates: bool,
            impl: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Input and gate gradients of `moeut::cvmm` for upstream `grad` (shaped like the forward's
    output): dx [x.shape] in x.dtype and d_gates [S] fp32 in slot order (empty unless need_dgates),
    d_gates[n] = <g W[e]^T, x[src(n)]> (SPEC 3.1). ValueError for an unknown `impl`."""
    _check_impl(impl)
    S, M = order.numel(), x.shape[0]
    a_idx_S = None if grouped_in else order // src_div
    g_idx_S = None if grouped_out else order // out_group  # upstream row of each sorted slot
    scale_S = gates.index_select(0, order) if gates is not None else None
    need_dgates = need_dgates and gates is not None
    grad = grad.to(x.dtype)
    if impl in TRITON_IMPLS:
        from . import cvmm_triton as kt
        # dx_slot = scale * g W[e]^T: the forward kernel on transposed weights; its dot epilogue
        # against x gives the gate gradient <g W[e]^T, x> before the scale is applied.
        kw = dict(a_idx=g_idx_S, scale=scale_S, transpose_w=True,
                  dot_x=x if need_dgates else None, dot_idx=a_idx_S if need_dgates else None)
        if grouped_in:
            dx, dr_S = kt.fwd(grad, w, sorted_experts, offsets, **kw)
        elif src_div == 1:
            dx, dr_S = kt.fwd(grad, w, sorted_experts, offsets, o_idx=order, **kw)
        elif _no_atomics(impl):
            dxs, dr_S = kt.fwd(grad, w, sorted_experts, offsets, o_idx=order, **kw)
            dx = dxs.view(M, src_div, dxs.shape[1]).sum(1)
        else:
            dx, dr_S = kt.fwd(grad, w, sorted_experts, offsets, o_idx=a_idx_S, atomic=True, out_rows=M, **kw)
    else:
        g_SO = grad if grouped_out else grad.index_select(0, g_idx_S)
        dxs_SI = grouped_mm(g_SO, w.to(x.dtype).transpose(1, 2), offsets, force_loop=impl == "torch_loop")
        dr_S = None
        if need_dgates:
            xs_SI = x if grouped_in else x.index_select(0, a_idx_S)
            dr_S = (dxs_SI.float() * xs_SI.float()).sum(-1)
        if scale_S is not None:
            dxs_SI = dxs_SI * scale_S.to(dxs_SI.dtype)[:, None]
        if grouped_in:
            dx = dxs_SI
        else:
            # Each source row owns src_div consecutive slots: a gather-reduce, no index_add.
            dx = F.embedding_bag(inverse.view(M, src_div), dxs_SI, mode="sum")
    d_gates = dr_S.index_select(0, inverse) if need_dgates else x.new_empty(0, dtype=torch.float32)
    return dx.to(x.dtype), d_gates.float()


@cvmm_dx.register_fake
def _(grad, x, w, order, inverse, sorted_experts, offsets, gates, src_div, grouped_in, out_group, grouped_out,
      need_dgates, impl):
    n = order.shape[0] if (need_dgates and gates is not None) else 0
    return x.new_empty(x.shape), x.new_empty(n, dtype=torch.float32)


# ------------------------------------------------------------------------------------------
# Weight gradient
# ------------------------------------------------------------------------------------------

@torch.library.custom_op("moeut::cvmm_dw", mutates_args=())
def cvmm_dw(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, order: torch.Tensor,
            sorted_experts: torch.Tensor, offsets: torch.Tensor, gates: Optional[torch.Tensor],
            src_div: int, grouped_in: bool, out_group: int, grouped_out: bool, impl: str) -> torch.Tensor:
    """Weight gradient of `moeut::cvmm`: dW[e] = sum over sorted slots m of expert e of
    x[src(m)]^T (gate[m] grad[dst(m)]) -> [E, D_in, D_out] in w.dtype (fp32 accumulation; experts
    without slots get zeros). ValueError for an unknown `impl`."""
    _check_impl(impl)
    E = w.shape[0]
    a_idx_S = None if grouped_in else order // src_div
    g_idx_S = None if grouped_out else order // out_group
    scale_S = gates.index_select(0, order) if gates is not None else None
    grad = grad.to(x.dtype)
    if impl in TRITON_IMPLS:
        from . import cvmm_triton as kt
        return kt.dw(x, grad, offsets, E, x_idx=a_idx_S, g_idx=g_idx_S, scale=scale_S, out_dtype=w.dtype,
                     det=_no_atomics(impl))
    xs_SI = x if grouped_in else x.index_select(0, a_idx_S)
    g_SO = grad if grouped_out else grad.index_select(0, g_idx_S)
    if scale_S is not None:
        g_SO = g_SO * scale_S.to(g_SO.dtype)[:, None]
    return grouped_weight_grad(xs_SI, g_SO, offsets, E, force_loop=impl == "torch_loop").to(w.dtype)


@cvmm_dw.register_fake
def _(grad, x, w, order, sorted_experts, offsets, gates, src_div, grouped_in, out_group, grouped_out, impl):
    return w.new_empty(w.shape)


# ------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    x, w, order, inverse, sorted_experts, offsets, gates, src_div, grouped_in, out_group, grouped_out, impl = inputs
    ctx.save_for_backward(x, w, order, inverse, sorted_experts, offsets, gates)
    ctx.layout = (src_div, grouped_in, out_group, grouped_out, impl)


def _backward(ctx, grad):
    x, w, order, inverse, sorted_experts, offsets, gates = ctx.saved_tensors
    src_div, grouped_in, out_group, grouped_out, impl = ctx.layout
    need_x, need_w, need_g = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[6]
    grad = grad.contiguous()
    dx = dw = d_gates = None
    if need_x or need_g:
        dx, dg = torch.ops.moeut.cvmm_dx(grad, x, w, order, inverse, sorted_experts, offsets, gates, src_div,
                                         grouped_in, out_group, grouped_out, bool(need_g), impl)
        dx = dx if need_x else None
        d_gates = dg.to(gates.dtype) if need_g else None
    if need_w:
        dw = torch.ops.moeut.cvmm_dw(grad, x, w, order, sorted_experts, offsets, gates, src_div, grouped_in,
                                     out_group, grouped_out, impl)
    return dx, dw, None, None, None, None, d_gates, None, None, None, None, None


torch.library.register_autograd("moeut::cvmm", _backward, setup_context=_setup_context)


def cvmm_op(x: torch.Tensor, w: torch.Tensor, plan: ExpertPlan, *, src_div: int = 1, grouped_in: bool = False,
            out_group: int = 1, grouped_out: bool = False, gates: Optional[torch.Tensor] = None,
            impl: str = "triton") -> torch.Tensor:
    """The custom-op CVMM (SPEC 3.4; same contract as a `moeut.kernels.cvmm` backend: x [M, D_in] or
    [S, D_in] in the op dtype, w [E, D_in, D_out] the master weight, gates [S] in slot order or
    None): `torch.ops.moeut.cvmm` with `plan`'s tensors, traceable by `torch.compile` without graph
    breaks and differentiable in x, w and gates. `impl`: "triton" | "triton_buffer" | "grouped_mm" |
    "torch_loop" (ValueError otherwise)."""
    return torch.ops.moeut.cvmm(x, w, plan.order, plan.inverse, plan.sorted_experts, plan.offsets, gates,
                                src_div, grouped_in, out_group, grouped_out, impl)
