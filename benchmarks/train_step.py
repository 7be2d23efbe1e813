"""Training step time, tokens/s and peak memory: MoEUT vs its parameter-matched dense baseline.

    python benchmarks/train_step.py                           # CPU: 44M presets, small batch
    python benchmarks/train_step.py --device cuda             # GPU: paper batch 64 x 1024, bf16
    python benchmarks/train_step.py --device cuda --record docs/benchmarks.md

Both models run in the same process, interleaved round by round (median over rounds). A step is
training's own `moeut.train_lib.step.train_step` (micro-batches, CE + regulariser, global grad-norm
clipping, the non-finite check and its host sync, AdamW over all parameters), with bf16 autocast
on GPUs with compute capability >= 8, so the benchmark times exactly what train.py runs. Target (paper A.7, "significantly less compute
and memory"): MoEUT step time <= dense and MoEUT peak memory <= dense. CPU numbers only show the
script works (glibc malloc settings of SPEC 3.8 applied; CPU peak memory is process RSS growth).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moeut.compute import total_params  # noqa: E402
from moeut.registry import PAPER_TRAIN, build_model, get_preset  # noqa: E402
from moeut.train_lib.distributed import DistInfo  # noqa: E402
from moeut.train_lib.state import TrainState  # noqa: E402
from moeut.train_lib.step import train_step  # noqa: E402

LR = 2.5e-4  # the paper's 44M learning rate (SPEC 4.2); its value does not change the step's cost


def new_state(model: torch.nn.Module, device: torch.device) -> TrainState:
    """A single-process training state over `model`: AdamW (weight decay 0.01) over all
    parameters, no loss scaler, no data sampler (the benchmark feeds one fixed batch)."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    return TrainState(model, opt, None, None, DistInfo(device=device))


def step_fn(state: TrainState, fwd_model, batch_BT1, autocast_dtype, micro: int, clip: float) -> None:
    """One training step exactly as train.py takes it (`train_step`); fwd_model is the model or
    its torch.compile wrapper."""
    train_step(state, fwd_model, batch_BT1, LR, micro_batch_size=micro, autocast_dtype=autocast_dtype,
               grad_clip=clip)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cpu_peak_rss_mb(preset: str, B: int, T: int, micro: int, clip: float, q, vocab: int = 8000) -> None:
    """Child process: peak resident-memory growth (sampled every 2 ms) while building `preset`
    and running two training steps. A fresh process per model, because freed memory stays in
    the process (keep_freed_memory) and max-RSS is a high-water mark."""
    import threading
    from moeut.cpu import keep_freed_memory
    keep_freed_memory()
    torch.manual_seed(0)
    batch = torch.randint(0, vocab, (B, T + 1))
    base, peak, done = _rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.002)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    m = build_model(get_preset(preset))
    state = new_state(m, torch.device("cpu"))
    step_fn(state, m, batch, None, micro, clip)
    step_fn(state, m, batch, None, micro, clip)
    done.set()
    th.join()
    q.put(max(peak[0], _rss_mb()) - base)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moeut", default="moeut_44m")
    ap.add_argument("--dense", default="dense_44m")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (GPU 64, CPU 2)")
    ap.add_argument("--micro", type=int, default=None, help="micro-batch (default: whole batch)")
    ap.add_argument("--seq-len", type=int, default=None, help="GPU 1024, CPU 256")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (GPU 10, CPU 3)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--record", default=None, help="append a markdown section to this file")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    B = a.batch or (64 if gpu else 2)
    T = a.seq_len or (1024 if gpu else 256)
    micro = a.micro or B
    rounds = a.rounds or (10 if gpu else 3)
    dtype = torch.bfloat16 if gpu and torch.cuda.get_device_capability(device)[0] >= 8 else (
        torch.float16 if gpu else None)
    if not gpu:
        from moeut.cpu import keep_freed_memory
        keep_freed_memory()
    torch.manual_seed(0)
    names = [a.moeut, a.dense]
    fwd, states, res = {}, {}, {n: {"times": []} for n in names}
    # Token ids valid for both models (the presets' vocabularies can differ, e.g. tiny's 512).
    vocab = min(get_preset(n).vocab_size for n in names)
    batch = torch.randint(0, vocab, (B, T + 1), device=device)
    clip = PAPER_TRAIN["44m"]["grad_clip"]
    for n in names:
        cfg = get_preset(n)
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)  # the other model, already resident
        m = build_model(cfg).to(device)
        m.train()
        state = new_state(m, device)
        fwd_m = torch.compile(m) if a.compile else m
        for _ in range(a.warmup):
            step_fn(state, fwd_m, batch, dtype, micro, clip)
        sync(device)
        res[n]["params"] = total_params(m)
        if gpu:
            res[n]["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:  # max-RSS is a process high-water mark: measure each model in a fresh process
            import multiprocessing as mp
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            p = ctx.Process(target=_cpu_peak_rss_mb, args=(n, B, T, micro, clip, q, vocab))
            p.start()
            res[n]["peak_mb"] = q.get()
            p.join()
        fwd[n], states[n] = fwd_m, state
    for _ in range(rounds):  # interleaved rounds: both models see the same machine state
        for n in names:
            sync(device)
            t0 = time.perf_counter()
            step_fn(states[n], fwd[n], batch, dtype, micro, clip)
            sync(device)
            res[n]["times"].append(time.perf_counter() - t0)
    dev_name = torch.cuda.get_device_name(device) if gpu else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    lines = [f"## Training step benchmark ({a.moeut} vs {a.dense}), {datetime.date.today()}", "",
             f"- device: {dev_name}; torch {torch.__version__}; dtype {dtype or torch.float32}; "
             f"batch {B} x {T} (micro {micro}); compile {a.compile}; {rounds} interleaved rounds after {a.warmup} warm-up",
             f"- command: python benchmarks/train_step.py {' '.join(argv if argv is not None else sys.argv[1:])}",
             "- peak memory: " + ("torch.cuda.max_memory_allocated during build + warm-up minus the memory "
                                  "already allocated (the other model)" if gpu else "resident-memory growth (sampled every 2 ms) while "
                                  "building the model and running two training steps, each model in a fresh process "
                                  "(weights, gradients, AdamW state and activations)"),
             "", "| model | params | step time ms (median) | tokens/s | peak memory MiB |", "|---|---|---|---|---|"]
    for n in names:
        med = statistics.median(res[n]["times"])
        res[n]["median"] = med
        lines.append(f"| {n} | {res[n]['params']:,} | {med * 1e3:.1f} | {B * T / med:,.0f} | {res[n]['peak_mb']:.0f} |")
    ratio_t = res[a.moeut]["median"] / res[a.dense]["median"]
    ratio_m = res[a.moeut]["peak_mb"] / max(res[a.dense]["peak_mb"], 1e-9)
    lines += ["", f"MoEUT / dense: step time {ratio_t:.2f}x (target <= 1), peak memory {ratio_m:.2f}x (target <= 1)."
              + ("" if gpu else " CPU numbers do not predict GPU ratios (SPEC 3.8)."), ""]
    text = "\n".join(lines)
    print(text)
    if a.record:
        with open(a.record, "a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
