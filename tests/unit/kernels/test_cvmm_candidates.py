"""The candidate CVMM backends (docs/kernels.md "Candidates"), none of them the default:

    grouped_mm_pad      torch._grouped_mm on feature dimensions zero-padded to a multiple of 16
    triton_pad          the Triton kernels on the same zero-padded dimensions
    triton_buffer       the Triton kernels without fp32 atomics (per-slot buffers summed in a fixed order)
    triton_pad_buffer   both

Each is checked against a float64 oracle (forward, dx, dW, gate gradients; every layout; an expert
that receives no slot), the golden CVMM cases, the dtype rules of SPEC 3.3 (output in the op dtype,
dW in the master weights' dtype, gate gradients in the gates' dtype), and -- for the no-atomics
candidate -- that no launch uses an atomic and that its results are bit-identical to the
deterministic mode (the same arithmetic, autotuning aside). Triton candidates run under the
interpreter on CPU (tiny shapes, one pinned config; tests/conftest.py turns it on without a GPU),
with odd widths (D_in 20, D_out 26: padded to 32) so that the padding is exercised.
"""
import pytest
import torch

from moeut.model_config import CVMM_BACKENDS
from moeut.kernels import cvmm as cv
from moeut.kernels import ops  # noqa: F401  (registers the moeut::cvmm* custom ops)
from moeut.kernels.cvmm import cvmm, make_plan, padded_dim

from cvmm_util import load_golden_cases, oracle_with_grads, random_problem, run_case

triton = pytest.importorskip("triton")
from moeut.kernels import cvmm_triton as kt  # noqa: E402

CANDIDATES = ("grouped_mm_pad", "triton_pad", "triton_buffer", "triton_pad_buffer")
TRITON_CANDIDATES = tuple(c for c in CANDIDATES if c.startswith("triton"))
CASES = load_golden_cases()
PIN = "BM=16,BN=16,BK=16,num_warps=1,num_stages=1"


def _interp_ok() -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    return kt.interpreting() and isinstance(triton.language.sum, InterpretedFunction)


INTERP = _interp_ok()


def _needs(backend):
    """Triton candidates need the interpreter in this process (else they would silently run the
    PyTorch implementation on CPU tensors and test nothing of the kernels)."""
    if backend.startswith("triton") and not INTERP:
        pytest.skip("Triton interpreter not active in this process (tests/conftest.py sets it without a GPU)")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.setenv(kt.CONFIG_ENV, PIN)
    for var in (kt.DETERMINISTIC_ENV, kt.TILING_ENV, kt.DW_SPLIT_ENV, kt.TF32_ENV, cv.BACKEND_ENV):
        monkeypatch.delenv(var, raising=False)
    yield


def _grads(x, w, ids, r, src_div, out_group, cot, backend, x_dtype, w_dtype=torch.float32, autocast=None):
    """(out, dx, dW, d_gates) of sum(out * cot) through cvmm(backend=...)."""
    x = x.to(x_dtype).detach().requires_grad_()
    w = w.to(w_dtype).detach().requires_grad_()
    r = r.float().reshape(-1).detach().requires_grad_() if r is not None else None
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = cvmm(x, w, make_plan(ids, w.shape[0]), src_div=src_div, out_group=out_group, gates=r,
                   backend=backend)
    (out.double() * cot).sum().backward()
    return [out, x.grad, w.grad, r.grad if r is not None else None]


def _close(got, want, rtol):
    for name, a, b in zip(("out", "dx", "dW", "dgates"), got, want):
        if b is None:
            assert a is None, name
            continue
        err = (a.double() - b.double().reshape(a.shape)).abs().max().item()
        scale = b.double().abs().max().item() + 1e-12
        assert err <= rtol * scale, f"{name}: max|diff| {err:.3e} > {rtol} * {scale:.3e}"


def test_candidates_are_options_but_not_the_default():
    from moeut.model_config import MoEUTConfig
    assert set(CANDIDATES) <= set(CVMM_BACKENDS)
    assert MoEUTConfig.cvmm_backend == "auto"
    # auto never picks a candidate: on CPU it is grouped_mm
    assert cv.resolve_backend("auto", torch.device("cpu")) == "grouped_mm"
    assert all(cv.resolve_backend(c, torch.device("cpu")) == c for c in CANDIDATES)


def test_padded_dim():
    assert [padded_dim(n) for n in (1, 16, 17, 82, 128, 412, 1024)] == [16, 16, 32, 96, 128, 416, 1024]


@pytest.mark.triton
@pytest.mark.parametrize("backend", CANDIDATES)
@pytest.mark.parametrize("mode", ["rows", "slots", "heads"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_vs_fp64_oracle(backend, mode, dtype):
    """Forward, dx, dW and gate gradients vs float64, odd widths (padded 20 -> 32, 26 -> 32), k 2,
    expert 5 never selected (its dW must be exactly zero). fp16: x and W in fp16 (a `.to(fp16)`
    model), so the op dtype is fp16 and dW comes back in fp16."""
    _needs(backend)
    k = 2
    x, w, ids, r, src_div, out_group = random_problem(mode, k=k, D_in=20, D_out=26, N=13)
    cot = torch.randn(ids.numel() // out_group, w.shape[-1], dtype=torch.float64,
                      generator=torch.Generator().manual_seed(1))
    want = list(oracle_with_grads(x, w, ids, r, src_div, out_group, cot))
    got = _grads(x, w, ids, r, src_div, out_group, cot, backend, dtype, w_dtype=dtype)
    _close(got, want, 1e-5 if dtype == torch.float32 else 3e-3)
    assert got[0].dtype == got[1].dtype == dtype and got[2].dtype == dtype  # op dtype; dW in W's dtype
    assert got[0].shape == (ids.numel() // out_group, 26) and got[1].shape == x.shape and got[2].shape == w.shape
    if r is not None:
        assert got[3].dtype == torch.float32
    if mode != "heads":
        assert torch.count_nonzero(got[2][5]) == 0


@pytest.mark.triton
@pytest.mark.parametrize("backend", CANDIDATES)
def test_autocast_dtype_rules(backend):
    """fp16 autocast over an fp32 model: output in fp16, dx in x's fp32, dW in the fp32 master
    dtype (accumulated in fp32, not rounded through fp16), gate gradients in fp32."""
    _needs(backend)
    x, w, ids, r, src_div, out_group = random_problem("rows", k=3, D_in=20, D_out=26, N=9)
    cot = torch.randn(ids.numel() // out_group, 26, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    want = list(oracle_with_grads(x, w, ids, r, src_div, out_group, cot))
    got = _grads(x, w, ids, r, src_div, out_group, cot, backend, torch.float32, autocast=torch.float16)
    _close(got, want, 3e-3)
    assert got[0].dtype == torch.float16
    assert got[1].dtype == got[2].dtype == got[3].dtype == torch.float32
    # dW accumulated in fp32: its error is far below fp16 rounding of the result itself
    ref = _grads(x, w, ids, r, src_div, out_group, cot, "grouped_mm", torch.float32, autocast=torch.float16)
    _close([got[2]], [ref[2]], 2e-3)


@pytest.mark.triton
@pytest.mark.parametrize("backend", CANDIDATES)
def test_mlp_chain(backend):
    """Up (grouped_out, D_in 20 padded) -> ReLU -> down (grouped_in, gates, D_out 20 padded), all
    gradients, vs a per-token float64 loop: the layout pair the σ-MoE MLP uses."""
    _needs(backend)
    g = torch.Generator().manual_seed(3)
    N, d, E, De, K = 9, 20, 7, 16, 3
    x = torch.randn(N, d, generator=g, dtype=torch.float64)
    W1 = torch.randn(E, d, De, generator=g, dtype=torch.float64)
    W2 = torch.randn(E, De, d, generator=g, dtype=torch.float64)
    s = torch.rand(N, K, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    leaves = [t.float().requires_grad_() for t in (x, W1, W2, s)]
    plan = make_plan(ids, E)
    h = torch.relu(cvmm(leaves[0], leaves[1], plan, src_div=K, grouped_out=True, backend=backend))
    y = cvmm(h, leaves[2], plan, grouped_in=True, out_group=K, gates=leaves[3], backend=backend)
    ref_leaves = [t.clone().requires_grad_() for t in (x, W1, W2, s)]
    xr, W1r, W2r, sr = ref_leaves
    ref = torch.stack([sum(sr[t, j] * torch.relu(xr[t] @ W1r[ids[t, j]]) @ W2r[ids[t, j]] for j in range(K))
                       for t in range(N)])
    _close([y], [ref], 1e-5)
    cot = torch.randn(N, d, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((y.double() * cot).sum(), leaves)
    grads_ref = torch.autograd.grad((ref * cot).sum(), ref_leaves)
    for a, b in zip(grads, grads_ref):
        _close([a], [b], 1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("backend", ["grouped_mm_pad", "triton_pad_buffer"])  # the others: oracle tests above
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_golden_cases(backend, case):
    _needs(backend)
    out, gx, gw, gr = run_case(case, backend)
    kw = dict(atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out, case["expected_out"], **kw)
    torch.testing.assert_close(gx, case["expected_grad_x"], **kw)
    torch.testing.assert_close(gw, case["expected_grad_W"], **kw)
    if case["reduction_weight"] is not None:
        torch.testing.assert_close(gr, case["expected_grad_reduction_weight"], atol=5e-5, rtol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("backend", ["triton_buffer", "triton_pad_buffer"])
def test_no_atomics_bit_identical_to_deterministic_mode(backend, monkeypatch):
    """The no-atomics candidates do the deterministic mode's arithmetic (per-slot buffers, a
    fixed-order sum, split partials for dW): with the same config and dW split, bit for bit."""
    _needs(backend)
    monkeypatch.setenv(kt.DW_SPLIT_ENV, "2")
    x, w, ids, r, src_div, out_group = random_problem("rows", k=3, D_in=20, D_out=26, N=9)
    cot = torch.randn(ids.numel() // out_group, 26, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    got = _grads(x, w, ids, r, src_div, out_group, cot, backend, torch.float32)
    monkeypatch.setenv(kt.DETERMINISTIC_ENV, "1")
    det = _grads(x, w, ids, r, src_div, out_group, cot, "triton_pad" if "pad" in backend else "triton",
                 torch.float32)
    for a, b in zip(got, det):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", ["triton", "triton_buffer"])
def test_buffer_candidate_launches_no_atomics(impl, monkeypatch):
    """Recorded launches (the GPU code path, no kernel run) of a forward + both gradients in every
    combining layout: "triton_buffer" uses no atomic; the default does (so the check can fail)."""
    monkeypatch.setenv(kt.DW_SPLIT_ENV, "2")  # force the split dW, which the default combines atomically
    launches = []
    for mode in ("rows", "heads"):
        x, w, ids, r, src_div, out_group = random_problem(mode, k=2, dtype=torch.float32)
        plan = make_plan(ids, w.shape[0])
        gates = r.reshape(-1)
        args = (plan.order, plan.inverse, plan.sorted_experts, plan.offsets, gates, src_div, False, out_group, False)
        grad = torch.randn(ids.numel() // out_group, w.shape[-1])
        with kt.recording() as rec:
            torch.ops.moeut.cvmm.default(x, w, *args, impl)
            torch.ops.moeut.cvmm_dx.default(grad, x, w, *args, True, impl)
            torch.ops.moeut.cvmm_dw.default(grad, x, w, plan.order, plan.sorted_experts, plan.offsets, gates,
                                            src_div, False, out_group, False, impl)
        launches += rec.launches
    atomics = [ln for ln in launches if ln["constexprs"].get("OUT_ATOMIC") or ln["constexprs"].get("ATOMIC")]
    assert len(launches) >= 6
    if impl == "triton_buffer":
        assert atomics == []
        assert not kt.deterministic()  # configs stay autotuned: only the combine changes
    else:
        assert len(atomics) >= 3  # forward combine, dx sum, split dW


def test_pad_candidate_launches_aligned_strides():
    """Recorded launches of "triton_pad" at moeut_44m's odd widths (d 412, d_head 82): every row
    stride and every feature width the kernels see is a multiple of 16 (Triton's divisibility
    specialisation, which vectorises loads), while the default "triton" sees 412 and 82."""
    from moeut.tools import footprint as fp
    from moeut.registry import get_preset

    def classes(backend):
        cfg = get_preset("moeut_44m", cvmm_backend=backend, n_layers=2, group_size=2, vocab_size=256)
        specs = fp.summarise(fp.trace(cfg, "bf16", batch=2, seq_len=64, steps=["train"], trace_tokens=16))["specs"]
        return [dict(s.int_classes) for s in specs]

    def odd(cl):
        return [n for n, c in cl.items() if n.startswith(("stride", "K", "N")) and c not in ("D", "1")]

    padded, default = classes("triton_pad"), classes("triton")
    assert padded and all(odd(c) == [] for c in padded), [odd(c) for c in padded]
    assert any(odd(c) for c in default)


@pytest.mark.parametrize("name", ["tiny.pt", "small_g3.pt"])
@pytest.mark.parametrize("backend", ["grouped_mm_pad",
                                     # ~1.5 CPU-minutes under the interpreter (~4 min wall on a loaded machine)
                                     pytest.param("triton_pad_buffer", marks=[pytest.mark.slow, pytest.mark.triton])])
def test_golden_model(name, backend):
    """A whole golden model (the official implementation's logits, losses and gradients, golden
    README tolerances) with every expert projection on a candidate backend. small_g3 has d_head 22,
    padded to 32. The Triton candidate runs its kernels under the interpreter (tiny only there:
    small_g3 would take minutes)."""
    import torch.nn.functional as F
    from conftest import golden_or_skip
    from moeut.official import from_official
    _needs(backend)
    if backend.startswith("triton") and name != "tiny.pt":
        pytest.skip("interpreter: tiny only (minutes otherwise)")
    ref = torch.load(golden_or_skip(name), weights_only=True)
    model = from_official(ref["config"], ref["state_dict"])
    n_set = 0
    for m in model.modules():
        if isinstance(getattr(m, "backend", None), str):
            m.backend, n_set = backend, n_set + 1
    assert n_set > 0
    ids = ref["input_ids"]
    model.train()
    out = model(ids)
    tol = 1e-4 + 1e-4 * ref["logits_train"].abs()
    assert (out.logits - ref["logits_train"]).abs().le(tol).all()
    V = out.logits.shape[-1]
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    total = ce + out.reg_loss
    assert abs(total.item() - ref["total_loss"].item()) <= 2e-5
    total.backward()
    params = dict(model.named_parameters())
    for pname in ref["grad_names"]:
        g_ref = ref["grads"][pname]
        err = (params[pname].grad - g_ref).abs().max().item()
        assert err <= 1e-3 * g_ref.abs().max().item(), f"gradient of {pname}: max err {err}"


@pytest.mark.parametrize("backend", ["grouped_mm_pad", "triton_pad_buffer"])
def test_compile_fullgraph_matches_eager(backend, monkeypatch):
    """torch.compile(fullgraph=True) of a tiny model with odd widths (d 60, d_head 18: both padded)
    on a candidate backend: no graph break, the custom ops in the graphs, eager's numbers. On CPU
    tensors the Triton candidate runs the PyTorch implementation behind the same ops (padding and
    layout code included), as the default "triton" backend does in tests/unit/kernels/test_compile.py."""
    from test_compile import _assert_match, _loss, _recording_backend
    from moeut.model import MoEUTLM
    from moeut.registry import get_preset
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MoEUTLM(get_preset("tiny", cvmm_backend=backend, d_model=60, d_head=18)).train()
    ids = torch.randint(0, 512, (2, 16))
    out = model(ids)
    _loss(out).backward()
    eager = (out.logits.detach(), out.reg_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    compile_backend, graphs = _recording_backend()
    out_c = torch.compile(model, fullgraph=True, backend=compile_backend)(ids)
    _loss(out_c).backward()
    got = (out_c.logits.detach(), out_c.reg_loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    assert "moeut.cvmm.default" in graphs["fw"] and "aten.constant_pad_nd.default" in graphs["fw"]
    assert {"moeut.cvmm_dx.default", "moeut.cvmm_dw.default"} <= graphs["bw"]
    _assert_match(eager, got, grad_atol=1e-6)


_PTX_PROBE = r'''
import collections, json, re, sys
from moeut.tools import footprint as fp
from moeut.registry import get_preset
res = {}
for backend in ("triton", "triton_pad"):
    cfg = get_preset("moeut_44m", cvmm_backend=backend, n_layers=2, group_size=2, vocab_size=256)
    specs = fp.summarise(fp.trace(cfg, "bf16", batch=64, seq_len=1024, steps=["train"], trace_tokens=16))["specs"]
    for s in specs:
        c = dict(s.constexprs)
        if s.kernel != "fwd":
            continue
        up = c["A_GATHER"] and not (c["OUT_ATOMIC"] or c["HAS_DOT"] or c["HAS_SCALE"])  # MLP up, forward
        down = c["OUT_ATOMIC"] and c["HAS_SCALE"] and not (c["A_GATHER"] or c["HAS_DOT"])  # MLP down + combine
        if not (up or down):
            continue
        ptx = fp.aot_compile(s, s.configs[0], 90).asm["ptx"]
        cp = collections.Counter(m.group(1) for m in re.finditer(r"cp\.async\.c[ag]\.shared\.global[^,]*,[^,]*,\s*(0x[0-9a-f]+)", ptx))
        res[backend + (" up" if up else " down")] = dict(
            cp_async_16B=cp.get("0x10", 0), cp_async_narrow=sum(v for k, v in cp.items() if k != "0x10"),
            ld_global_scalar=len(re.findall(r"\bld\.global(?![.a-z0-9]*\.v[24])[.a-z0-9]*\s", ptx)),
            red_scalar=len(re.findall(r"\bred\.global[.a-z]*\.add\.f32", ptx)),
            red_v4=len(re.findall(r"\bred\.global[.a-z]*\.add\.v4\.f32", ptx)))
print(json.dumps(res))
'''


@pytest.mark.slow
def test_pad_candidate_vectorises_the_sm90_code():
    """What `triton_pad` is for, checked in the sm_90 PTX Triton emits (AOT, no GPU): at moeut_44m's
    d_model 412 the default kernels copy tiles with narrow (4-byte) cp.async or scalar loads and
    combine with scalar fp32 atomics; on the padded widths (416) every tile copy is a 16-byte
    cp.async and every atomic a 4-wide red.add.v4.f32."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[3]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOEUT_TRITON_CONFIG")}
    env["PYTHONPATH"] = str(repo) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _PTX_PROBE], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    d_up, d_down, p_up, p_down = got["triton up"], got["triton down"], got["triton_pad up"], got["triton_pad down"]
    # default: the gathered x rows of the up projection are scalar loads, the down projection's W
    # rows narrow cp.async, its combine scalar atomics
    assert d_up["ld_global_scalar"] >= 32 and d_down["cp_async_narrow"] > 0
    assert d_down["red_scalar"] > 0 and d_down["red_v4"] == 0
    # padded: 16-byte copies only, vector atomics only, few scalar loads (indices, offsets)
    for p in (p_up, p_down):
        assert p["cp_async_narrow"] == 0 and p["cp_async_16B"] > 0 and p["ld_global_scalar"] <= 24, p
    assert p_down["red_scalar"] == 0 and p_down["red_v4"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", CANDIDATES)
@pytest.mark.parametrize("mode", ["rows", "slots", "heads"])
def test_gpu_vs_fp64(backend, mode):
    """On a GPU, the real kernels (autotuned configs): each candidate in fp32 (TF32 off) against the
    float64 oracle at moeut_44m's odd widths (d 412, d_expert 128; padded to 416), and in bf16
    autocast within bf16 rounding."""
    E, N, k = 12, 300, 3
    D_in, D_out = (412, 128) if mode != "slots" else (128, 412)
    x, w, ids, r, src_div, out_group = random_problem(mode, E=E, N=N, k=k, D_in=D_in, D_out=D_out, H=3,
                                                      unused=(5,))
    cot = torch.randn(ids.numel() // out_group, D_out, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    want = list(oracle_with_grads(x, w, ids, r, src_div, out_group, cot))
    dev = torch.device("cuda")
    for amp, tol in ((None, 1e-4), (torch.bfloat16, 3e-2)):
        xs = x.float().to(dev).requires_grad_()
        ws = w.float().to(dev).requires_grad_()
        rs = r.float().reshape(-1).to(dev).requires_grad_() if r is not None else None
        with torch.autocast("cuda", dtype=amp or torch.bfloat16, enabled=amp is not None):
            out = cvmm(xs, ws, make_plan(ids.to(dev), E), src_div=src_div, out_group=out_group, gates=rs,
                       backend=backend)
        (out.double() * cot.to(dev)).sum().backward()
        got = [t.cpu() if t is not None else None for t in (out, xs.grad, ws.grad, rs.grad if rs is not None else None)]
        _close(got, want, tol)
        assert got[2].dtype == torch.float32
