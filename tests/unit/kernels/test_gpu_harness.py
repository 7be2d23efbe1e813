"""The fp64-reference gradient harness of the GPU tests, tested on CPU with the PyTorch backend."""
import pytest
import torch

import moeut.kernels.cvmm as cv
from moeut.registry import get_preset
from moeut.model import MoEUTLM

from precision_util import error_summary, grads, reference_grads, relative_errors, with_backend


@pytest.fixture
def tiny_model_and_batch(monkeypatch):
    monkeypatch.delenv(cv.BACKEND_ENV, raising=False)
    torch.manual_seed(0)
    model = MoEUTLM(get_preset("tiny", cvmm_backend="grouped_mm")).train()
    ids = torch.randint(0, 512, (2, 33))
    return model, ids


def test_reference_runs_expert_matmuls_in_fp64(tiny_model_and_batch, monkeypatch):
    model, ids = tiny_model_and_batch
    seen = []
    real = cv._BACKENDS["torch_loop"]

    def spy(x, w, plan, **kw):
        seen.append(x.dtype)
        return real(x, w, plan, **kw)

    monkeypatch.setitem(cv._BACKENDS, "torch_loop", spy)
    reference_grads(model, ids)
    assert seen and set(seen) == {torch.float64}, seen


def test_fp32_backends_match_fp64_and_a_wrong_gradient_is_caught(tiny_model_and_batch):
    """fp32 gradients sit at fp32 rounding from the fp64 reference (1e-7..1e-5 relative); a 1 %
    perturbation of one expert weight -- a wrong kernel -- is far outside that bound."""
    model, ids = tiny_model_and_batch
    ref = reference_grads(model, ids)
    for backend in ("grouped_mm", "torch_loop"):
        s = error_summary(relative_errors(grads(with_backend(model, backend), ids), ref))
        assert s["n"] == len(ref) > 10
        assert 0.0 < s["median"] < 1e-5 and s["worst"] < 1e-4, (backend, s)
    broken = with_backend(model, "grouped_mm")
    with torch.no_grad():
        broken.transformer.layers[0].ffn.values.mul_(1.01)
    s = error_summary(relative_errors(grads(broken, ids), ref))
    assert s["worst"] > 1e-3, s


def test_bf16_autocast_error_is_bf16_sized(tiny_model_and_batch):
    """bf16 autocast on CPU: errors far above fp32's and of the order of bf16 rounding (2^-8)."""
    model, ids = tiny_model_and_batch
    ref = reference_grads(model, ids)
    s = error_summary(relative_errors(grads(with_backend(model, "grouped_mm"), ids, torch.bfloat16), ref))
    assert 1e-4 < s["median"] < 0.1, s
