"""Pre-warm the Triton caches for a model: compile (and autotune) everything a run will need.

    python -m moeut.tools.warmup preset=moeut_44m dtype=bf16            # batch 64 x 1024 + decoding
    python -m moeut.tools.warmup preset=moeut_44m dtype=bf16 batch=16 seq_len=256 decode=false

Runs `steps` forward + backward passes of the model on the GPU at the given batch (random tokens),
then (decode=true) a KV-cache decode of `prefill` tokens and 8 single-token steps, and prints the
wall time of each: the first pass includes compiling and autotuning, the second is the warm step
time. Compiled kernels land in Triton's cache (TRITON_CACHE_DIR, default ~/.triton/cache) and
autotune winners beside them (`cache_results`), so later processes -- training, evaluation --
start warm. Run it once per machine / cache directory, per model shape and dtype; the list of what
gets compiled is `python -m moeut.tools.footprint` with the same arguments.

A typed tool (`WarmupOptions`, moeut.cli.typed_tool; `--help` lists the options). device=cuda
(the default) without a GPU is an error at once; device=cpu is a dry run, announced, where the
PyTorch implementation runs and nothing is compiled.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..cli import bad_input_exits, check_device_available, option, typed_tool
from .footprint import DTYPES, model_config


def cache_dirs() -> dict:
    """Where the compiled kernels and autotune results go (Triton), and inductor's cache."""
    home = os.path.expanduser("~")
    triton_dir = os.environ.get("TRITON_CACHE_DIR") or os.path.join(
        os.environ.get("TRITON_HOME", home), ".triton", "cache")
    import tempfile
    user = os.environ.get("USER", "root")
    inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(tempfile.gettempdir(), f"torchinductor_{user}")
    return {"triton": triton_dir, "inductor": inductor}


def warm(preset: str, dtype: str, batch: int, seq_len: int, steps: int = 2, decode: bool = True,
         prefill: int = 100, device: Optional[str] = None, log=print) -> dict:
    """Run the passes described in the module docstring; returns their wall times in seconds."""
    import torch.nn.functional as F
    from moeut.registry import build_model
    from moeut.model import KVCache
    from ..kernels import cvmm_triton as kt
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype not in ("bf16", "fp16", "fp32", "tf32"):  # else it would silently run fp32
        raise ValueError(f"dtype: expected one of bf16, fp16, fp32, tf32, got {dtype!r}")
    if dtype in ("fp32", "tf32"):
        kt.set_allow_tf32(dtype == "tf32")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_model(model_config(preset)).to(dev).train()
    V = model.config.vocab_size
    ids = torch.randint(0, V, (batch, seq_len + 1), device=dev)
    res = {"build_s": time.perf_counter() - t0, "step_s": []}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for i in range(steps):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(ids[:, :-1])
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), ids[:, 1:].flatten()) + out.reg_loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        sync()
        res["step_s"].append(time.perf_counter() - t0)
        log(f"[warmup] {preset} {dtype} training step {i + 1} ({batch} x {seq_len}): {res['step_s'][-1]:.2f} s")
    if decode:
        model.eval()
        sync()
        t0 = time.perf_counter()
        cache = KVCache()
        with torch.no_grad(), torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            model(ids[:1, :prefill], cache=cache)
            for s in range(8):
                model(ids[:1, prefill + s:prefill + s + 1], cache=cache)
        sync()
        res["decode_s"] = time.perf_counter() - t0
        log(f"[warmup] decode (prefill {prefill} + 8 steps): {res['decode_s']:.2f} s")
    return res


@dataclass
class WarmupOptions:
    """The options of `python -m moeut.tools.warmup` (checked by moeut.cli.typed_tool, then `check`)."""

    preset: str = option("moeut_44m", help="model preset (registry presets, or golden_tiny / golden_small_g3)")
    dtype: str = option("bf16", choices=DTYPES,
                        help="bf16 | fp16 (autocast), fp32 (true fp32), tf32 (fp32 with TF32 allowed)")
    batch: int = option(64, lo=1, help="sequences per training step")
    seq_len: int = option(1024, lo=1, help="tokens per sequence")
    steps: int = option(2, lo=0, help="forward + backward passes to run (0: only the decode)")
    decode: bool = option(True, help="also a KV-cache decode of `prefill` tokens and 8 single-token steps")
    prefill: int = option(100, lo=1, help="prompt length (tokens) of the decode")
    device: str = option("cuda", help="cuda | cuda:N | cpu (cuda without a GPU is an error; cpu: a dry run "
                                      "of the PyTorch implementation, nothing compiled)")


def check(a: WarmupOptions) -> None:
    """Raises ValueError naming `preset` when it is unknown, and `device` when it is not cpu /
    cuda / cuda:N, or CUDA while torch sees no GPU."""
    try:
        model_config(a.preset)
    except (KeyError, ValueError) as e:
        raise ValueError(f"preset: {a.preset!r}: {e}") from None
    dev = a.device
    if not re.fullmatch(r"cpu|cuda(:\d+)?", dev):
        raise ValueError(f"device: expected cuda, cuda:N or cpu, got {dev!r}")
    try:
        check_device_available(dev, "device")  # the one device check of every tool (moeut.cli)
    except ValueError as e:
        raise ValueError(f"{e}: nothing to compile or autotune (the Triton kernels run on GPUs only); "
                         f"device=cpu runs a dry run of the PyTorch implementation, which compiles nothing") from None


def run(a: WarmupOptions) -> dict:
    """Print the Triton cache dir and run `warm` with the options `a`; returns warm()'s timings.
    Raises the ValueErrors of `check`; device=cpu is announced as a dry run."""
    check(a)
    if a.device == "cpu":
        print("[warmup] device=cpu: a dry run of the PyTorch implementation; nothing is compiled or cached")
    dirs = cache_dirs()
    print(f"[warmup] Triton cache (kernels + autotune results): {dirs['triton']}")
    return warm(a.preset, a.dtype, a.batch, a.seq_len, a.steps, a.decode, a.prefill, a.device)


APP = "moeut.tools.warmup"


def _work(a: WarmupOptions) -> dict:
    with bad_input_exits(APP):  # bad input: one line, exit 1 (a later crash keeps its traceback)
        check(a)
    return run(a)


main = typed_tool(
    APP, WarmupOptions,
    summary="Pre-warm the Triton caches for a model: run `steps` forward + backward passes at the given "
            "batch (random tokens) and, with decode=true, a KV-cache decode, printing the wall time of "
            "each (the first pass includes compiling and autotuning). Compiled kernels and autotune "
            "winners land in Triton's cache (TRITON_CACHE_DIR, default ~/.triton/cache), so later "
            "processes start warm. `python -m moeut.tools.footprint` with the same options lists what "
            "gets compiled.",
    usage="python -m moeut.tools.warmup [key=value ...]",
    notes="See docs/kernels.md.")(_work)


if __name__ == "__main__":
    main()
