"""sigma-MoE MLP forward+backward time as a ratio to a dense MLP of the same active width.

Issue "MoEUT model package" targets on CPU: <= 1.5x at (d 512, N_E 64, d_expert 128, K 8, T 4096)
and <= 2x at the 244M shape (d 1024, N_E 387, d_expert 128, K 16, T 2048). Both layers are timed
side by side in interleaved rounds (noise hits both alike); the median ratio is printed.

    python benchmarks/moe_layer.py [--rounds 15] [--shapes small,244m] [--backend grouped_mm]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from moeut.registry import get_preset
from moeut.cpu import keep_freed_memory
from moeut.model import ForwardState, SigmaMoE

SHAPES = {
    "small": dict(d=512, n_experts=64, d_expert=128, k=8, T=4096),
    "244m": dict(d=1024, n_experts=387, d_expert=128, k=16, T=2048),
}


class DenseMLP(nn.Module):
    """The dense-active MLP: Linear(d, width) -> ReLU -> Linear(width, d), no biases."""

    def __init__(self, d, width):
        super().__init__()
        self.up = nn.Linear(d, width, bias=False)
        self.down = nn.Linear(width, d, bias=False)

    def forward(self, x):
        return self.down(F.relu(self.up(x)))


def build(shape, backend, device):
    cfg = get_preset("mini", d_model=shape["d"], ff_n_experts=shape["n_experts"],
                     ff_expert_size=shape["d_expert"], ff_k=shape["k"], cvmm_backend=backend)
    moe = SigmaMoE(cfg).to(device)
    moe.reset_parameters(cfg)
    dense = DenseMLP(shape["d"], shape["k"] * shape["d_expert"]).to(device)
    return moe, dense


def step_moe(moe, x, gate_in):
    state = ForwardState(training=True, collect_routing=False)
    y = moe(x, gate_in, 0, state)
    y.backward(torch.ones_like(y))


def step_dense(dense, x):
    y = dense(x)
    y.backward(torch.ones_like(y))


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run(name, shape, rounds, backend, device, dtype):
    moe, dense = build(shape, backend, device)
    x = torch.randn(1, shape["T"], shape["d"], device=device, requires_grad=True)
    gate_in = F.layer_norm(x.detach(), (shape["d"],))
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    fm = lambda: step_moe(moe, x, gate_in)  # noqa: E731
    fd = lambda: step_dense(dense, x)  # noqa: E731
    with amp:
        for _ in range(3):  # warm-up (allocator, autotune)
            fm(), fd()
        t_moe, t_dense, ratios = [], [], []
        for i in range(rounds):
            pair = [("moe", fm), ("dense", fd)] if i % 2 == 0 else [("dense", fd), ("moe", fm)]
            got = {k: timed(f, device) for k, f in pair}
            t_moe.append(got["moe"])
            t_dense.append(got["dense"])
            ratios.append(got["moe"] / got["dense"])
    med = statistics.median(ratios)
    print(f"{name:6s} T={shape['T']:5d} d={shape['d']:4d} N_E={shape['n_experts']:3d} K={shape['k']:2d}  "
          f"moe {statistics.median(t_moe) * 1e3:8.1f} ms  dense-active {statistics.median(t_dense) * 1e3:8.1f} ms  "
          f"ratio median {med:5.2f}x  (min {min(ratios):.2f}, max {max(ratios):.2f})")
    return med


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--shapes", default="small,244m")
    p.add_argument("--backend", default="auto", help="cvmm backend: auto, grouped_mm, torch_loop, triton")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--no-malloc-tuning", action="store_true", help="keep glibc's default trimming (SPEC 3.8)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    tuned = False if args.no_malloc_tuning else keep_freed_memory()
    print(f"device={device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads) "
          f"torch={torch.__version__} python={sys.version.split()[0]} dtype={dtype} backend={args.backend} "
          f"malloc_keep_freed={tuned}")
    for name in args.shapes.split(","):
        run(name, SHAPES[name], args.rounds, args.backend, device, dtype)


if __name__ == "__main__":
    main()
