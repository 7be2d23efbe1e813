"""Compute accounting (SPEC §9): parameters, MACs and FLOPs per token, MFU, measured step time.

Conventions (never mixed in one table):
- **Total parameters** (`total_params`, the package's one parameter counter): every parameter incl.
  embedding, head, norms (the paper's size labels). Exact: counts a module's parameters, or builds
  a config's model on the meta device. The SPEC §2 closed forms are an independent reference in
  the tests (tests/param_formula.py), not a second counter.
- **Active parameters** (`active_params`): weight matrices one token touches, summed over all
  layer *applications* (a shared layer applied R times counts R times), plus the head d*V; no
  embedding, norms or biases (SPEC 9.1).
- **MACs** (`layer_macs`, `macs_per_token`): the authors' formulas (`paper/moe_universal/common.py`,
  SPEC 9.2): forward only, per absolute layer, attention with the *full* T^2 (not the causal half),
  no embedding or head. mode="paper" is exact for MoEUT (SwitchHead + σ-MoE) and dense models and
  reproduces SPEC 9.2's table; the other architectures are counted the same way [ours]:
  Switch/DeepSeek MLPs like σ-MoE (K active experts + the router), SUT's MoA as k*heads_per_expert
  query heads over shared K/V plus routers and relative-position logits, its layer L times (the
  maximum ACT depth, an upper bound).
- **Training FLOPs per token** (`flops_per_token`): "paper": 6 * (forward MACs/token + head d*V);
  "nanogpt": 6 * N_active + 12 * L * H * d_head * T (PaLM/nanoGPT, full square). 2 FLOPs per MAC and
  backward = 2x forward in both.
- **MFU** = achieved training FLOPs/s / peak dense bf16 of the device (H100/H200 989e12, A100 312e12).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, Optional, Union

import torch
import torch.nn.functional as F

from .registry import build_model


def _arch(cfg) -> str:
    return getattr(cfg, "arch", "moeut")


# ------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------

def total_params(cfg_or_module: Union[Any, torch.nn.Module]) -> int:
    """THE parameter counter (SPEC 9.1, "total parameters"): every parameter of the model, incl.
    embedding, head, norms and biases, each shared tensor once.

    `cfg_or_module`: a model config (any registered architecture; the model is built on the meta
    device: no memory, no initialisation) or an nn.Module (also DDP/torch.compile-wrapped; their
    parameters are the wrapped module's). Returns a count (parameters, not bytes).
    Raises ValueError/TypeError from `moeut.registry.build_model` for a config of no registered
    architecture."""
    if isinstance(cfg_or_module, torch.nn.Module):
        return sum(p.numel() for p in cfg_or_module.parameters())
    with torch.device("meta"):
        model = build_model(cfg_or_module)
    return sum(p.numel() for p in model.parameters())


def active_params(cfg, include_head: bool = True) -> int:
    """Weight-matrix parameters one token touches, summed over all layer applications (a shared
    layer applied R times counts R times), plus the head d*V when `include_head` (SPEC 9.1). No
    embedding, norms or biases. A count; raises ValueError for an unknown arch."""
    d, V = cfg.d_model, cfg.vocab_size
    arch = _arch(cfg)
    head = d * V if include_head else 0
    if arch == "moeut":
        H, dh, Ea, k = cfg.n_heads, cfg.d_head, cfg.att_n_experts, cfg.att_k
        att = 2 * d * H * dh + 2 * k * d * H * dh + 2 * H * Ea * d
        return cfg.n_layers * (att + _mlp_active(cfg)) + head
    if arch in ("dense", "moe_transformer"):
        att = 4 * d * cfg.n_heads * cfg.d_head
        total = head
        for l, g, r in _dense_order(cfg):
            moe = arch == "moe_transformer" and cfg.is_moe_layer(g)
            total += att + (_mlp_active(cfg) if moe else 2 * d * cfg.d_ff)
        return total
    if arch == "sut":
        A, k = cfg.att_expert_size, cfg.att_k
        att = 2 * d * A + 2 * k * d * A + d * d + cfg.att_n_experts * d
        mlp = 2 * cfg.ff_k * d * cfg.ff_expert_size + d * d + cfg.ff_n_experts * d
        halt = d * d + 2 * d
        return cfg.n_layers * (att + mlp + halt) + head
    raise ValueError(f"active_params: unknown arch {arch!r}")


def _mlp_active(cfg) -> int:
    d = cfg.d_model
    routed = cfg.ff_n_experts - (cfg.moe_n_shared if cfg.mlp_type == "deepseek" else 0)
    return 2 * cfg.ff_k * d * cfg.ff_expert_size + routed * d


def _dense_order(cfg):
    G, R = cfg.group_size, cfg.n_repeats
    return [(r * G + g, g, r) for r in range(R) for g in range(G)]


# ------------------------------------------------------------------------------------------
# MACs (the authors' formulas, SPEC 9.2)
# ------------------------------------------------------------------------------------------

def attention_macs_paper(cfg, T: int, g: int = 0) -> int:
    """Forward MACs of one absolute layer's attention (unique layer `g`) for a sequence of T
    tokens, the authors' formula with the full T^2 score matrix (SPEC 9.2). Raises ValueError for
    an unknown arch."""
    d = cfg.d_model
    arch = _arch(cfg)
    if arch in ("dense", "moe_transformer"):
        H, dh = cfg.n_heads, cfg.d_head
        return 2 * H * dh * T * T + 4 * d * H * dh * T
    if arch == "moeut":  # SwitchHead, RoPE variant ("preln_moeatt")
        H, dh, k, Ea = cfg.n_heads, cfg.d_head, cfg.att_k, cfg.att_n_experts
        n_exp = 2  # V and O are expert projections
        n_proj = n_exp * k + 4 - n_exp
        n_sel = 2
        # The authors' gate term uses E_att, not H*E_att (undercounts the gates by H; kept for parity).
        return 2 * H * dh * T * T + n_proj * d * H * dh * T + n_exp * H * k * T * dh + n_sel * Ea * d * T
    if arch == "sut":  # [ours] same conventions
        A, k, dh, Ea = cfg.att_expert_size, cfg.att_k, cfg.d_head, cfg.att_n_experts
        Hq = k * cfg.heads_per_expert
        return (2 * Hq * dh * T * T + 2 * d * A * T + 2 * k * d * A * T + (d * d + Ea * d) * T
                + Hq * dh * (cfg.max_relative_positions + 1) * T)
    raise ValueError(f"attention_macs_paper: unknown arch {arch!r}")


def mlp_macs_paper(cfg, T: int, g: int = 0) -> int:
    """Forward MACs of one absolute layer's MLP (unique layer `g`) for T tokens (SPEC 9.2): dense
    2*T*d*d_ff; MoE 2*T*d*d_expert*K + the router T*d*N_E; SUT adds its router and halting unit.
    Raises ValueError for an unknown arch."""
    d = cfg.d_model
    arch = _arch(cfg)
    if arch == "dense" or (arch == "moe_transformer" and not cfg.is_moe_layer(g)):
        return 2 * d * cfg.d_ff * T
    if arch in ("moeut", "moe_transformer"):
        return T * _mlp_active(cfg)  # 2*T*d*d_expert*K + T*d*N_E (router)
    if arch == "sut":
        d2 = d * d
        return 2 * T * d * cfg.ff_expert_size * cfg.ff_k + (d2 + cfg.ff_n_experts * d) * T + (d2 + 2 * d) * T
    raise ValueError(f"mlp_macs_paper: unknown arch {arch!r}")


def model_macs_paper(cfg, T: int) -> int:
    """Forward MACs of the whole model (every layer application; no embedding, no head) per
    sequence of T tokens (SPEC 9.2). Raises ValueError for an unknown arch."""
    arch = _arch(cfg)
    if arch in ("dense", "moe_transformer"):
        order = _dense_order(cfg)
    else:
        G = getattr(cfg, "group_size", 1)
        order = [(l, l % G, l // G) for l in range(cfg.n_layers)]
    return sum(attention_macs_paper(cfg, T, g) + mlp_macs_paper(cfg, T, g) for _, g, _ in order)


def macs_per_token(cfg, seq_len: int = 1024, include_head: bool = False) -> float:
    """Forward MACs per token, paper mode (SPEC 9.2). include_head adds d*V."""
    m = model_macs_paper(cfg, seq_len) / seq_len
    return m + (cfg.d_model * cfg.vocab_size if include_head else 0)


def training_macs(cfg, seq_len: int, batch_size: int, steps: int) -> int:
    """The authors' "training MACs": model MACs per sequence x steps x batch (forward only)."""
    return model_macs_paper(cfg, seq_len) * steps * batch_size


def flops_per_token(cfg, seq_len: int = 1024, convention: str = "paper") -> float:
    """Training FLOPs per token (forward + backward = 3x forward, 2 FLOPs per MAC), SPEC 9.3:
    "paper" 6 * (MACs/token + head d*V); "nanogpt" 6 * N_active + 12 * L * H * d_head * T.
    Raises ValueError for another convention."""
    if convention == "paper":
        return 6.0 * macs_per_token(cfg, seq_len, include_head=True)
    if convention == "nanogpt":
        arch = _arch(cfg)
        if arch == "sut":
            qk = cfg.att_k * cfg.heads_per_expert * cfg.d_head
        else:
            qk = cfg.n_heads * cfg.d_head
        return 6.0 * active_params(cfg) + 12.0 * cfg.n_layers * qk * seq_len
    raise ValueError(f"flops_per_token: convention must be 'paper' or 'nanogpt', got {convention!r}")


# ------------------------------------------------------------------------------------------
# Hardware peak, MFU, measured step time
# ------------------------------------------------------------------------------------------

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device: Union[str, torch.device, None] = None) -> Optional[float]:
    """Peak dense bf16 tensor FLOP/s of a GPU (NVIDIA spec sheets; SXM parts), or None if unknown
    (CPUs, other GPUs). `device`: a CUDA device, or a device name such as "NVIDIA H100 80GB HBM3"."""
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda")
    if isinstance(device, torch.device) or (isinstance(device, str) and device.startswith(("cuda", "cpu"))):
        dev = torch.device(device)
        if dev.type != "cuda":
            return None
        name = torch.cuda.get_device_name(dev)
    else:
        name = str(device)
    for key, value in PEAK_BF16.items():
        if key in name.upper():
            return value
    return None


def mfu(tokens_per_s: float, flops_per_tok: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation in [0, 1]; None when the peak is unknown."""
    if not peak:
        return None
    return tokens_per_s * flops_per_tok / peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_loss(model: torch.nn.Module, window_BT1: torch.Tensor) -> torch.Tensor:
    """CE(logits of w[:, :-1], w[:, 1:]) in fp32 + reg_loss (the training pipeline's loss)."""
    out = model(window_BT1[:, :-1])
    ce = F.cross_entropy(out.logits.float().flatten(0, 1), window_BT1[:, 1:].flatten())
    return ce + out.reg_loss


def measure_step_time(model: torch.nn.Module, batch: torch.Tensor, *, optimizer: Optional[torch.optim.Optimizer] = None,
                      n_warmup: int = 3, n_iters: int = 10, autocast_dtype: Optional[torch.dtype] = None,
                      loss_fn: Callable = default_loss) -> Dict[str, float]:
    """Measured training step time: forward, backward and optimiser step on `batch` ([B, T+1]
    token windows on the model's device), after `n_warmup` untimed steps (compilation, allocator,
    autotuning). Returns median/mean/std step time (s), tokens/s (B*T per step) and peak memory
    (bytes, CUDA only). Du et al.'s cost measure (SPEC 8.7): compare only numbers taken on the same
    GPU type and software stack. The model's weights are updated (use a copy if that matters)."""
    if batch.dim() != 2 or batch.shape[1] < 2:
        raise ValueError(f"measure_step_time: batch must be [B, T+1] token windows, got {tuple(batch.shape)}")
    device = batch.device
    if optimizer is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()

    def step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(n_warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(n_iters):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tokens = batch.shape[0] * (batch.shape[1] - 1)
    return {
        "step_time_s": med,
        "step_time_mean_s": statistics.fmean(times),
        "step_time_std_s": statistics.pstdev(times),
        "tokens_per_s": tokens / med,
        "peak_mem_bytes": float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else float("nan"),
        "n_iters": float(n_iters),
    }


def summarize(cfg, seq_len: int = 1024) -> Dict[str, float]:
    """Every accounting number for one config (used by `python -m moeut.analysis compare` and the training logs)."""
    return {
        "params_total": float(total_params(cfg)),
        "params_active": float(active_params(cfg)),
        "macs_per_token": macs_per_token(cfg, seq_len),
        "macs_per_token_with_head": macs_per_token(cfg, seq_len, include_head=True),
        "flops_per_token": flops_per_token(cfg, seq_len, "paper"),
        "flops_per_token_nanogpt": flops_per_token(cfg, seq_len, "nanogpt"),
    }
