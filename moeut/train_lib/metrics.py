"""What the training loop measures besides the loss (SPEC §4.4, §7.3, §9.3).

Owns: the routing-metric accumulators' layout per architecture (`make_routing_stats`), training
FLOPs per token of the active computation and the device peak behind `train/mfu`
(`flops_per_token`, `mfu_peak`, `mfu`), and peak memory (`memory_mb`). The accumulators
themselves live in the run state (state.py); the loop (loop.py) logs these values.
"""
from __future__ import annotations

import resource
import warnings
from typing import Callable, Optional

import torch


def make_routing_stats(model_cfg):
    """RoutingStats laid out like the model's routing records (SPEC 7.3; outputs.RoutingRecord),
    or None for a model without experts. Every MoE architecture of the package is covered:

        moeut (σ-MoE, Switch or DeepSeekMoE MLPs)  G members x R repetitions, attention experts per head
        moe_transformer (Switch/DeepSeekMoE/σ-MoE baselines, every moe_every-th MLP)  G = L layers, R = 1
        sut  one shared layer applied L times: G = 1, R = L; its MoA experts as one "head"
    Raises ValueError naming train.routing_interval for an architecture with experts whose record
    layout is not known here (rather than silently logging no routing metrics)."""
    from moeut.analysis.routing import RoutingStats
    arch = getattr(model_cfg, "arch", "moeut")
    if arch == "moeut":
        return RoutingStats.from_config(model_cfg)
    if arch == "moe_transformer":
        return RoutingStats(model_cfg.n_layers, 1, model_cfg.ff_n_experts)
    if arch == "sut":
        return RoutingStats(1, model_cfg.n_layers, model_cfg.ff_n_experts, att_n_heads=1,
                            att_n_experts=model_cfg.att_n_experts)
    if not getattr(model_cfg, "ff_n_experts", None):
        return None  # dense: no routing to measure
    raise ValueError(f"train.routing_interval: no routing-metric layout for architecture {arch!r}; add it to "
                     "make_routing_stats in moeut/train_lib/metrics.py")


def flops_per_token(model_cfg, seq_len: int) -> Optional[float]:
    """Training FLOPs per token of the *active* computation (moeut.compute, paper convention,
    SPEC 9.3) for windows of `seq_len` tokens, or None with a warning naming train/mfu when the
    accounting module does not know the architecture (never 6 x total parameters: that counts
    every expert and inflates a MoE's MFU)."""
    from moeut.compute import flops_per_token as fpt
    try:
        return float(fpt(model_cfg, seq_len, "paper"))
    except (ValueError, AttributeError, TypeError) as e:  # an architecture the accounting does not know
        warnings.warn(f"train/mfu: not logged: FLOPs per token unknown for arch "
                      f"{getattr(model_cfg, 'arch', '?')!r} ({type(e).__name__}: {e})")
        return None


def mfu_peak(device: torch.device, fpt: Optional[float], say: Callable[[str], None]) -> Optional[float]:
    """Peak dense bf16 FLOP/s of `device` (moeut.compute.peak_flops) for `train/mfu`, or None.
    When FLOPs per token are known (`fpt`) but the peak is not, says so: a warning naming the GPU
    on CUDA (add it to moeut.compute.peak_flops), a `say` message on CPU."""
    from moeut.compute import peak_flops
    peak = peak_flops(device)
    if peak is None and fpt is not None:
        msg = f"train/mfu: not logged: no peak FLOP/s known for {device}"
        if device.type == "cuda":
            warnings.warn(f"{msg} ({torch.cuda.get_device_name(device)}; add it to moeut.compute.peak_flops)")
        else:
            say(f"[train] {msg}")
    return peak


def mfu(tokens_per_s: float, fpt: Optional[float], peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation (SPEC 9.3): tokens/s x FLOPs/token / peak FLOP/s, a fraction in
    [0, 1]; None when either the FLOPs per token or the peak is unknown (then not logged)."""
    return (tokens_per_s * fpt / peak) if (peak and fpt) else None


def memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MiB: the CUDA allocator's maximum on a GPU, the resident
    set's high-water mark (ru_maxrss, KiB on Linux) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
