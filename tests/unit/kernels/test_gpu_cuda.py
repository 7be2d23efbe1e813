"""The model on a CUDA GPU with the Triton backend (issue 13 item 2). `pytest -m gpu`; every test
skips without CUDA (the CPU parts of the harness are tested in tests/unit/kernels/test_gpu_harness.py).

Figures (errors, compile/run times) are printed and, when $MOEUT_GPU_REPORT names a file,
appended to it as JSON lines (benchmarks/gpu_suite.sh puts them into docs/benchmarks.md).

Tolerances:
  * fp32 (TF32 off, true fp32 in the kernels): the golden files' own tolerances (|Δ| <= 1e-4 +
    1e-4 |ref| on logits, 1e-5 on losses, 1e-3 of the largest gradient entry), as on CPU.
  * bf16 autocast: bf16 keeps 8 significant bits, unit roundoff u = 2^-8 ≈ 3.9e-3 per rounding.
    Logits come out of ~2L rounded residual updates; with errors adding up like a random walk,
    |Δlogits| ≈ sqrt(2L)·u·|logits|, about 1.1e-2 relative for L = 4 and 1.4e-2 for L = 6. We allow
    5e-2 · max|ref| (3-4x that), and require >= 98 % agreement of the arg-max token, and that
    Triton is no further from the fp32 golden logits than 2x the PyTorch bf16 backend (+1e-3).
  * gradients in bf16 vs float64 (moeut_44m shapes): on CPU the tiny model's bf16 gradients sit a
    median 3.6 % (worst 10.5 %) from fp64 (tests/unit/kernels/test_gpu_harness.py), i.e. two independent bf16
    computations differ by about that much -- the 4.7 % median between Triton and grouped_mm seen
    in issue 13 is of this size. Bound for each backend: median <= 32u ≈ 12.5 % (linear growth of
    u through the 2 x 16 blocks of the 44M model's backward; the random-walk estimate sqrt(32)·u ≈
    2.2 % is what we expect), worst parameter <= 50 % (a top-k routing decision flipped by
    rounding changes a few selection gradients wholesale); and Triton's median <= 1.5x
    grouped_mm's + 0.5 %. In fp32 (TF32 off) both backends must be within 1e-4 (median) of fp64.
"""
import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import GOLDEN
from precision_util import error_summary, grads, reference_grads, relative_errors, report, with_backend

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]
MODEL_FILES = sorted(p for p in GOLDEN.glob("*.pt") if p.name != "cvmm_cases.pt") if GOLDEN.exists() else []


@pytest.fixture(autouse=True)
def _true_fp32(monkeypatch):
    """TF32 off (true fp32 matmuls outside the kernels too); no backend override from the shell."""
    monkeypatch.delenv("MOEUT_CVMM_BACKEND", raising=False)
    monkeypatch.delenv("MOEUT_TRITON_CONFIG", raising=False)
    if CUDA:
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    else:
        yield


def _golden(path):
    from moeut.official import from_official
    d = torch.load(path, weights_only=True)
    if "logits_eval" not in d:
        src = d.get("source_golden", path.name.replace("_training_format", ""))
        ref = torch.load(GOLDEN / (src if src.endswith(".pt") else src + ".pt"), weights_only=True)
    else:
        ref = d
    return (lambda backend: from_official(d["config"], d["state_dict"], cvmm_backend=backend).cuda()), ref


def _need_golden():
    if not MODEL_FILES:
        pytest.skip(f"golden model files missing in {GOLDEN}")


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.stem)
def test_golden_triton_fp32(path):
    build, ref = _golden(path)
    model = build("triton")
    ids = ref["input_ids"].cuda()
    t0 = time.perf_counter()
    tol = lambda r: 1e-4 + 1e-4 * r.abs()  # noqa: E731  (golden README tolerances)
    model.eval()
    with torch.no_grad():
        out = model(ids)
    want = ref["logits_eval"].cuda()
    assert (out.logits - want).abs().le(tol(want)).all(), (out.logits - want).abs().max().item()
    model.train()
    out = model(ids)
    V = out.logits.shape[-1]
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    assert abs(out.reg_loss.item() - ref["reg_loss_train"].item()) <= 1e-5
    assert abs(ce.item() - ref["ce_loss"].item()) <= 1e-5
    (ce + out.reg_loss).backward()
    params = dict(model.named_parameters())
    worst = 0.0
    for name in ref["grad_names"]:
        g_ref = ref["grads"][name].cuda()
        err = (params[name].grad - g_ref).abs().max().item() / g_ref.abs().max().item()
        worst = max(worst, err)
        assert err <= 1e-3, f"gradient of {name}: max err {err:.2e} of the largest entry"
    torch.cuda.synchronize()
    report(dict(test="golden_triton_fp32", file=path.stem, seconds=round(time.perf_counter() - t0, 2),
                max_logit_diff=(out.logits.detach() - ref["logits_train"].cuda()).abs().max().item(),
                worst_grad_err=worst))


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.stem)
def test_golden_bf16_autocast(path):
    build, ref = _golden(path)
    ids = ref["input_ids"].cuda()
    want = ref["logits_eval"].cuda()
    errs = {}
    for backend in ("triton", "grouped_mm"):
        model = build(backend).eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids).logits.float()
        errs[backend] = (logits - want).abs().max().item()
        agree = (logits.argmax(-1) == want.argmax(-1)).float().mean().item()
        assert errs[backend] <= 5e-2 * want.abs().max().item(), (backend, errs[backend])
        assert agree >= 0.98, (backend, agree)
    assert errs["triton"] <= 2 * errs["grouped_mm"] + 1e-3, errs
    report(dict(test="golden_bf16", file=path.stem, max_logit_diff=errs,
                max_abs_logit=want.abs().max().item()))


@pytest.mark.parametrize("path", MODEL_FILES[:1], ids=lambda p: p.stem)
def test_golden_kv_decode_triton(path):
    build, ref = _golden(path)
    model = build("triton").eval()
    from moeut.model import KVCache
    kv = ref["kv_decode"]
    P, n = kv["prefill_len"], kv["n_steps"]
    ids = ref["input_ids"].cuda()
    want = ref["logits_eval"].cuda()
    cache = KVCache()
    with torch.no_grad():
        out = model(ids[:, :P], cache=cache)
        assert (out.logits - want[:, :P]).abs().max() <= 1e-4
        for s in range(n):
            out = model(ids[:, P + s:P + s + 1], cache=cache)
            err = (out.logits[:, 0] - want[:, P + s]).abs().max().item()
            assert err <= 1e-4, f"decode step {s}: {err}"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kv_cache_decoding_equals_full_forward_44m(dtype):
    """moeut_44m (random init), prefill 100 then 60 one-token steps vs one full forward, Triton.
    Issue 13 saw the fp32 version not finish in 60 s (autotuning big fp32 configs): bounded here."""
    from moeut.registry import get_preset
    from moeut.model import KVCache, MoEUTLM
    torch.manual_seed(0)
    model = MoEUTLM(get_preset("moeut_44m", cvmm_backend="triton")).cuda().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 160), device="cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16")
    t0 = time.perf_counter()
    with torch.no_grad(), amp:
        full = model(ids).logits.float()
        cache = KVCache()
        parts = [model(ids[:, :100], cache=cache).logits.float()]
        for s in range(100, 160):
            parts.append(model(ids[:, s:s + 1], cache=cache).logits.float())
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    got = torch.cat(parts, 1)
    err = (got - full).abs().max().item()
    scale = full.abs().max().item()
    # fp32: identical math up to summation order; bf16: same rounding points, different tiles
    # (prefill/step sizes pick other configs), so a few bf16 ulps of the logits.
    bound = 1e-4 * scale if dtype == "fp32" else 3e-2 * scale
    report(dict(test="kv_decode_44m", dtype=dtype, max_diff=err, max_abs_logit=scale, seconds=round(seconds, 1)))
    assert err <= bound, (err, bound)
    if dtype == "bf16":
        assert (got.argmax(-1) == full.argmax(-1)).float().mean().item() >= 0.98
    assert seconds < 120, f"decoding took {seconds:.0f} s (compile footprint too large?)"


def test_gradients_vs_fp64_44m_shapes():
    """Triton and grouped_mm bf16-autocast gradients of a moeut_44m model, each vs float64 of the
    same weights and batch (and both in fp32 with TF32 off). Prints both relative errors."""
    from moeut.registry import get_preset
    from moeut.model import MoEUTLM
    torch.manual_seed(0)
    model = MoEUTLM(get_preset("moeut_44m", cvmm_backend="grouped_mm")).cuda().train()
    ids = torch.randint(0, model.config.vocab_size, (4, 257), device="cuda")
    ref = reference_grads(model, ids)
    res = {}
    for backend in ("triton", "grouped_mm"):
        m = with_backend(model, backend)
        res[backend] = {"bf16": error_summary(relative_errors(grads(m, ids, torch.bfloat16), ref)),
                        "fp32": error_summary(relative_errors(grads(m, ids, None), ref))}
    report(dict(test="grads_vs_fp64_44m", **res))
    u = 2.0 ** -8
    for backend, r in res.items():
        assert r["fp32"]["median"] <= 1e-4, (backend, r["fp32"])
        assert r["bf16"]["median"] <= 32 * u, (backend, r["bf16"])
        assert r["bf16"]["worst"] <= 0.5, (backend, r["bf16"])
    assert res["triton"]["bf16"]["median"] <= 1.5 * res["grouped_mm"]["bf16"]["median"] + 5e-3, res


def test_torch_compile_equals_eager_cuda():
    """torch.compile(model) (inductor, Triton backend behind the custom ops) vs eager, fp32."""
    from moeut.registry import get_preset
    from moeut.model import MoEUTLM
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MoEUTLM(get_preset("tiny", cvmm_backend="triton")).cuda().train()
    ids = torch.randint(0, 512, (2, 65), device="cuda")
    eager = grads(model, ids)
    out_e = model(ids[:, :-1])
    compiled = torch.compile(model)
    t0 = time.perf_counter()
    got = grads(compiled, ids)
    out_c = compiled(ids[:, :-1])
    report(dict(test="torch_compile_cuda", compile_and_step_seconds=round(time.perf_counter() - t0, 1)))
    torch.testing.assert_close(out_c.logits, out_e.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_c.reg_loss, out_e.reg_loss, atol=1e-6, rtol=1e-5)
    errs = relative_errors(got, eager)
    assert max(errs.values()) <= 1e-4, max(errs.items(), key=lambda kv: kv[1])
    assert not math.isnan(sum(errs.values()))


def test_autotune_results_persist_across_processes(tmp_path):
    """A second process with the same TRITON_CACHE_DIR loads the autotune winners from disk
    (Triton `cache_results`) instead of benchmarking: it never calls the autotuner's _bench."""
    import json
    import subprocess
    import sys
    code = r'''
import json, torch
from triton.runtime.autotuner import Autotuner
from moeut.kernels.cvmm import cvmm, make_plan
calls = []
real = Autotuner._bench
def bench(self, *a, **k):
    calls.append(1)
    return real(self, *a, **k)
Autotuner._bench = bench
torch.manual_seed(0)
E, N, K, d, De = 32, 4096, 4, 256, 128
x = torch.randn(N, d, device="cuda", requires_grad=True)
w = torch.randn(E, d, De, device="cuda", requires_grad=True)
ids = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(N)])
with torch.autocast("cuda", dtype=torch.bfloat16):
    cvmm(x, w, make_plan(ids, E), src_div=K, grouped_out=True, backend="triton").float().sum().backward()
torch.cuda.synchronize()
print(json.dumps(len(calls)))
'''
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path))
    env.pop("MOEUT_TRITON_AUTOTUNE_CACHE", None)
    runs = []
    for _ in range(2):
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    report(dict(test="autotune_disk_cache", bench_calls_first=runs[0], bench_calls_second=runs[1]))
    assert runs[0] > 0, runs  # the first process benchmarks the configs
    assert runs[1] == 0, runs  # the second one reads the winners from disk
    assert list(tmp_path.rglob("*.autotune.json"))
