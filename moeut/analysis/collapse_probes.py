"""The read-only probes of `python -m moeut.analysis collapse` (docs/results.md, "Diagnosis: what
moves first"): per-step statistics of every σ-MoE selection gate (`GateProbe`, `probe_gates`) and the
split of the W_S gradient into its CE and entropy-regulariser parts (`split_gradients`). They never
change a tensor the training step uses, nor an RNG stream."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Iterator, Tuple

GATE_PARAMS = ("expert_sel", "sel_v", "sel_o")  # W_S of the σ-MoE MLP and of SwitchHead's V and O gates


class GateProbe:
    """Statistics of every gate application of one step (fed by `probe_gates`): per (kind, g) the count, sum and sum of squares
    of z, its max, the selected gates' sum and min, and the per-expert selection counts. Only the
    training forwards of `train_step` run inside the probe; k is the gate's top-k."""

    def __init__(self, k_of: Dict[str, int]):
        self.k_of = k_of
        self.acc: Dict[Tuple[str, int], Dict[str, Any]] = {}

    def record(self, kind: str, g: int, z) -> None:
        """Add one application's logits z [B, T, E] or [B, T, H, E] (detached, float64 sums)."""
        import torch
        with torch.no_grad():
            z = z.detach().double()
            k = self.k_of[kind]
            top = torch.sigmoid(z).topk(k, dim=-1).indices
            sel = torch.sigmoid(z).gather(-1, top)
            E = z.shape[-1]
            heads = z.shape[2] if z.dim() == 4 else 1
            counts = torch.zeros(heads, E, dtype=torch.float64)
            counts.scatter_add_(1, top.reshape(-1, heads, k).permute(1, 0, 2).reshape(heads, -1),
                                torch.ones(heads, top.numel() // heads, dtype=torch.float64))
            a = self.acc.setdefault((kind, g), {"n": 0, "s": 0.0, "ss": 0.0, "max": -math.inf, "gs": 0.0,
                                                "gn": 0, "gmin": math.inf, "counts": torch.zeros_like(counts)})
            a["n"] += z.numel()
            a["s"] += float(z.sum())
            a["ss"] += float((z * z).sum())
            a["max"] = max(a["max"], float(z.max()))
            a["gs"] += float(sel.sum())
            a["gn"] += sel.numel()
            a["gmin"] = min(a["gmin"], float(sel.min()))
            a["counts"] += counts

    def summary(self) -> Dict[str, float]:
        """{"<kind>_g<g>/<stat>": value}: z_mean, z_std, z_max, gate_mean, gate_min, usage (expert-
        usage perplexity / E of the selections, averaged over heads). Resets the accumulators."""
        out = {}
        for (kind, g), a in sorted(self.acc.items()):
            mean = a["s"] / a["n"]
            key = f"{kind}_g{g}"
            out[f"{key}/z_mean"] = mean
            out[f"{key}/z_std"] = math.sqrt(max(a["ss"] / a["n"] - mean * mean, 0.0))
            out[f"{key}/z_max"] = a["max"]
            out[f"{key}/gate_mean"] = a["gs"] / a["gn"]
            out[f"{key}/gate_min"] = a["gmin"]
            p = a["counts"] / a["counts"].sum(-1, keepdim=True)
            ent = -(p * p.clamp_min(1e-30).log()).sum(-1)
            out[f"{key}/usage"] = float((ent.exp() / p.shape[-1]).mean())
        self.acc = {}
        return out


@contextlib.contextmanager
def probe_gates(model, probe: GateProbe) -> Iterator[GateProbe]:
    """Within the block, every training forward of a σ-MoE MLP (moeut.model.SigmaMoE) or a
    SwitchHead attention (SwitchHeadAttention) of `model` also feeds `probe` its gate logits
    z = W_S u, recomputed from the module's inputs by a forward pre-hook (the same F.linear the
    module runs; nothing the module computes is changed)."""
    import torch
    import torch.nn.functional as F
    from moeut.model import SigmaMoE, SwitchHeadAttention

    def mlp_hook(mod, args):
        if mod.training:
            _, gate_in, g = args[:3]
            with torch.no_grad():
                probe.record("mlp", g, F.linear(gate_in, mod.expert_sel).float())

    def att_hook(mod, args):
        if mod.training:
            qk_in, _, g = args[:3]
            B, T, _ = qk_in.shape
            with torch.no_grad():
                for kind, w in (("att_v", mod.sel_v), ("att_o", mod.sel_o)):
                    probe.record(kind, g, F.linear(qk_in, w).float().view(B, T, mod.n_heads, mod.n_experts))

    handles = []
    for m in model.modules():
        if isinstance(m, SigmaMoE):
            handles.append(m.register_forward_pre_hook(mlp_hook))
        elif isinstance(m, SwitchHeadAttention):
            handles.append(m.register_forward_pre_hook(att_hook))
    try:
        yield probe
    finally:
        for h in handles:
            h.remove()


def gate_params(model) -> Dict[str, Any]:
    """{parameter name: parameter} of every W_S (`expert_sel`, `sel_v`, `sel_o`) of `model`."""
    return {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in GATE_PARAMS}


def split_gradients(model, window_BT1, autocast_dtype, device) -> Dict[str, Dict[str, Any]]:
    """The CE's and the regulariser's gradients on each W_S, separately, for the batch
    `window_BT1` [B, T+1] at the current weights: one training forward (no routing records),
    torch.autograd.grad of each term (parameters' .grad untouched), torch's CPU RNG state (and
    CUDA's) restored afterwards. Returns {name: {"ce": grad, "reg": grad}} (reg: zeros where the
    regulariser does not reach the parameter)."""
    import torch
    import torch.nn.functional as F
    from moeut.train_lib.precision import autocast

    params = gate_params(model)
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        with autocast(device, autocast_dtype):
            out = model(window_BT1[:, :-1])
        ce = F.cross_entropy(out.logits.float().flatten(0, 1), window_BT1[:, 1:].flatten())
        names = list(params)
        g_ce = torch.autograd.grad(ce, [params[n] for n in names], retain_graph=True, allow_unused=True)
        g_reg = torch.autograd.grad(out.reg_loss, [params[n] for n in names], allow_unused=True)
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
    res = {}
    for n, a, b in zip(names, g_ce, g_reg):
        p = params[n]
        res[n] = {"ce": (a if a is not None else torch.zeros_like(p)).detach(),
                  "reg": (b if b is not None else torch.zeros_like(p)).detach()}
    return res


def cosine(a, b) -> float:
    """Cosine of the angle between two tensors of one shape, flattened; NaN when either is zero."""
    na, nb = float(a.norm()), float(b.norm())
    return float((a * b).sum()) / (na * nb) if na > 0 and nb > 0 else float("nan")
