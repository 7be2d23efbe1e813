"""CVMM: the expert matmul ("conditional vector-matrix multiply", SPEC §3) behind one function.

Every expert projection in MoEUT is the same operation over *slots*. A routing decision assigns
each of N rows k experts, giving S = N*k slots, slot n = row*k + j. For slot n with expert e[n]:

    y[n] = x[src(n)] @ W[e[n]]                       W: [E, D_in, D_out]

and the result is either kept per slot or reduced over groups of consecutive slots with weights:

    out[n // out_group] += gate[n] * y[n]

`src(n)` is `n // src_div` when x is *scattered* (one row per token or per token-head), or the
slot's own position in expert-sorted order when x is *grouped* (the output of a previous
projection kept in sorted order). The four uses in the model (SPEC 3.1):

    projection     x                  src_div   out_group   gates        output
    MLP up         x [N, d]           K         grouped     -            [S, d_expert] sorted
    MLP down       h [S, d_exp] sorted grouped  K           s [N, K]     [N, d]
    SwitchHead V   x [N, d]           H*k       k           s_v [N,H,k]  [N*H, d_head]
    SwitchHead O   o [N*H, d_head]    k         H*k         s_o [N,H,k]  [N, d]

Keeping the MLP's hidden activations in expert-sorted order between the up and the down
projection (ScatterMoE's "grouped in/out") means the [S, d_expert] tensor is never scattered or
gathered: the only gather is of the input rows and the only scatter-add is the final combine.

`make_plan` sorts the expert ids once per routing decision; the same plan serves both MLP
projections (SPEC 3.1 "Preparation").

Backends (selected per call by `backend=` or the MOEUT_CVMM_BACKEND environment variable):
  - "grouped_mm": pure PyTorch, `torch._grouped_mm` (one GEMM per expert group) with a custom
    autograd function whose backward gathers instead of scattering where it can. Falls back to
    a per-expert loop over `torch.split` slices when strides are not 16-byte aligned (e.g.
    d_head 82 in fp32) -- never `w[e]` indexing, whose backward is O(E*|W|) (SPEC 3.8).
  - "torch_loop": the per-expert loop always; the simplest reference.
  - "triton": the fused kernels in `moeut.kernels.cvmm_triton` (registered here on first use).
  - candidates, never chosen by "auto" (docs/kernels.md "Candidates"): "triton_buffer" (no fp32
    atomics), "triton_pad" / "grouped_mm_pad" (feature dimensions zero-padded to a multiple of
    16), "triton_pad_buffer" (both).
  - "auto": Triton for CUDA tensors when available (sm >= 80), else "grouped_mm". A Triton that
    cannot be imported or whose kernels fail to compile is never dropped silently: "auto" warns
    once (naming the cvmm_backend option and MOEUT_CVMM_BACKEND) and uses "grouped_mm"; an
    explicit "triton" raises.

Precision policy (SPEC 3.3): the op runs in the autocast dtype when autocast is on for the
input's device; without autocast it runs in the promoted dtype of input and weights, like any
PyTorch op (fp32 for the usual fp32 model; bf16/fp16 for a model cast with `.to(dtype)`, whose
residual stream must stay in that dtype; fp64 for fp64 references). [ours] The official code
uses fp32 without autocast regardless of the input dtype, which promotes a bf16 model's residual
stream to fp32 and then fails in its LayerNorms (issue 14.2). Accumulation is fp32 inside the
GEMMs; the weight gradient is returned in the weights' dtype (fp32 master weights); gate
gradients in the gates' dtype.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

# The plan and the pure-PyTorch grouped GEMMs live in a leaf module shared with `ops`; re-exported
# here because `moeut.kernels.cvmm` is the public entry point (make_plan, ExpertPlan).
from .grouped import ExpertPlan, grouped_mm, grouped_weight_grad, make_plan  # noqa: F401

BACKEND_ENV = "MOEUT_CVMM_BACKEND"
# The backends that run the Triton kernels (registered on first use): the default and candidates.
TRITON_BACKENDS = ("triton", "triton_buffer", "triton_pad", "triton_pad_buffer")


class _CVMMTorch(torch.autograd.Function):
    """Pure-PyTorch CVMM with a hand-written backward (no atomics, no O(E*|W|) traffic).

    Gates are applied on the narrower side of the projection: y = (g*x) W equals g*(x W), and
    scaling the [S, D_in] rows instead of the [S, D_out] rows is cheaper when D_in < D_out (the
    MLP down projection: 128 vs d_model). On that side the gate gradient falls out of the dX
    GEMM: dgate = <dY W^T, x>. On the output side the gate is fused into the bag-sum combine.
    """

    @staticmethod
    def forward(ctx, x, w_master, gates, order, inverse, offsets, src_div, grouped_in, out_group, grouped_out,
                force_loop):
        S = order.numel()
        E, D_in, D_out = w_master.shape
        w = w_master.to(x.dtype)  # op dtype; dW is returned in the master weights' dtype
        if grouped_in:
            xs_SI, src_S = x, None
        else:
            src_S = order // src_div
            xs_SI = x.index_select(0, src_S)
        gates_sorted_S = gates.index_select(0, order).to(x.dtype) if gates is not None else None
        gate_in = gates is not None and D_in <= D_out
        xg_SI = xs_SI * gates_sorted_S[:, None] if gate_in else xs_SI
        ys_SO = grouped_mm(xg_SI, w, offsets, force_loop)
        if grouped_out or out_group == 1:
            out = ys_SO * gates_sorted_S[:, None] if (gates is not None and not gate_in) else ys_SO
            if not grouped_out:
                out = out.index_select(0, inverse)
        else:
            # Combine: row t sums its out_group consecutive slots. embedding_bag is the fastest CPU
            # reduction measured (SPEC 3.8), is not an atomic scatter, and fuses the gate weights.
            psw = gates_sorted_S.index_select(0, inverse).view(-1, out_group) \
                if (gates is not None and not gate_in) else None
            out = F.embedding_bag(inverse.view(-1, out_group), ys_SO, mode="sum", per_sample_weights=psw)
        need_gate_grad = gates is not None and ctx.needs_input_grad[2]
        # Save the un-gathered input, not the [S, D_in] gathered copy: with src_div = K that copy
        # is K times larger (12x d_model per token at 44M). Backward re-gathers it (one
        # index_select); the gated copy is rebuilt the same way.
        ctx.save_for_backward(x, w, gates_sorted_S, ys_SO if (need_gate_grad and not gate_in) else None,
                              order, inverse, offsets, src_S)
        ctx.meta = (S, E, x.shape[0], src_div, grouped_in, out_group, grouped_out, force_loop,
                    gates.dtype if gates is not None else None, w_master.dtype, gate_in)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w, gates_sorted_S, ys_SO, order, inverse, offsets, src_S = ctx.saved_tensors
        S, E, M, src_div, grouped_in, out_group, grouped_out, force_loop, gates_dtype, w_dtype, gate_in = ctx.meta
        need_xs = ctx.needs_input_grad[1] or (gate_in and ctx.needs_input_grad[2])
        xs_SI = (x if grouped_in else x.index_select(0, src_S)) if need_xs else None
        grad_out = grad_out.contiguous()
        # Upstream gradient of every slot, in sorted order: a gather, never a scatter.
        if grouped_out:
            g_SO = grad_out
        elif out_group == 1:
            g_SO = grad_out.index_select(0, order)
        else:
            g_SO = grad_out.index_select(0, order // out_group)
        need_gate_grad = gates_sorted_S is not None and ctx.needs_input_grad[2]
        d_gates = dx = dw = None
        if gates_sorted_S is not None and not gate_in:
            if need_gate_grad:
                d_gates = (g_SO * ys_SO).sum(-1, dtype=torch.float32)
            g_SO = g_SO * gates_sorted_S[:, None]
        if ctx.needs_input_grad[0] or (need_gate_grad and gate_in):
            dxs_SI = grouped_mm(g_SO, w.transpose(1, 2), offsets, force_loop)
            if gate_in:
                if need_gate_grad:
                    d_gates = (dxs_SI * xs_SI).sum(-1, dtype=torch.float32)
                dxs_SI = dxs_SI * gates_sorted_S[:, None]
            if not ctx.needs_input_grad[0]:
                pass
            elif grouped_in:
                dx = dxs_SI
            elif M * src_div == S:
                # Each source row owns src_div consecutive slots: sum them by a bag-sum over their
                # sorted positions (a gather-reduce; no index_add).
                dx = F.embedding_bag(inverse.view(M, src_div), dxs_SI, mode="sum")
            else:
                dx = dxs_SI.new_zeros(M, dxs_SI.shape[1]).index_add_(0, src_S, dxs_SI)
        if ctx.needs_input_grad[1]:
            xg_SI = xs_SI * gates_sorted_S[:, None] if gate_in else xs_SI
            dw = grouped_weight_grad(xg_SI, g_SO, offsets, E, force_loop).to(w_dtype)
        if d_gates is not None:
            d_gates = d_gates.index_select(0, inverse).to(gates_dtype)
        return dx, dw, d_gates, None, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------
# Backend registry and dispatch
# ------------------------------------------------------------------------------------------

CVMMFn = Callable[..., torch.Tensor]
_BACKENDS: Dict[str, CVMMFn] = {}


def register_backend(name: str, fn: CVMMFn) -> None:
    """Register `fn(x, w, plan, *, src_div, grouped_in, out_group, grouped_out, gates)` as CVMM
    backend `name` (replacing one of that name). x is already in the op dtype; w is the master
    weight (the backend casts it and returns dW in w.dtype); gates [S] in slot order or None; the
    result is what `cvmm` returns. The name must also be accepted by the `cvmm_backend` option."""
    _BACKENDS[name] = fn


def _torch_backend(force_loop: bool) -> CVMMFn:
    def run(x, w, plan, *, src_div, grouped_in, out_group, grouped_out, gates):
        return _CVMMTorch.apply(x, w, gates, plan.order, plan.inverse, plan.offsets, src_div, grouped_in,
                                out_group, grouped_out, force_loop)
    return run


register_backend("grouped_mm", _torch_backend(force_loop=False))
register_backend("torch_loop", _torch_backend(force_loop=True))

# ------------------------------------------------------------------------------------------
# Candidates (none is the default; docs/kernels.md "Candidates" gives the traffic model that
# chose them and the GPU ranking script benchmarks/rank_candidates.py decides between them)
# ------------------------------------------------------------------------------------------

PAD_MULTIPLE = 16  # elements: 32-byte rows in bf16, and Triton's "divisible by 16" specialisation


def padded_dim(n: int, multiple: int = PAD_MULTIPLE) -> int:
    """n rounded up to a multiple of `multiple` (the feature width the "*_pad" backends compute with)."""
    return -(-n // multiple) * multiple


def _padded_backend(inner: str) -> CVMMFn:
    """Backend `inner` run on zero-padded feature dimensions (backends "grouped_mm_pad",
    "triton_pad", "triton_pad_buffer"): D_in and D_out are rounded up to `PAD_MULTIPLE`, x and the
    master weights are zero-padded (W stays in its master dtype, so dW is still accumulated in fp32
    and returned in it), and the padded output columns are sliced off. Exact: the padded columns
    of x and rows of W are zeros, which add exact zeros to every dot product, and the padded output
    columns are dropped; autograd through the pad and slice gives the unpadded gradients. Why:
    `torch._grouped_mm` needs 16-byte-aligned strides (else `grouped_mm` loops over experts with a
    host sync), and Triton vectorises loads only when row strides are divisible by 16 elements;
    d_model 412 and d_head 82 (moeut_44m) are neither."""
    def run(x, w, plan, *, src_div, grouped_in, out_group, grouped_out, gates):
        E, D_in, D_out = w.shape
        pad_in, pad_out = padded_dim(D_in) - D_in, padded_dim(D_out) - D_out
        if pad_in or pad_out:
            w = F.pad(w, (0, pad_out, 0, pad_in))
        if pad_in:
            x = F.pad(x, (0, pad_in))
        lay = dict(src_div=src_div, grouped_in=grouped_in, out_group=out_group, grouped_out=grouped_out, gates=gates)
        if inner in ("grouped_mm", "torch_loop") and torch.compiler.is_compiling():
            from .ops import cvmm_op  # traced as the opaque custom op, as in `cvmm`
            out = cvmm_op(x, w, plan, impl=inner, **lay)
        else:
            out = _BACKENDS[inner](x, w, plan, **lay)
        return out[:, :D_out] if pad_out else out
    return run


register_backend("grouped_mm_pad", _padded_backend("grouped_mm"))

_warned_volta = False
_triton_failure: Optional[str] = None  # why "auto" stopped using Triton in this process (warned once)

_FALLBACK_HINT = ("Fix the Triton install (see docs/kernels.md), or choose a backend explicitly with the "
                  "model option cvmm_backend (e.g. model.cvmm_backend=grouped_mm) or the environment variable "
                  f"{BACKEND_ENV}=grouped_mm, which also silences this warning.")


def _triton_fallback(reason: str) -> None:
    """'auto' on CUDA cannot use Triton: warn once, loudly, and use grouped_mm from now on."""
    global _triton_failure
    if _triton_failure is None:
        _triton_failure = reason
        warnings.warn(f"CVMM: cvmm_backend='auto' on a CUDA GPU could not use the Triton kernels ({reason}); "
                      "falling back to the PyTorch 'grouped_mm' backend for the rest of this process, which is "
                      f"slower and uses more memory. {_FALLBACK_HINT}", RuntimeWarning, stacklevel=3)


def _import_triton_backend():
    """Import the Triton kernels and register the "triton" backend; ImportError naming the option
    (cvmm_backend / MOEUT_CVMM_BACKEND) when Triton is missing or broken."""
    try:
        from . import cvmm_triton
    except Exception as e:  # ImportError, or a broken install failing inside triton
        raise ImportError(f"cvmm_backend='triton' (model option, or {BACKEND_ENV}=triton) needs a working "
                          f"Triton, but importing moeut.kernels.cvmm_triton failed: {type(e).__name__}: {e}") from e

    def _triton_backend(impl_gpu: str) -> CVMMFn:
        def run(x, w, plan, *, src_div, grouped_in, out_group, grouped_out, gates):
            from .ops import cvmm_op
            # CUDA tensors (or any tensor under the interpreter) run the kernels; CPU tensors the
            # PyTorch implementation behind the same custom op.
            impl = impl_gpu if (x.is_cuda or cvmm_triton.interpreting()) else "grouped_mm"
            return cvmm_op(x, w, plan, src_div=src_div, grouped_in=grouped_in, out_group=out_group,
                           grouped_out=grouped_out, gates=gates, impl=impl)
        return run

    register_backend("triton", _triton_backend("triton"))
    # Candidates (docs/kernels.md "Candidates"): no fp32 atomics; zero-padded feature dimensions.
    register_backend("triton_buffer", _triton_backend("triton_buffer"))
    register_backend("triton_pad", _padded_backend("triton"))
    register_backend("triton_pad_buffer", _padded_backend("triton_buffer"))


def _triton_available(device: torch.device) -> bool:
    if device.type != "cuda" or _triton_failure is not None:
        return False
    if "triton" not in _BACKENDS:
        try:
            _import_triton_backend()
        except ImportError as e:  # Triton missing or broken: the PyTorch path still works, but say so
            _triton_fallback(str(e.__cause__ or e))
            return False
    return "triton" in _BACKENDS


def _resolve(name: Optional[str], device: torch.device):
    """(backend, chosen_by_auto) for this call: MOEUT_CVMM_BACKEND env > explicit name > auto."""
    global _warned_volta
    name = os.environ.get(BACKEND_ENV) or name or "auto"
    if name == "auto":
        if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
            if not _warned_volta:
                warnings.warn("CVMM: GPU older than sm_80: using the PyTorch per-expert loop "
                              "(Triton fp16 tl.dot is broken on Volta, SPEC 3.5)")
                _warned_volta = True
            return "torch_loop", True
        return ("triton" if _triton_available(device) else "grouped_mm"), True
    if name.startswith("triton") and name not in _BACKENDS and name in TRITON_BACKENDS:
        _import_triton_backend()  # raises an ImportError naming the option if Triton is missing or broken
    if name not in _BACKENDS:
        known = sorted(set(_BACKENDS) | set(TRITON_BACKENDS))
        raise ValueError(f"cvmm_backend: unknown backend {name!r}; known: auto, {known}")
    if name in TRITON_BACKENDS:
        check_volta(device)
    return name, False


def resolve_backend(name: Optional[str], device: torch.device) -> str:
    """Backend for this call: MOEUT_CVMM_BACKEND env > explicit name > auto (SPEC 3.5).

    auto: Triton on CUDA sm >= 80, torch_loop on older GPUs, grouped_mm elsewhere. If Triton cannot
    be imported (or, see `cvmm`, its kernels fail to compile), auto warns once naming the
    cvmm_backend option / MOEUT_CVMM_BACKEND and uses grouped_mm. Raises ImportError when
    "triton" is requested explicitly and cannot be imported, ValueError for an unknown name."""
    return _resolve(name, device)[0]


def check_volta(device: torch.device) -> None:
    """Forced Triton on a pre-sm_80 GPU with half-precision autocast: refuse (SPEC 3.5)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 8:
        return
    if torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") in (torch.float16, torch.bfloat16):
        major, minor = torch.cuda.get_device_capability(device)
        raise RuntimeError(
            f"cvmm_backend='triton' with {torch.get_autocast_dtype('cuda')} autocast on a sm_{major}{minor} GPU: "
            "Triton's fp16 tl.dot returns zeros on Volta with PyTorch >= 2.2 (pytorch/pytorch#127157, "
            "triton-lang/triton#4037), and bf16 needs sm_80. Use cvmm_backend='torch_loop' (what 'auto' picks "
            "there) or run without autocast.")


def op_dtype(device_type: str, *inputs: torch.Tensor) -> torch.dtype:
    """Autocast dtype when autocast is on for this device type, else the promoted dtype of the
    floating `inputs` (fp32 if none): see "Precision policy" above (SPEC 3.3 and our deviation)."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = None
    for t in inputs:
        if t.is_floating_point():
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype or torch.float32


def cvmm(x: torch.Tensor, w: torch.Tensor, plan: ExpertPlan, *, src_div: int = 1, grouped_in: bool = False,
         out_group: int = 1, grouped_out: bool = False, gates: Optional[torch.Tensor] = None,
         backend: Optional[str] = None) -> torch.Tensor:
    """Expert matmul over the slots of `plan` (SPEC 3.1; see the module docstring for the semantics).

    x: [M, D_in] scattered rows (slot n reads row n // src_div), or [S, D_in] in sorted order if
    grouped_in. w: [E, D_in, D_out] (master weights, any float dtype). gates: [S] (or any shape
    with S elements) weights in slot order, or None.
    Returns [S, D_out] in sorted order if grouped_out, else [S // out_group, D_out] in row order,
    in the op dtype (`op_dtype`: the autocast dtype, else the promoted input dtype; SPEC 3.3).
    Differentiable in x, w and gates. `backend` (or MOEUT_CVMM_BACKEND, which wins) picks the
    implementation, see `resolve_backend`.

    Raises ValueError for inconsistent shapes (naming the expected ones) or an unknown backend,
    ImportError for an explicit "triton" without a working Triton, RuntimeError for Triton with
    half-precision autocast on a pre-sm_80 GPU (SPEC 3.5).
    """
    S = plan.n_slots
    if w.dim() != 3 or w.shape[0] != plan.n_experts:
        raise ValueError(f"cvmm: weights must be [E={plan.n_experts}, D_in, D_out], got {tuple(w.shape)}")
    if x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"cvmm: x must be [M, D_in={w.shape[1]}], got {tuple(x.shape)}")
    if grouped_in and x.shape[0] != S:
        raise ValueError(f"cvmm: grouped input needs one row per slot ({S}), got {x.shape[0]}")
    if not grouped_in and x.shape[0] * src_div != S:
        raise ValueError(f"cvmm: {x.shape[0]} rows x src_div {src_div} != {S} slots")
    if not grouped_out and S % out_group != 0:
        raise ValueError(f"cvmm: out_group {out_group} does not divide {S} slots")
    if gates is not None and gates.numel() != S:
        raise ValueError(f"cvmm: gates must have one value per slot ({S}), got {tuple(gates.shape)}")
    name, auto = _resolve(backend, x.device)
    dtype = op_dtype(x.device.type, x, w)
    gates_flat = gates.reshape(-1) if gates is not None else None
    if auto and name == "triton" and not torch.compiler.is_compiling():
        # First use compiles the kernels: a broken Triton (ptxas, driver, API mismatch) fails here.
        # Under "auto" that must not end the run, nor pass silently: warn and use grouped_mm.
        try:
            with torch.autocast(x.device.type, enabled=False):
                return _BACKENDS["triton"](x.to(dtype), w, plan, src_div=src_div, grouped_in=grouped_in,
                                           out_group=out_group, grouped_out=grouped_out, gates=gates_flat)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:
            _triton_fallback(f"the Triton kernel failed: {type(e).__name__}: {str(e)[:500]}")
            name = "grouped_mm"
    with torch.autocast(x.device.type, enabled=False):
        if name in ("grouped_mm", "torch_loop") and torch.compiler.is_compiling():
            # Under torch.compile the PyTorch backends run behind the `moeut::cvmm` custom op: dynamo
            # cannot trace torch._grouped_mm on CPU fp32 (its fake kernel wants bf16) nor the loop's
            # .tolist(); an opaque op with a fake implementation needs neither (no graph breaks).
            from .ops import cvmm_op
            return cvmm_op(x.to(dtype), w, plan, src_div=src_div, grouped_in=grouped_in, out_group=out_group,
                           grouped_out=grouped_out, gates=gates_flat, impl=name)
        return _BACKENDS[name](x.to(dtype), w, plan, src_div=src_div,
                               grouped_in=grouped_in, out_group=out_group, grouped_out=grouped_out,
                               gates=gates_flat)


def cvmm_reference(x, w, expert_ids, *, src_div=1, out_group=1, gates=None):
    """Naive oracle for tests: an explicit per-slot weight gather + einsum, in the inputs' dtype
    (pass float64 for a reference). x [M, D_in] scattered rows (slot n reads row n // src_div),
    w [E, D_in, D_out], expert_ids [..., k] (S slots), gates [S] or None -> [S // out_group, D_out]
    in slot/row order. Memory O(S * D_in * D_out): small problems only."""
    e_S = expert_ids.reshape(-1)
    S = e_S.numel()
    src = torch.arange(S, device=x.device) // src_div
    y_SO = torch.einsum("si,sio->so", x[src], w[e_S])
    if gates is not None:
        y_SO = y_SO * gates.reshape(-1)[:, None]
    if out_group == 1:
        return y_SO
    return y_SO.view(S // out_group, out_group, -1).sum(1)
