"""PyTorch CVMM backends vs a naive per-slot einsum oracle and vs the golden cases."""
import pytest
import torch

from moeut.kernels.cvmm import cvmm, make_plan

from cvmm_util import load_golden_cases, oracle_with_grads, random_problem, run_case

BACKENDS = ["grouped_mm", "torch_loop"]
CASES = load_golden_cases()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_golden_cases(case, backend):
    out, gx, gw, gr = run_case(case, backend)
    kw = dict(atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out, case["expected_out"], **kw)
    torch.testing.assert_close(gx, case["expected_grad_x"], **kw)
    torch.testing.assert_close(gw, case["expected_grad_W"], **kw)
    if case["reduction_weight"] is not None:
        torch.testing.assert_close(gr, case["expected_grad_reduction_weight"], atol=5e-5, rtol=1e-5)
    if case["name"] == "rows_reduce_k3_unused_experts":
        assert torch.count_nonzero(gw[[3, 5]]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["rows", "slots", "heads"])
@pytest.mark.parametrize("gates", [True, False])
@pytest.mark.parametrize("k", [1, 3])
def test_vs_oracle(backend, mode, gates, k):
    x, w, ids, r, src_div, out_group = random_problem(mode, k=k if mode != "heads" else min(k, 2), gates=gates)
    ref, gx_ref, gw_ref, gr_ref = oracle_with_grads(x, w, ids, r, src_div, out_group,
                                                    cot := torch.randn(ids.numel() // out_group, w.shape[-1],
                                                                       dtype=torch.float64))
    xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
    rf = r.float().requires_grad_() if r is not None else None
    out = cvmm(xf, wf, make_plan(ids, w.shape[0]), src_div=src_div, out_group=out_group, gates=rf, backend=backend)
    (out * cot.float()).sum().backward()
    kw = dict(atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.double(), ref, **kw)
    torch.testing.assert_close(xf.grad.double(), gx_ref, **kw)
    torch.testing.assert_close(wf.grad.double(), gw_ref, **kw)
    if r is not None:
        torch.testing.assert_close(rf.grad.double(), gr_ref, **kw)
    assert torch.count_nonzero(wf.grad[5]) == 0 or mode == "heads"  # expert 5 receives zero tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_in_out_chain_matches_mlp_oracle(backend):
    """The MLP's sorted-space chain (up grouped_out -> relu -> down grouped_in) vs a per-token loop."""
    torch.manual_seed(1)
    N, d, E, De, K = 13, 16, 7, 8, 3
    x = torch.randn(N, d, requires_grad=True)
    W1 = torch.randn(E, d, De, requires_grad=True)
    W2 = torch.randn(E, De, d, requires_grad=True)
    s = torch.rand(N, K, requires_grad=True)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    plan = make_plan(ids, E)
    h = torch.relu(cvmm(x, W1, plan, src_div=K, grouped_out=True, backend=backend))
    y = cvmm(h, W2, plan, grouped_in=True, out_group=K, gates=s, backend=backend)
    ref = torch.stack([sum(s[t, j] * torch.relu(x[t] @ W1[ids[t, j]]) @ W2[ids[t, j]] for j in range(K))
                       for t in range(N)])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    cot = torch.randn_like(y)
    grads = torch.autograd.grad((y * cot).sum(), (x, W1, W2, s))
    grads_ref = torch.autograd.grad((ref * cot).sum(), (x, W1, W2, s))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_single_token_and_all_experts():
    x, w, ids, r, src_div, out_group = random_problem("rows", N=1, k=6, E=6, unused=())
    ref = oracle_with_grads(x, w, ids, r, src_div, out_group, torch.ones(1, w.shape[-1], dtype=torch.float64))[0]
    out = cvmm(x.float(), w.float(), make_plan(ids, 6), src_div=src_div, out_group=out_group, gates=r.float())
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-5)


def test_bf16_autocast_runs_in_op_dtype():
    x, w, ids, r, src_div, out_group = random_problem("rows", gates=True, dtype=torch.float32)
    w.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cvmm(x, w, make_plan(ids, 6), src_div=src_div, out_group=out_group, gates=r)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32  # fp32 master weights keep an fp32 gradient
    ref = oracle_with_grads(x, w.detach(), ids, r, src_div, out_group, torch.ones_like(out, dtype=torch.float64))[0]
    torch.testing.assert_close(out.double(), ref, atol=0.15, rtol=2e-2)


def test_bad_shapes_raise():
    x, w, ids, r, src_div, out_group = random_problem("rows")
    plan = make_plan(ids, 6)
    with pytest.raises(ValueError, match="D_in"):
        cvmm(x[:, :5].float(), w.float(), plan, src_div=src_div)
    with pytest.raises(ValueError, match="E=6"):
        cvmm(x.float(), w[:4].float(), plan, src_div=src_div)
    with pytest.raises(ValueError, match="unknown backend"):
        cvmm(x.float(), w.float(), plan, src_div=src_div, backend="nope")


# ------------------------------------------------------------------------------------------
# A broken Triton is never dropped silently (issue 14 item 5)
# ------------------------------------------------------------------------------------------

@pytest.fixture
def broken_triton_import(monkeypatch):
    """Make `from . import cvmm_triton` fail as with a missing / broken Triton, on an sm_90 'GPU'."""
    import sys
    import moeut.kernels as pkg
    import moeut.kernels.cvmm as cv
    monkeypatch.delitem(cv._BACKENDS, "triton", raising=False)
    monkeypatch.delattr(pkg, "cvmm_triton", raising=False)
    monkeypatch.setitem(sys.modules, "moeut.kernels.cvmm_triton", None)  # import raises ImportError
    monkeypatch.setattr(cv, "_triton_failure", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delenv(cv.BACKEND_ENV, raising=False)
    return cv


def test_auto_warns_loudly_when_triton_cannot_be_imported(broken_triton_import):
    cv = broken_triton_import
    with pytest.warns(RuntimeWarning, match=r"cvmm_backend.*MOEUT_CVMM_BACKEND"):
        assert cv.resolve_backend("auto", torch.device("cuda")) == "grouped_mm"
    assert cv._triton_failure is not None and "cvmm_triton" in cv._triton_failure


def test_explicit_triton_raises_when_it_cannot_be_imported(broken_triton_import, monkeypatch):
    cv = broken_triton_import
    with pytest.raises(ImportError, match=r"cvmm_backend='triton'.*MOEUT_CVMM_BACKEND=triton"):
        cv.resolve_backend("triton", torch.device("cuda"))
    monkeypatch.setenv(cv.BACKEND_ENV, "triton")  # the environment variable is an explicit request too
    with pytest.raises(ImportError, match="needs a working Triton"):
        cv.resolve_backend("auto", torch.device("cuda"))


def test_auto_falls_back_with_a_warning_when_a_triton_kernel_fails(monkeypatch):
    """A kernel that fails to compile under 'auto' (ptxas, driver, API mismatch): one loud warning,
    the correct result from grouped_mm, and no further Triton attempts in this process."""
    import moeut.kernels.cvmm as cv
    calls = []

    def failing(*a, **k):
        calls.append(1)
        raise RuntimeError("PTXASError: ptxas fatal: internal error")

    monkeypatch.setitem(cv._BACKENDS, "triton", failing)
    monkeypatch.setattr(cv, "_triton_failure", None)
    monkeypatch.setattr(cv, "_resolve", lambda name, device: (
        ("triton", True) if cv._triton_failure is None else ("grouped_mm", True)))
    x, w, ids, r, src_div, out_group = random_problem("rows", k=3)
    plan = make_plan(ids, 6)
    with pytest.warns(RuntimeWarning, match=r"ptxas.*model\.cvmm_backend=grouped_mm"):
        out = cvmm(x.float(), w.float(), plan, src_div=src_div, out_group=out_group, gates=r.float())
    ref = oracle_with_grads(x, w, ids, r, src_div, out_group, torch.ones(out.shape, dtype=torch.float64))[0]
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-5)
    cvmm(x.float(), w.float(), plan, src_div=src_div, out_group=out_group, gates=r.float())
    assert len(calls) == 1
