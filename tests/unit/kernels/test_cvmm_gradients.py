"""The CVMM operator's PyTorch backends, all three gradients (x, w, gates) against autograd through the
naive oracle `cvmm_reference` in float64 (SPEC 3.1), on routings with an empty expert and experts that
own exactly one slot, for input-side and output-side gating (D_in <= D_out and D_in > D_out)."""
import pytest
import torch

from moeut.kernels.cvmm import cvmm, cvmm_reference, make_plan

E = 4


@pytest.mark.parametrize("backend", ["torch_loop", "grouped_mm"])
@pytest.mark.parametrize("d_in, d_out", [(3, 5), (5, 3)])  # gate applied to the input rows / the output rows
@pytest.mark.parametrize("k", [1, 2])
def test_gradients_match_the_reference(backend, d_in, d_out, k):
    g = torch.Generator().manual_seed(0)
    N = 5
    ids = torch.tensor([[0, 2], [1, 0], [0, 2], [2, 0], [0, 2]])[:, :k] if k == 2 else torch.tensor(
        [[0], [1], [0], [2], [0]])
    counts = torch.bincount(ids.reshape(-1), minlength=E).tolist()
    assert counts[3] == 0 and 1 in counts  # an empty expert and a single-slot expert
    x = torch.randn(N, d_in, generator=g, dtype=torch.float64)
    w = torch.randn(E, d_in, d_out, generator=g, dtype=torch.float64)
    gates = torch.rand(N * k, generator=g, dtype=torch.float64) + 0.5
    grad_out = torch.randn(N, d_out, generator=g, dtype=torch.float64)

    def grads(fn, dtype):
        xs, ws, gs = (t.to(dtype).clone().requires_grad_(True) for t in (x, w, gates))
        out = fn(xs, ws, gs)
        return (out,) + torch.autograd.grad(out, (xs, ws, gs), grad_out.to(dtype))

    ref = grads(lambda a, b, c: cvmm_reference(a, b, ids, src_div=k, out_group=k, gates=c), torch.float64)
    got = grads(lambda a, b, c: cvmm(a, b, make_plan(ids, E), src_div=k, out_group=k, gates=c, backend=backend),
                torch.float32)
    for name, a, b in zip(("out", "dx", "dw", "dgates"), got, ref):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5, msg=name)
