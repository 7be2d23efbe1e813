"""Shared by the CVMM tests of every backend: golden-case adapters and random problems."""
import torch

from moeut.kernels.cvmm import cvmm, cvmm_reference, make_plan

from conftest import GOLDEN


def load_golden_cases():
    path = GOLDEN / "cvmm_cases.pt"
    return torch.load(path, weights_only=True)["cases"] if path.exists() else []


def case_layout(case):
    """(x [M, D_in], sel [N, k_total], src_div, out_group) for a golden case's mode."""
    x, sel, r = case["x"], case["sel"], case["reduction_weight"]
    k_total = sel.shape[-1]
    N = sel.numel() // k_total
    if case["mode"] == "rows":
        xs, src_div = x.reshape(N, -1), k_total
    elif case["mode"] == "slots":
        xs, src_div = x.reshape(N * k_total, -1), 1
    elif case["mode"] == "heads":
        H = case["n_heads"]
        xs, src_div = x.reshape(N * H, -1), k_total // H
    else:
        raise ValueError(case["mode"])
    out_group = k_total if r is not None else 1
    return xs, sel.reshape(N, k_total), src_div, out_group


def run_case(case, backend, dtype=torch.float32):
    """Output and gradients of `sum(out * cotangent)`, shaped like the golden tensors."""
    xs, sel, src_div, out_group = case_layout(case)
    x = xs.to(dtype).clone().requires_grad_()
    w = case["W"].clone().requires_grad_()
    r = case["reduction_weight"]
    r = r.clone().requires_grad_() if r is not None else None
    plan = make_plan(sel, case["W"].shape[0])
    out = cvmm(x, w, plan, src_div=src_div, out_group=out_group, gates=r, backend=backend)
    out = out.reshape(case["expected_out"].shape)
    (out.float() * case["cotangent"]).sum().backward()
    return (out.float(), x.grad.float().reshape(case["x"].shape), w.grad,
            r.grad.reshape(case["reduction_weight"].shape) if r is not None else None)


def random_problem(mode, E=6, N=21, k=3, D_in=24, D_out=40, H=2, gates=True, unused=(5,), dtype=torch.float64,
                   seed=0):
    """A random CVMM problem in one of the model's layouts, with some experts never selected."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in unused])
    if mode == "heads":
        Eh = E // H
        ids = torch.stack([torch.cat([torch.randperm(Eh, generator=g)[:k] + h * Eh for h in range(H)])
                           for _ in range(N)])
        x = torch.randn(N * H, D_in, generator=g, dtype=dtype)
        src_div, out_group = k, H * k if gates else 1
    else:
        ids = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:k]] for _ in range(N)])
        rows = N if mode == "rows" else N * k
        x = torch.randn(rows, D_in, generator=g, dtype=dtype)
        src_div = k if mode == "rows" else 1
        out_group = (ids.shape[1] if gates else 1)
    w = torch.randn(E, D_in, D_out, generator=g, dtype=dtype)
    r = torch.rand(ids.shape, generator=g, dtype=dtype) if gates else None
    return x, w, ids, r, src_div, out_group


def oracle_with_grads(x, w, ids, r, src_div, out_group, cot):
    x, w = x.double().clone().requires_grad_(), w.double().clone().requires_grad_()
    r = r.double().clone().requires_grad_() if r is not None else None
    out = cvmm_reference(x, w, ids, src_div=src_div, out_group=out_group, gates=r)
    (out * cot).sum().backward()
    return out, x.grad, w.grad, (r.grad if r is not None else None)
