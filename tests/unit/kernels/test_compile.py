"""torch.compile of the tiny MoEUT on CPU: one graph (fullgraph=True), the expert path through the
`moeut::cvmm` custom ops (forward) and `moeut::cvmm_dx` / `moeut::cvmm_dw` (backward), and the
same logits, regulariser and gradients as eager."""
import sys

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from moeut.registry import get_preset
from moeut.model import MoEUTLM


REG_WEIGHT = 1.0


def _loss(out):
    return out.logits.float().square().mean() + REG_WEIGHT * out.reg_loss


def _eager_and_compiled(backend_name, compile_backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MoEUTLM(get_preset("tiny", cvmm_backend=backend_name)).train()
    ids = torch.randint(0, 512, (2, 16))  # the tiny preset's vocabulary
    out = model(ids)
    _loss(out).backward()
    eager = (out.logits.detach(), out.reg_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)  # fullgraph: a break raises
    out_c = compiled(ids)
    _loss(out_c).backward()
    got = (out_c.logits.detach(), out_c.reg_loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    return eager, got


def _recording_backend():
    """AOTAutograd with no codegen (fast on 2 cores), recording the forward and backward graphs."""
    graphs = {"fw": set(), "bw": set()}

    def record(kind):
        def compiler(gm, example_inputs):
            graphs[kind] |= {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
            return make_boxed_func(gm.forward)
        return compiler

    return aot_autograd(fw_compiler=record("fw"), bw_compiler=record("bw")), graphs


def _assert_match(eager, got, grad_atol):
    torch.testing.assert_close(got[0], eager[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], eager[1], atol=1e-6, rtol=1e-5)
    for name, g in eager[2].items():
        torch.testing.assert_close(got[2][name], g, atol=grad_atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend_name", ["auto", "triton"])
def test_compile_fullgraph_matches_eager(backend_name, monkeypatch):
    """auto (CPU -> PyTorch backend) and a forced "triton" backend, which on CPU tensors dispatches
    to the PyTorch implementation behind the same custom op."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU tensors: PyTorch impl, not the interpreter
    monkeypatch.delenv("MOEUT_CVMM_BACKEND", raising=False)
    if backend_name == "triton":
        pytest.importorskip("triton")
    backend, graphs = _recording_backend()
    eager, got = _eager_and_compiled(backend_name, backend)
    assert "moeut.cvmm.default" in graphs["fw"]
    assert {"moeut.cvmm_dx.default", "moeut.cvmm_dw.default"} <= graphs["bw"]
    _assert_match(eager, got, grad_atol=1e-7)


def test_fake_impls_match_real_shapes():
    """The fake (meta) implementations give the real output shapes and dtypes for every layout."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from moeut.kernels.cvmm import make_plan
    g = torch.Generator().manual_seed(0)
    N, E, D_in, D_out, k = 9, 5, 12, 8, 2
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    plan = make_plan(ids, E)
    S = N * k
    layouts = [  # (x rows, src_div, grouped_in, out_group, grouped_out, gates)
        (N, k, False, 1, True, False), (S, 1, True, k, False, True), (N, k, False, k, False, True),
        (N, k, False, 1, False, False), (S, 1, False, 1, False, True)]
    for rows, src_div, gin, og, gout, has_g in layouts:
        x = torch.randn(rows, D_in, generator=g)
        w = torch.randn(E, D_in, D_out, generator=g)
        gates = torch.rand(S, generator=g) if has_g else None
        args = (plan.order, plan.inverse, plan.sorted_experts, plan.offsets, gates, src_div, gin, og, gout)
        real = torch.ops.moeut.cvmm(x, w, *args, "grouped_mm")
        grad = torch.randn_like(real)
        real_dx = torch.ops.moeut.cvmm_dx(grad, x, w, *args, True, "grouped_mm")
        real_dw = torch.ops.moeut.cvmm_dw(grad, x, w, plan.order, plan.sorted_experts, plan.offsets, gates,
                                          src_div, gin, og, gout, "grouped_mm")
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fx, fw = mode.from_tensor(x), mode.from_tensor(w)
            fake = torch.ops.moeut.cvmm(fx, fw, *args, "grouped_mm")
            fake_dx = torch.ops.moeut.cvmm_dx(mode.from_tensor(grad), fx, fw, *args, True, "grouped_mm")
            fake_dw = torch.ops.moeut.cvmm_dw(mode.from_tensor(grad), fx, fw, plan.order, plan.sorted_experts,
                                              plan.offsets, gates, src_div, gin, og, gout, "grouped_mm")
        for r, f in [(real, fake), *zip(real_dx, fake_dx), (real_dw, fake_dw)]:
            assert r.shape == f.shape and r.dtype == f.dtype, (rows, src_div, gin, og, gout, r.shape, f.shape)


def test_custom_op_opcheck():
    """torch.library.opcheck: schema, fake and autograd registration are consistent."""
    from moeut.kernels.cvmm import make_plan
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(5)])
    plan = make_plan(ids, 4)
    x = torch.randn(5, 8, generator=g, requires_grad=True)
    w = torch.randn(4, 8, 16, generator=g, requires_grad=True)
    gates = torch.rand(10, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.moeut.cvmm.default,
                          (x, w, plan.order, plan.inverse, plan.sorted_experts, plan.offsets, gates, 2, False, 2,
                           False, "grouped_mm"))


def _compile_in_process(monkeypatch):
    """Inductor compiles its C++ kernels in this process instead of a worker pool: the same generated
    code, without the pool's processes (each imports torch: seconds of CPU on a 2-core machine)."""
    import torch._inductor.config as inductor_config
    monkeypatch.setattr(inductor_config, "compile_threads", 1)


@pytest.mark.slow
def test_compile_inductor_matches_eager_logits_loss(monkeypatch):
    """The default inductor backend (C++ codegen on CPU; 15 s-1.5 min on 2 cores), loss on the
    logits only: every gradient through the expert path matches eager."""
    monkeypatch.setattr(sys.modules[__name__], "REG_WEIGHT", 0.0)
    _compile_in_process(monkeypatch)
    eager, got = _eager_and_compiled("auto", "inductor")
    _assert_match(eager, got, grad_atol=1e-6)


@pytest.mark.slow
def test_compile_inductor_matches_eager_with_reg_loss(monkeypatch):
    """Regression: torch 2.13's inductor miscompiled the gradient of a logsumexp over stacked
    logsumexps (the regulariser's marginal over repetitions); the model now writes it out with a
    detached max shift (moeut.model.entropy_reg_term)."""
    _compile_in_process(monkeypatch)
    eager, got = _eager_and_compiled("auto", "inductor")
    _assert_match(eager, got, grad_atol=1e-6)
