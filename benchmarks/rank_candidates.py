"""Rank the CVMM candidates on one GPU in one run: σ-MoE layer and training step, side by side.

    python benchmarks/rank_candidates.py --out rank_out                 # GPU, <= 8 min with compiling
    python benchmarks/rank_candidates.py --dry-run --out /tmp/rank      # CPU, tiny shapes, < 1 min (CI)

What it measures, in one process, every variant interleaved round by round (noise hits all alike):

  layer   the σ-MoE MLP layer (`moeut.model.SigmaMoE`: gate, sigmoid/top-k, plan, up, ReLU, down),
          forward + backward, at the moeut_44m shape (d 412, N_E 155, K 12) and the moeut_244m
          shape (d 1024, N_E 387, K 16), d_expert 128, T tokens (GPU 16384), bf16 autocast, for
          every CVMM backend in --variants and the dense-active MLP (Linear(d, K·d_expert), ReLU,
          Linear back; the same active width). Before timing, each variant's output and
          gradients are compared with the "triton" backend's on the same weights and batch
          (relative max error printed and recorded; a candidate far off is flagged, not ranked).
  train   `moeut.train_lib.step.train_step` (what train.py runs) of moeut_44m with each variant
          vs dense_44m (benchmarks/train_step.py's state), batch --train-batch x 1024.
  profile one torch.profiler pass per variant and shape: the kernel table (top kernels by device
          time), the kernel-launch count and device-busy time vs wall time (a launch- or
          host-bound step shows up as busy << wall).

Output (in --out): rank.json (every time, ratio and error), rank.md (the tables, ranked by the
median over rounds of variant / dense-active), profile_<shape>_<variant>.txt (kernel tables).
Ratios are per round (variant time / dense time of the same round), then the median.

Time budget: --budget-s (default 420 s on GPU) covers compile + autotune (the warm-up steps)
and the timed rounds; each phase gets a share and stops adding rounds when its share is spent
(at least --min-rounds). Nothing becomes the default from here: docs/kernels.md "Candidates" says
how to read the result.

The dry run uses CPU, tiny shapes (T 64) and the PyTorch implementation behind every backend
(Triton backends on CPU tensors run the PyTorch implementation of the same custom op, and the
"*_pad" wrappers still pad), so it checks the script end to end in seconds; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from moeut.model_config import CVMM_BACKENDS  # noqa: E402
from moeut.model import ForwardState, SigmaMoE  # noqa: E402
from moeut.registry import PAPER_TRAIN, build_model, get_preset  # noqa: E402
from cvmm import _triton_version  # noqa: E402  (benchmarks/cvmm.py)
from moe_layer import DenseMLP  # noqa: E402  (benchmarks/moe_layer.py: the dense-active MLP)

DEFAULT_VARIANTS = ("triton", "triton_pad", "triton_buffer", "triton_pad_buffer", "grouped_mm", "grouped_mm_pad")
SHAPES = {
    "44m": dict(d=412, n_experts=155, d_expert=128, k=12),
    "244m": dict(d=1024, n_experts=387, d_expert=128, k=16),
    # dry run only: odd d (padding exercised), tiny
    "tiny": dict(d=20, n_experts=6, d_expert=16, k=2),
}
REL_ERR_FLAG = 0.05  # bf16 layer output / gradients further than this from "triton" are flagged


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / (b.abs().max() + 1e-30)).item()


def _set_backend(model: nn.Module, backend: str) -> None:
    """Point every expert module of `model` at CVMM backend `backend` (the attribute read per call)."""
    for m in model.modules():
        if hasattr(m, "backend") and isinstance(getattr(m, "backend"), str):
            m.backend = backend


class Phase:
    """Interleaved timing rounds of named callables within a time share."""

    def __init__(self, names, deadline, min_rounds, max_rounds):
        self.names, self.deadline = list(names), deadline
        self.min_rounds, self.max_rounds = min_rounds, max_rounds
        self.times = {n: [] for n in self.names}

    def run(self, fns, device):
        r = 0
        while r < self.max_rounds and (r < self.min_rounds or time.monotonic() < self.deadline):
            order = self.names[r % len(self.names):] + self.names[:r % len(self.names)]  # rotate
            for n in order:
                self.times[n].append(_timed(fns[n], device))
            r += 1
        return r


def _ratios(times, ref):
    return [t / d for t, d in zip(times, ref)]


def _profile(fn, device, path: Path, top: int) -> dict:
    """One profiled call of fn: kernel table to `path`; launches, device-busy and wall ms."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        _sync(device)
    wall = (time.perf_counter() - t0) * 1e3
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        table = events.table(sort_by=sort, row_limit=top)
    except Exception:  # noqa: BLE001  (older/newer profiler naming)
        table = events.table(sort_by="self_cpu_time_total", row_limit=top)
    busy = launches = 0.0
    if device.type == "cuda":
        for e in prof.events():
            dev_type = getattr(e, "device_type", None)
            if dev_type is not None and "CUDA" in str(dev_type):
                busy += getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0))
                launches += 1
    path.write_text(table + "\n")
    return dict(wall_ms=wall, device_busy_ms=busy / 1e3, kernels=int(launches))


def layer_phase(shape_name, T, variants, device, dtype, budget_s, args, log):
    """Layer fwd+bwd of every variant and the dense-active MLP at one shape."""
    s = SHAPES[shape_name]
    cfg = get_preset("mini", d_model=s["d"], ff_n_experts=s["n_experts"], ff_expert_size=s["d_expert"],
                     ff_k=s["k"], cvmm_backend="triton")
    torch.manual_seed(0)
    moe = SigmaMoE(cfg).to(device)
    moe.reset_parameters(cfg)
    dense = DenseMLP(s["d"], s["k"] * s["d_expert"]).to(device)
    x = torch.randn(1, T, s["d"], device=device, requires_grad=True)
    gate_in = F.layer_norm(x.detach(), (s["d"],))
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    ref_name = "triton" if "triton" in variants else variants[0]

    def moe_step(backend):
        def run():
            moe.backend = backend
            x.grad = None
            for p in moe.parameters():
                p.grad = None
            with amp:
                y = moe(x, gate_in, 0, ForwardState(training=True, collect_routing=False))
            y.float().sum().backward()
            return y
        return run

    def dense_step():
        x.grad = None
        with amp:
            y = dense(x)
        y.float().sum().backward()

    t_start = time.monotonic()
    # Correctness on the GPU shape (also the first call: compile + autotune), vs the reference backend.
    errors, first, failed = {}, {}, {}
    ref = None
    for v in [ref_name] + [v for v in variants if v != ref_name]:
        t0 = time.monotonic()
        torch.manual_seed(1)  # same expert dropout draw (none in mini) and routing for every variant
        try:
            y = moe_step(v)()
            _sync(device)
        except Exception as e:  # noqa: BLE001  (a broken candidate must not end the run)
            failed[v] = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"[{shape_name}] {v}: FAILED {failed[v]}")
            continue
        first[v] = time.monotonic() - t0
        got = (y.detach().clone(), x.grad.clone(), moe.keys.grad.clone(), moe.values.grad.clone(),
               moe.expert_sel.grad.clone())
        if ref is None:
            ref = got
        errors[v] = dict(zip(("out", "dx", "dW1", "dW2", "dgate"), (_rel(a, b) for a, b in zip(got, ref))))
        log(f"[{shape_name}] {v}: first call {first[v]:.2f} s, rel. error vs {ref_name} "
            + " ".join(f"{k} {e:.1e}" for k, e in errors[v].items()))
    variants = [v for v in variants if v not in failed]
    if ref_name in failed:
        ref_name = variants[0] if variants else ref_name
    fns = {v: moe_step(v) for v in variants}
    fns["dense"] = dense_step
    for _ in range(args.warmup):
        for f in fns.values():
            f()
    names = list(variants) + ["dense"]
    left = budget_s - (time.monotonic() - t_start)
    phase = Phase(names, time.monotonic() + max(left, 0), args.min_rounds, args.max_rounds)
    rounds = phase.run(fns, device)
    rows = []
    flops = 3 * 2 * 2 * T * s["k"] * s["d_expert"] * s["d"]  # up + down, fwd + dx + dW: the useful work
    for v in names:
        ts = phase.times[v]
        r = _ratios(ts, phase.times["dense"])
        row = dict(variant=v, ms=statistics.median(ts) * 1e3, ratio_vs_dense=statistics.median(r),
                   ratio_min=min(r), ratio_max=max(r), tflops=flops / statistics.median(ts) / 1e12)
        if v != "dense":
            row["vs_" + ref_name] = statistics.median(_ratios(ts, phase.times[ref_name]))
            row["first_call_s"] = first[v]
            row["max_rel_err"] = max(errors[v].values())
            row["flag"] = "ERROR>%.0e" % REL_ERR_FLAG if row["max_rel_err"] > REL_ERR_FLAG else ""
        rows.append(row)
    prof = {}
    if args.profile:
        for v in names:
            prof[v] = _profile(fns[v], device, args.out / f"profile_{shape_name}_{v}.txt", args.profile_rows)
            for k, val in prof[v].items():
                next(r for r in rows if r["variant"] == v)["prof_" + k] = val
    log(f"[{shape_name}] {rounds} rounds in {time.monotonic() - t_start:.1f} s")
    del moe, dense
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(shape=shape_name, T=T, dims=s, rounds=rounds, reference=ref_name, errors=errors, rows=rows,
                failed=failed)


def train_phase(variants, device, dtype, budget_s, args, log):
    """train_step of moeut (each variant) vs dense, interleaved."""
    import train_step as ts  # benchmarks/train_step.py: the state and step train.py uses
    torch.manual_seed(0)
    names = [args.train_moeut, args.train_dense]
    vocab = min(get_preset(n).vocab_size for n in names)
    B, T = args.train_batch, args.train_seq
    batch = torch.randint(0, vocab, (B, T + 1), device=device)
    clip = PAPER_TRAIN["44m"]["grad_clip"]
    models = {}
    t_start = time.monotonic()
    for n in names:
        m = build_model(get_preset(n)).to(device).train()
        models[n] = (m, ts.new_state(m, device))
    mo, st_mo = models[args.train_moeut]
    de, st_de = models[args.train_dense]

    def moe_step(backend):
        def run():
            _set_backend(mo, backend)
            ts.step_fn(st_mo, mo, batch, dtype, B, clip)
        return run

    fns = {v: moe_step(v) for v in variants}
    fns["dense"] = lambda: ts.step_fn(st_de, de, batch, dtype, B, clip)
    first, failed = {}, {}
    for n, f in list(fns.items()):
        t0 = time.monotonic()
        try:
            f()
            _sync(device)
        except Exception as e:  # noqa: BLE001  (a broken candidate must not end the run)
            failed[n] = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"[train] {n}: FAILED {failed[n]}")
            del fns[n]
            continue
        first[n] = time.monotonic() - t0
        for _ in range(max(args.warmup - 1, 0)):
            f()
    names_all = [v for v in variants if v in fns] + ["dense"]
    left = budget_s - (time.monotonic() - t_start)
    phase = Phase(names_all, time.monotonic() + max(left, 0), args.min_rounds, args.max_rounds)
    rounds = phase.run(fns, device)
    rows = []
    for v in names_all:
        t = phase.times[v]
        r = _ratios(t, phase.times["dense"])
        rows.append(dict(variant=v, ms=statistics.median(t) * 1e3, ratio_vs_dense=statistics.median(r),
                         ratio_min=min(r), ratio_max=max(r), tokens_per_s=B * T / statistics.median(t),
                         first_call_s=first[v]))
    if args.profile:
        for v in names_all:
            p = _profile(fns[v], device, args.out / f"profile_train_{v}.txt", args.profile_rows)
            next(r for r in rows if r["variant"] == v).update({"prof_" + k: val for k, val in p.items()})
    log(f"[train] {rounds} rounds in {time.monotonic() - t_start:.1f} s")
    return dict(moeut=args.train_moeut, dense=args.train_dense, batch=B, seq_len=T, rounds=rounds, rows=rows,
                failed=failed)


def _fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def to_markdown(result, header) -> str:
    lines = list(header)
    cols_l = ["variant", "ms", "ratio_vs_dense", "ratio_min", "ratio_max", "vs_triton", "tflops", "max_rel_err",
              "flag", "first_call_s", "prof_wall_ms", "prof_device_busy_ms", "prof_kernels"]
    for lay in result["layers"]:
        s = lay["dims"]
        lines += ["", f"### σ-MoE layer fwd+bwd, shape {lay['shape']} (d {s['d']}, N_E {s['n_experts']}, "
                      f"d_expert {s['d_expert']}, K {s['k']}), T {lay['T']}, {lay['rounds']} rounds", "",
                  "Ranked by the median per-round ratio to the dense-active MLP; `vs_triton` = median per-round "
                  "ratio to the current default kernel path; `max_rel_err` = largest relative max-error of "
                  "output/gradients vs the reference backend on the same batch.", ""]
        rows = sorted(lay["rows"], key=lambda r: r["ratio_vs_dense"])
        cols = [c for c in cols_l if any(c in r for r in rows)]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
        lines += [f"- FAILED {v}: {msg}" for v, msg in lay.get("failed", {}).items()]
    if result.get("train"):
        tr = result["train"]
        lines += ["", f"### Training step, {tr['moeut']} (each backend) vs {tr['dense']}, batch {tr['batch']} x "
                      f"{tr['seq_len']}, {tr['rounds']} rounds", ""]
        rows = sorted(tr["rows"], key=lambda r: r["ratio_vs_dense"])
        cols = [c for c in ["variant", "ms", "ratio_vs_dense", "ratio_min", "ratio_max", "tokens_per_s",
                            "first_call_s", "prof_wall_ms", "prof_device_busy_ms", "prof_kernels"]
                if any(c in r for r in rows)]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
        lines += [f"- FAILED {v}: {msg}" for v, msg in tr.get("failed", {}).items()]
    lines += ["", "Best per table (lowest ratio, not flagged): " + "; ".join(result["best"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, fp32, a few rounds (CI)")
    ap.add_argument("--out", type=Path, required=True, help="output directory (created)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma-separated CVMM backends (from {', '.join(CVMM_BACKENDS)})")
    ap.add_argument("--shapes", default=None, help="comma-separated layer shapes (GPU: 44m,244m; dry run: tiny)")
    ap.add_argument("--tokens", type=int, default=None, help="layer tokens T (GPU 16384, dry run 64)")
    ap.add_argument("--budget-s", type=float, default=None, help="total seconds (GPU 420, dry run 40)")
    ap.add_argument("--min-rounds", type=int, default=None, help="GPU 5, dry run 2")
    ap.add_argument("--max-rounds", type=int, default=None, help="GPU 50, dry run 3")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-train", action="store_true", help="skip the training-step phase")
    ap.add_argument("--train-moeut", default=None, help="GPU moeut_44m, dry run tiny")
    ap.add_argument("--train-dense", default=None, help="GPU dense_44m, dry run dense_tiny")
    ap.add_argument("--train-batch", type=int, default=None, help="sequences per step (GPU 16, dry run 2)")
    ap.add_argument("--train-seq", type=int, default=None, help="GPU 1024, dry run 32")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--device", default=None)
    a = ap.parse_args(argv)
    dry = a.dry_run
    device = torch.device(a.device or ("cpu" if dry or not torch.cuda.is_available() else "cuda"))
    if device.type != "cuda" and not dry:
        print("rank_candidates: error: no CUDA device; use --dry-run on CPU", file=sys.stderr)
        return 1
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in CVMM_BACKENDS or v == "auto"]
    if bad or not variants:
        print(f"rank_candidates: error: --variants: unknown backend(s) {bad}; known: "
              f"{', '.join(b for b in CVMM_BACKENDS if b != 'auto')}", file=sys.stderr)
        return 1
    shapes = (a.shapes or ("tiny" if dry else "44m,244m")).split(",")
    if any(s not in SHAPES for s in shapes):
        print(f"rank_candidates: error: --shapes: unknown shape in {shapes}; known: {', '.join(SHAPES)}",
              file=sys.stderr)
        return 1
    a.tokens = a.tokens or (64 if dry else 16384)
    budget = a.budget_s or (40.0 if dry else 420.0)
    a.min_rounds = a.min_rounds or (2 if dry else 5)
    a.max_rounds = a.max_rounds or (3 if dry else 50)
    a.train_moeut = a.train_moeut or ("tiny" if dry else "moeut_44m")
    a.train_dense = a.train_dense or ("dense_tiny" if dry else "dense_44m")
    a.train_batch = a.train_batch or (2 if dry else 16)
    a.train_seq = a.train_seq or (32 if dry else 1024)
    a.out.mkdir(parents=True, exist_ok=True)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    if not gpu:
        from moeut.cpu import keep_freed_memory
        keep_freed_memory()
    t0 = time.monotonic()

    def log(msg):
        print(f"[{time.monotonic() - t0:6.1f} s] {msg}", flush=True)

    n_phases = len(shapes) + (0 if a.no_train else 1)
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  device=torch.cuda.get_device_name(device) if gpu else f"CPU ({platform.machine()})",
                  torch=torch.__version__, triton=_triton_version(), python=platform.python_version(),
                  dtype=str(dtype), dry_run=dry, variants=variants, budget_s=budget,
                  command="python benchmarks/rank_candidates.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  layers=[], train=None)
    for i, sh in enumerate(shapes):
        share = (budget - (time.monotonic() - t0)) / (n_phases - i)
        result["layers"].append(layer_phase(sh, a.tokens, variants, device, dtype, share, a, log))
        _write(result, a.out, dtype, dry, budget, t0)  # partial results survive a timeout
    if not a.no_train:
        share = budget - (time.monotonic() - t0)
        result["train"] = train_phase(variants, device, dtype, share, a, log)
    md = _write(result, a.out, dtype, dry, budget, t0)
    print(md)
    log(f"wrote {a.out / 'rank.json'}, {a.out / 'rank.md'}")
    return 0


def _write(result, out: Path, dtype, dry, budget, t0) -> str:
    """Rank, then write rank.json and rank.md into `out`; returns the markdown."""
    best = []
    for lay in result["layers"]:
        ok = [r for r in lay["rows"] if r["variant"] != "dense" and not r.get("flag")]
        if ok:
            b = min(ok, key=lambda r: r["ratio_vs_dense"])
            best.append(f"layer {lay['shape']}: {b['variant']} {b['ratio_vs_dense']:.2f}x dense")
    if result["train"]:
        ok = [r for r in result["train"]["rows"] if r["variant"] != "dense"]
        b = min(ok, key=lambda r: r["ratio_vs_dense"])
        best.append(f"train step: {b['variant']} {b['ratio_vs_dense']:.2f}x dense")
    result["best"] = best
    result["total_s"] = time.monotonic() - t0
    header = [f"## CVMM candidate ranking (`benchmarks/rank_candidates.py`), {result['date'][:10]}", "",
              f"- device: {result['device']}; torch {result['torch']}; triton {result['triton']}; "
              f"Python {result['python']}; {dtype}" + ("; CPU DRY RUN (numbers mean nothing)" if dry else ""),
              f"- command: {result['command']}",
              f"- total {result['total_s']:.0f} s (budget {budget:.0f} s, compile and autotune included)"]
    md = to_markdown(result, header)
    (out / "rank.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "rank.md").write_text(md)
    return md


if __name__ == "__main__":
    sys.exit(main())
