"""Pre-warm the Triton caches for a model: compile (and autotune) everything a run will need.

    python -m moeut.kernels.warmup preset=moeut_44m dtype=bf16            # batch 64 x 1024 + decoding
    python -m moeut.kernels.warmup preset=moeut_44m dtype=bf16 batch=16 seq_len=256 decode=false

Runs `steps` forward + backward passes of the model on the GPU at the given batch (random tokens),
then (decode=true) a KV-cache decode of `prefill` tokens and 8 single-token steps, and prints the
wall time of each: the first pass includes compiling and autotuning, the second is the warm step
time. Compiled kernels land in Triton's cache (TRITON_CACHE_DIR, default ~/.triton/cache) and
autotune winners beside them (`cache_results`), so later processes -- training, evaluation --
start warm. Run it once per machine / cache directory, per model shape and dtype; the list of what
gets compiled is `python -m moeut.kernels.footprint` with the same arguments.

A Hydra app over conf/warmup.yaml (`--help` lists the options with their meaning): preset
[moeut_44m], dtype bf16|fp16|fp32|tf32 [bf16], batch [64], seq_len [1024], steps [2], decode
true|false [true], prefill [100], device [null: cuda; without a GPU that is an error at once;
device=cpu is a dry run, announced, where the PyTorch implementation runs and nothing is compiled].
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional

import hydra
import torch

from ..cli import CONF_DIR, one_line_hydra_errors


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
    from .footprint import model_config
    from . import cvmm_triton as kt
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


def options(cfg: Any) -> dict:
    """The checked options of a composed conf/warmup.yaml: batch/seq_len/prefill ints >= 1, steps >= 0,
    decode a bool, device a string or None. Raises ValueError naming the option (unknown option,
    non-integer or < 1, decode not true/false, unknown dtype or preset)."""
    from ..cli import bool_option, choice_option, int_option, tool_options
    from .footprint import DTYPES, model_config

    a = tool_options(cfg, "warmup")
    choice_option(a, "dtype", DTYPES)
    for k in ("batch", "seq_len", "prefill"):
        a[k] = int_option(a, k)
    a["steps"] = int_option(a, "steps", lo=0)  # 0: warm the decode only
    a["decode"] = bool_option(a, "decode")
    try:
        model_config(str(a["preset"]))
    except (KeyError, ValueError) as e:
        raise ValueError(f"preset: {a['preset']!r}: {e}") from None
    a["device"] = str(a["device"]) if a.get("device") else None
    return a


def run(cfg: Any) -> dict:
    """Print the Triton cache dir and run `warm` with the options of a composed conf/warmup.yaml;
    returns warm()'s timings. Raises the ValueErrors of `options`, and ValueError naming `device`
    when it is (or defaults to) CUDA and torch sees no GPU; device=cpu is announced as a dry run."""
    a = options(cfg)
    dev = a["device"]
    if (dev is None or dev.startswith("cuda")) and not torch.cuda.is_available():
        given = f"device={dev}" if dev else "device (default: cuda)"
        raise ValueError(f"{given}: torch sees no CUDA GPU, so there is nothing to compile or autotune (the "
                         f"Triton kernels run on GPUs only); device=cpu runs a dry run of the PyTorch "
                         f"implementation, which compiles nothing")
    if torch.device(dev or "cuda").type == "cpu":
        print("[warmup] device=cpu: a dry run of the PyTorch implementation; nothing is compiled or cached")
    dirs = cache_dirs()
    print(f"[warmup] Triton cache (kernels + autotune results): {dirs['triton']}")
    return warm(a["preset"], a["dtype"], a["batch"], a["seq_len"], a["steps"], a["decode"], a["prefill"],
                a["device"])


@one_line_hydra_errors("moeut.kernels.warmup")
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="warmup")
def main(cfg: Any) -> None:
    """`python -m moeut.kernels.warmup [key=value ...]` (options: conf/warmup.yaml, `--help`);
    bad options: a one-line error naming the option, exit 1."""
    from moeut.cli import setup_tool_output
    setup_tool_output("moeut.kernels.warmup")  # one-line warnings; no progress frames in a log file
    try:
        run(cfg)
    except ValueError as e:
        sys.exit(f"moeut.kernels.warmup: error: {e}")


if __name__ == "__main__":
    main()
