"""Triton CVMM kernels: the fused expert matmul of SPEC §3 on GPU (and under TRITON_INTERPRET=1).

Two kernels cover every product the σ-MoE MLP and SwitchHead need, forward and backward:

``fwd``  ("scatter2scatter") -- for every expert-sorted slot m with expert e = sorted_experts[m]:

        acc[m]  = A[a_idx[m]] @ W[e]                 (fp32 accumulator; rows gathered in-kernel)
        dot[m]  = <acc[m], X[dot_idx[m]]>            (optional epilogue; gives the gate gradient)
        out[o]  = scale[m] * acc[m]                  o = o_idx[m] (a permutation: plain store),
                                                     or out[o_idx[m]] += ... (fp32 atomics) when
                                                     several slots reduce into one row

    Forward: A = x, a_idx = slot // src_div (or none when x is already sorted), scale = gates.
    Input gradient: the same kernel on the *transposed* weights (a strided view, no copy),
    A = upstream gradient gathered through its row of each slot, scale = gates, and the
    dot-epilogue against x gives ∂gates = <g W[e]ᵀ, x> (SPEC 3.1) without another pass.

``dw``   -- dW[e] = Σ_{m in e} A[x_idx[m]]ᵀ (scale[m] · G[g_idx[m]]): one program per
    (expert, dW tile, split) walks its slice of the expert's contiguous sorted slots. With split 1
    every dW tile is owned by one program and written with a plain store; with split > 1 the
    partial sums are either atomically added into an fp32 buffer (default) or written to a
    [split, E, D_in, D_out] buffer summed in a fixed order (deterministic mode).

Nothing of size [T·k, d] is materialised in the default mode: input rows are gathered inside the
kernel, the MLP hidden activations stay in expert-sorted order between the up and the down
projection (``grouped_out``/``grouped_in`` in `moeut.kernels.cvmm`), and the k-way combine of the
down projection / SwitchHead O (and the src_div-way sum of the input gradient) is an fp32
``atomic_add`` into a [rows, d] buffer. fp32 ``red.add`` is native on sm_80+ (unlike the bf16
``index_add`` that dominated the `_grouped_mm` layer in SPEC 3.7, which is a CAS loop).

Design choice (SPEC 3.6): one expert per tile, with *index padding computed in the kernel*.
    The authors' CVMM gives every program a fixed block of BM sorted rows and loops over every
    expert id in that block, re-running the full BM×BN tile (and re-reading all BM gathered rows)
    once per expert present. ScatterMoE/vLLM instead pad each expert's row range to a multiple
    of BM so every tile has one expert. We do the latter without any padded index tensor: each
    program loads the E cumulative ends, computes cdiv(count_e, BM) blocks per expert with
    `tl.cumsum`, and finds its (expert, first row) by counting -- O(E) integer work per program,
    no host sync, no extra launch, and BM stays autotunable (a host-side padded schedule would fix
    BM). The grid is sized by the upper bound cdiv(S, BM) + E; surplus programs exit at once.
    Reasoning (not yet measured on a GPU; `benchmarks/cvmm.py` compares both, set
    MOEUT_CVMM_TILING=loop for the authors' scheme):
      * the up-projection is memory-bound (≈85–105 FLOP/B vs the H100 ridge ≈295, SPEC 3.7), so
        bytes matter more than FLOPs. Padding masks the rows of a partial tile, and masked loads
        fetch nothing: every gathered input row is read exactly once per N-tile. The loop scheme
        reads a boundary block's rows once per expert it contains (the official kernel loads all
        BM rows each time).
      * redundant MMA work: padding wastes on average BM/2 rows per expert; the loop scheme
        wastes a whole BM-row tile per expert boundary, i.e. ~2× more. At the 244M shape
        (E 387, ~339 rows/expert at T 8192, BM 128) that is ≈19 % vs ≈38 % extra MMA work.
      * one expert per program lets the K-loop be software-pipelined without an outer data-
        dependent expert loop, and the W[e] tile pointer is loop-invariant.
    GPU numbers are still to be measured (no GPU in the session that wrote this; see
    docs/kernels.md). Do not read the statements above as measured performance.

Precision policy (SPEC 3.3):
  * Tiles are loaded in the op dtype (the autocast dtype, else fp32); fp32 master weights are
    cast to the op dtype *in the kernel* when loaded (the same round-to-nearest as `w.to(dtype)`,
    without writing a cast copy of W each call).
  * Products in the op dtype on tensor cores, accumulation always in fp32.
  * fp32 inputs use `input_precision="ieee"` (true fp32, no TF32 surprise) unless
    MOEUT_CVMM_TF32=1 / `set_allow_tf32(True)`.
  * The gate scale is applied to the fp32 accumulator (forward and input gradient) or to the
    fp32-upcast upstream gradient before rounding it to the op dtype (weight gradient).
  * Outputs are rounded once to the op dtype; atomic combines accumulate in fp32 and round once.
  * dW is accumulated in fp32 and returned in the master weights' dtype; gate gradients in fp32
    (cast to the gates' dtype by the caller).
  * Under the interpreter, bf16 tiles are upcast to fp32 before `tl.dot` (the interpreter's bf16
    dot multiplies raw bit patterns, triton-lang/triton#11584, SPEC 3.8).

Determinism: MOEUT_CVMM_DETERMINISTIC=1 (or `torch.use_deterministic_algorithms(True)`) switches
off every atomic (combines via a per-slot buffer summed in a fixed order, dW via split-partials
summed in a fixed order) *and* autotuning (the K-reduction order depends on the block sizes, so a
different autotune winner in another process would change the bits). Results are then
bit-identical run to run on the same GPU and software.

Compile footprint and autotuning (see `candidate_configs` and `moeut.tools.footprint`):
every kernel specialisation is compiled once per config it may autotune over, so the config sets
are small and pruned per call: 2 configs for 16-bit / TF32 tiles, one small config for true fp32
and one for small problems (<= SMALL_S slots: decoding), which are never autotuned. Autotuning is
keyed on (slots rounded up to a power of two, D_in, D_out, layout flags, precision, dtypes); the
slot count is not a specialisation (do_not_specialize), and autotune winners persist on disk
(Triton's `cache_results`, in TRITON_CACHE_DIR). `pin_config(...)` or the environment variable
MOEUT_TRITON_CONFIG="BM=16,BN=16,BK=16,num_warps=1,num_stages=1" pins one config for every kernel
(required under TRITON_INTERPRET=1, where autotuning cannot benchmark).

This module imports nothing from `moeut`: the "triton" backend of `moeut.kernels.cvmm` (which runs
these kernels through the `moeut::cvmm` custom op of `moeut.kernels.ops`) is registered by
`moeut.kernels.cvmm` when it first imports this module, so the package has no import cycle.
"""
from __future__ import annotations

import functools
import os
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

CONFIG_ENV = "MOEUT_TRITON_CONFIG"
DETERMINISTIC_ENV = "MOEUT_CVMM_DETERMINISTIC"
TF32_ENV = "MOEUT_CVMM_TF32"
TILING_ENV = "MOEUT_CVMM_TILING"
DW_SPLIT_ENV = "MOEUT_CVMM_DW_SPLIT"

_CONFIG_KEYS = ("BM", "BN", "BK", "num_warps", "num_stages")


# ------------------------------------------------------------------------------------------
# Kernels (plain functions, jitted lazily by `_kernels()` so that TRITON_INTERPRET is honoured
# whenever it is set, even if this module was imported before)
# ------------------------------------------------------------------------------------------

def _cvmm_fwd_kernel(
    A, A_IDX, W, OUT, O_IDX, SCALE, DOTX, DOT_IDX, DOT_OUT, SORTED_E, OFFSETS,
    S, K, N, E, S_BUCKET,
    stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_om, stride_on, stride_xm, stride_xk,
    A_GATHER: tl.constexpr, O_SCATTER: tl.constexpr, OUT_ATOMIC: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_DOT: tl.constexpr, DOT_GATHER: tl.constexpr, PADDED: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    # N-tiles of one row block are adjacent program ids, so the gathered A rows they share are
    # read from L2 after the first program; W[e] is shared by the consecutive row blocks of e.
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(N, BN)
    pid_m = pid // n_tiles_n
    pid_n = pid % n_tiles_n
    offs_bm = tl.arange(0, BM)

    if PADDED:
        # Each expert owns cdiv(count_e, BM) consecutive row blocks ("index padding" without a
        # padded index tensor). Find this block's expert and first row from the cumulative ends.
        ie = tl.arange(0, BLOCK_E)
        ends_E = tl.load(OFFSETS + ie, mask=ie < E, other=0)
        starts_E = tl.load(OFFSETS + ie - 1, mask=(ie > 0) & (ie < E), other=0)
        blocks_E = (ends_E - starts_E + BM - 1) // BM
        cum_E = tl.cumsum(blocks_E, 0)
        e_lo = tl.sum((cum_E <= pid_m).to(tl.int32), 0)
        if e_lo >= E:
            return  # surplus program of the upper-bound grid
        is_e = ie == e_lo
        row0 = tl.sum(tl.where(is_e, starts_E + (pid_m - (cum_E - blocks_E)) * BM, 0), 0)
        row_end = tl.sum(tl.where(is_e, ends_E, 0), 0)
        rows = row0 + offs_bm
        row_mask = rows < row_end
        e_hi = e_lo
        ids = tl.zeros((BM,), dtype=tl.int32)  # unused
    else:
        # The authors' CVMM scheme: a fixed row block, looping over every expert present in it.
        rows = pid_m * BM + offs_bm
        row_mask = rows < S
        ids = tl.load(SORTED_E + rows, mask=row_mask, other=-1)
        e_lo = tl.load(SORTED_E + pid_m * BM)
        e_hi = tl.load(SORTED_E + tl.minimum(pid_m * BM + BM, S) - 1)
    rows = rows.to(tl.int64)  # address arithmetic in int64: S * d can exceed 2^31

    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    if A_GATHER:
        a_rows = tl.load(A_IDX + rows, mask=row_mask, other=0).to(tl.int64)
    else:
        a_rows = rows

    for e in range(e_lo, e_hi + 1):
        if PADDED:
            m_mask = row_mask
        else:
            m_mask = row_mask & (ids == e)
        if tl.max(m_mask.to(tl.int32), 0) > 0:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            w_base = W + tl.cast(e, tl.int64) * stride_we
            for k0 in range(0, K, BK):
                offs_k = k0 + tl.arange(0, BK)
                k_mask = offs_k < K
                a = tl.load(A + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak,
                            mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                w = tl.load(w_base + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                            mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                w = w.to(a.dtype)  # fp32 master -> op dtype, in registers
                if UPCAST:
                    a = a.to(tl.float32)
                    w = w.to(tl.float32)
                acc = tl.dot(a, w, acc, input_precision=DOT_PREC)

            if HAS_DOT:
                # Partial <acc row, X row> over this program's columns; summed over N-tiles later.
                if DOT_GATHER:
                    x_rows = tl.load(DOT_IDX + rows, mask=m_mask, other=0).to(tl.int64)
                else:
                    x_rows = rows
                xv = tl.load(DOTX + x_rows[:, None] * stride_xm + offs_n[None, :] * stride_xk,
                             mask=m_mask[:, None] & n_mask[None, :], other=0.0)
                part = tl.sum(acc * xv.to(tl.float32), 1)
                tl.store(DOT_OUT + pid_n.to(tl.int64) * S + rows, part, mask=m_mask)
            if HAS_SCALE:
                sc = tl.load(SCALE + rows, mask=m_mask, other=0.0).to(tl.float32)
                acc = acc * sc[:, None]
            if O_SCATTER:
                o_rows = tl.load(O_IDX + rows, mask=m_mask, other=0).to(tl.int64)
            else:
                o_rows = rows
            o_ptr = OUT + o_rows[:, None] * stride_om + offs_n[None, :] * stride_on
            o_mask = m_mask[:, None] & n_mask[None, :]
            if OUT_ATOMIC:
                tl.atomic_add(o_ptr, acc, mask=o_mask, sem="relaxed")
            else:
                tl.store(o_ptr, acc.to(OUT.dtype.element_ty), mask=o_mask)


def _cvmm_dw_kernel(
    X, X_IDX, G, G_IDX, SCALE, DW, OFFSETS,
    E, K, N, S_BUCKET,
    stride_xm, stride_xk, stride_gm, stride_gn, stride_ds, stride_de, stride_dk, stride_dn,
    X_GATHER: tl.constexpr, G_GATHER: tl.constexpr, HAS_SCALE: tl.constexpr, ATOMIC: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    # Grid: (E * tiles(D_in) * tiles(D_out), split). Programs of one expert are adjacent, so they
    # share that expert's gathered rows through L2.
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    tiles_k = tl.cdiv(K, BM)
    tiles_n = tl.cdiv(N, BN)
    e = pid // (tiles_k * tiles_n)
    t = pid % (tiles_k * tiles_n)
    pid_k = t // tiles_n
    pid_n = t % tiles_n

    start = tl.load(OFFSETS + e - 1, mask=e > 0, other=0)
    end = tl.load(OFFSETS + e)
    chunk = tl.cdiv(tl.cdiv(end - start, n_split), BK) * BK
    lo = start + pid_s * chunk
    hi = tl.minimum(lo + chunk, end)

    offs_k = pid_k * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    k_mask = offs_k < K
    n_mask = offs_n < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(lo, hi, BK):
        rows = r0 + tl.arange(0, BK)
        r_mask = rows < hi
        rows64 = rows.to(tl.int64)
        if X_GATHER:
            x_rows = tl.load(X_IDX + rows64, mask=r_mask, other=0).to(tl.int64)
        else:
            x_rows = rows64
        if G_GATHER:
            g_rows = tl.load(G_IDX + rows64, mask=r_mask, other=0).to(tl.int64)
        else:
            g_rows = rows64
        # x tile loaded already transposed: [BM (D_in), BK (slots)]
        xt = tl.load(X + x_rows[None, :] * stride_xm + offs_k[:, None] * stride_xk,
                     mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        g = tl.load(G + g_rows[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if HAS_SCALE:
            sc = tl.load(SCALE + rows64, mask=r_mask, other=0.0).to(tl.float32)
            g = (g.to(tl.float32) * sc[:, None]).to(xt.dtype)
        if UPCAST:
            xt = xt.to(tl.float32)
            g = g.to(tl.float32)
        acc = tl.dot(xt, g, acc, input_precision=DOT_PREC)

    d_ptr = DW + e.to(tl.int64) * stride_de + offs_k[:, None] * stride_dk + offs_n[None, :] * stride_dn
    d_mask = k_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        if hi > lo:
            tl.atomic_add(d_ptr, acc, mask=d_mask, sem="relaxed")
    else:
        # Every (split, expert, tile) is owned by exactly one program: a plain store, zeros
        # included for experts without slots.
        tl.store(d_ptr + pid_s.to(tl.int64) * stride_ds, acc.to(DW.dtype.element_ty), mask=d_mask)


# ------------------------------------------------------------------------------------------
# Configs, autotuning and pinning
# ------------------------------------------------------------------------------------------

def _cfg(BM, BN, BK, warps, stages):
    return triton.Config({"BM": BM, "BN": BN, "BK": BK}, num_warps=warps, num_stages=stages)


# Config sets per precision (SPEC 3.2's official sets had 10 and 13 configs, all autotuned).
# Every config of a set is compiled on the first call of each autotune key, so the sets are the
# compile footprint (`moeut.tools.footprint` lists it): keep them small.
#   * 16-bit (and TF32): 2 configs. The shapes that matter have d_expert / d_head = 128 on one side
#     and d_model on the other and are memory-bound: mid-size tiles, deep pipelines; BN 128 covers
#     d_expert / d_head in one tile. (Each extra config costs ~1 s of compile per kernel variant:
#     9 variants for moeut_44m, see docs/benchmarks.md "Triton compile cost".)
#   * true fp32 (`input_precision="ieee"`: CUDA-core FMAs, no tensor cores): ONE small config, no
#     autotuning. Big fp32 tiles unroll into huge FMA code that ptxas compiles slowly and that
#     spills registers (a 128x128x64 fp32 ieee tile takes 4x the compile time of 32x64x32); fp32
#     is for golden checks and debugging, where compile time dominates.
#   * small problems (at most SMALL_S slots: decoding, prefill of short prompts, tiny batches):
#     one small config, no autotuning, so decode-sized calls never benchmark anything.
FWD_CONFIGS_16 = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(64, 128, 64, 4, 4),
]
DW_CONFIGS_16 = [
    _cfg(128, 128, 32, 8, 3),
    _cfg(64, 128, 32, 4, 4),
]
FWD_CONFIGS_TF32 = [  # fp32 tiles are twice as wide: BK 32 keeps 3 stages within sm_80 shared memory
    _cfg(128, 128, 32, 8, 3),
    _cfg(64, 128, 32, 4, 3),
]
DW_CONFIGS_TF32 = FWD_CONFIGS_TF32
FWD_CONFIG_FP32 = _cfg(32, 64, 32, 4, 2)
DW_CONFIG_FP32 = _cfg(64, 64, 32, 4, 2)
FWD_CONFIG_SMALL = _cfg(32, 64, 64, 4, 3)
FWD_CONFIG_SMALL_FP32 = _cfg(32, 64, 32, 4, 2)
DW_CONFIG_SMALL = _cfg(32, 64, 32, 4, 2)
SMALL_S = 2048  # slots: at most this many -> the fixed small config (decode, short prompts)


def _unique(configs):
    seen, out = set(), []
    for c in configs:
        if str(c) not in seen:
            seen.add(str(c))
            out.append(c)
    return out


# The autotuners' full lists; `candidate_configs` prunes them per call (dtype, precision, size).
FWD_CONFIGS = _unique(FWD_CONFIGS_16 + FWD_CONFIGS_TF32 + [FWD_CONFIG_FP32, FWD_CONFIG_SMALL, FWD_CONFIG_SMALL_FP32])
DW_CONFIGS = _unique(DW_CONFIGS_16 + DW_CONFIGS_TF32 + [DW_CONFIG_FP32, DW_CONFIG_SMALL])
# The fixed config used in deterministic mode (no autotune); mid-size, fits every sm_80+ part.
FWD_DETERMINISTIC = _cfg(64, 128, 64, 4, 4)
DW_DETERMINISTIC = _cfg(64, 128, 32, 4, 4)
INTERPRET_DEFAULT = _cfg(16, 16, 16, 1, 1)

# Autotune keys. S_BUCKET is the slot count rounded up to a power of two (0 for small problems),
# so odd sizes share one tuning result; the tensors' dtypes are added by Triton itself.
_FWD_KEY = ["S_BUCKET", "K", "N", "A_GATHER", "O_SCATTER", "OUT_ATOMIC", "HAS_SCALE", "HAS_DOT", "PADDED", "DOT_PREC"]
_DW_KEY = ["S_BUCKET", "K", "N", "X_GATHER", "G_GATHER", "HAS_SCALE", "ATOMIC", "DOT_PREC"]
# Integer arguments Triton must not specialise on (it compiles a variant per "== 1" and
# "divisible by 16" class of every int argument): the slot count and its bucket change with the
# batch and at every decoding step, E never matters to the code.
_FWD_NO_SPECIALIZE = ["S", "E", "S_BUCKET"]
_DW_NO_SPECIALIZE = ["E", "S_BUCKET"]


def candidate_configs(kind: str, dtype: torch.dtype, s_bucket: int, tf32: bool = False):
    """The configs a launch of kernel `kind` ("fwd" or "dw") may compile and autotune over, for
    tiles in `dtype` and a problem of `s_bucket` slots (`_bucket(S)`; 0 = small). One config
    means no autotuning. Used by the autotuners' pruning and by `moeut.tools.footprint`."""
    if kind not in ("fwd", "dw"):
        raise ValueError(f"candidate_configs: kind must be 'fwd' or 'dw', got {kind!r}")
    fp32 = dtype == torch.float32
    if s_bucket == 0:  # small problem: never autotune
        if kind == "fwd":
            return [FWD_CONFIG_SMALL_FP32 if fp32 else FWD_CONFIG_SMALL]
        return [DW_CONFIG_SMALL]
    if fp32 and not tf32:
        return [FWD_CONFIG_FP32 if kind == "fwd" else DW_CONFIG_FP32]
    if fp32:
        return list(FWD_CONFIGS_TF32 if kind == "fwd" else DW_CONFIGS_TF32)
    return list(FWD_CONFIGS_16 if kind == "fwd" else DW_CONFIGS_16)


_TORCH_DTYPE = {"torch.float32": torch.float32, "torch.float16": torch.float16, "torch.bfloat16": torch.bfloat16}


def _prune(kind: str):
    """Triton `early_config_prune` hook: keep `candidate_configs` of this call's problem."""
    tile_arg = "A" if kind == "fwd" else "X"

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        dtype = _TORCH_DTYPE.get(str(args[tile_arg].dtype), torch.float32)
        keep = {str(c) for c in candidate_configs(kind, dtype, int(args["S_BUCKET"]),
                                                  tf32=args.get("DOT_PREC") == "tf32")}
        return [c for c in configs if str(c) in keep]
    return prune


_pinned: Optional[triton.Config] = None
_allow_tf32: Optional[bool] = None


def parse_config(text: str) -> triton.Config:
    """"BM=16,BN=16,BK=16,num_warps=1,num_stages=1" -> triton.Config (missing keys: 4 warps, 1 stage)."""
    vals: Dict[str, int] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise ValueError(f"{CONFIG_ENV}: expected KEY=VALUE, got {item!r} in {text!r}")
        key, val = (s.strip() for s in item.split("=", 1))
        if key not in _CONFIG_KEYS:
            raise ValueError(f"{CONFIG_ENV}: unknown key {key!r} (known: {', '.join(_CONFIG_KEYS)})")
        try:
            vals[key] = int(val)
        except ValueError:
            raise ValueError(f"{CONFIG_ENV}: {key} must be an integer, got {val!r}") from None
    for key in ("BM", "BN", "BK"):
        if key not in vals:
            raise ValueError(f"{CONFIG_ENV}: missing {key} in {text!r}")
        v = vals[key]
        if v < 16 or v & (v - 1):
            raise ValueError(f"{CONFIG_ENV}: {key} must be a power of two >= 16 (tl.dot), got {v}")
    return _cfg(vals["BM"], vals["BN"], vals["BK"], vals.get("num_warps", 4), vals.get("num_stages", 1))


def pin_config(config=None) -> None:
    """Pin one config for every kernel (a triton.Config, a dict or "BM=..,BN=..,BK=.." string);
    None un-pins (back to the environment variable, else autotuning)."""
    global _pinned
    if config is None or isinstance(config, triton.Config):
        _pinned = config
    elif isinstance(config, str):
        _pinned = parse_config(config)
    elif isinstance(config, dict):
        _pinned = parse_config(",".join(f"{k}={v}" for k, v in config.items()))
    else:
        raise TypeError(f"pin_config: expected a triton.Config, dict or str, got {type(config).__name__}")


def set_allow_tf32(flag: Optional[bool]) -> None:
    """Allow TF32 for fp32 CVMM products (default: no; None: back to MOEUT_CVMM_TF32)."""
    global _allow_tf32
    _allow_tf32 = flag


def interpreting() -> bool:
    """True when the kernels run under the Triton interpreter (TRITON_INTERPRET set, not "0"):
    a fixed config, no autotuning, bf16 upcast before `tl.dot` (SPEC 3.8). False while recording
    a footprint, so the recording sees what the GPU backend would launch."""
    if _recorder is not None:  # recording the GPU footprint: launch as the real backend would
        return False
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def deterministic() -> bool:
    """Deterministic mode (see the module docstring): MOEUT_CVMM_DETERMINISTIC set (not "0") or
    `torch.use_deterministic_algorithms(True)`; no atomics and no autotuning."""
    return os.environ.get(DETERMINISTIC_ENV, "0") not in ("", "0") or torch.are_deterministic_algorithms_enabled()


def _allow_tf32_now() -> bool:
    if _recorder is not None:
        return _recorder.tf32
    if _allow_tf32 is not None:
        return _allow_tf32
    return os.environ.get(TF32_ENV, "0") not in ("", "0")


def _tiling_padded() -> bool:
    mode = os.environ.get(TILING_ENV, "padded")
    if mode not in ("padded", "loop"):
        raise ValueError(f"{TILING_ENV}: expected 'padded' or 'loop', got {mode!r}")
    return mode == "padded"


def _pinned_config() -> Optional[triton.Config]:
    if _pinned is not None:
        return _pinned
    text = os.environ.get(CONFIG_ENV)
    if text:
        return parse_config(text)
    return INTERPRET_DEFAULT if interpreting() else None


AUTOTUNE_CACHE_ENV = "MOEUT_TRITON_AUTOTUNE_CACHE"


def _autotune_disk_cache() -> dict:
    """`cache_results=True` (Triton >= 3.2; 3.6 and 3.9 have it): autotune winners are stored as
    JSON in Triton's cache directory (TRITON_CACHE_DIR, default ~/.triton/cache), keyed by the
    kernel source, Triton version, GPU target, tuning key and configs, so a new process does not
    benchmark again. MOEUT_TRITON_AUTOTUNE_CACHE=0 switches it off."""
    import inspect
    if os.environ.get(AUTOTUNE_CACHE_ENV, "1") in ("0", ""):
        return {}
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        return {"cache_results": True}
    return {}


def _short_bench():
    """Benchmark each config for 25 ms (after 5 ms warm-up) instead of Triton's 100 + 25 ms: our
    kernels run for tens to hundreds of microseconds, so that is still hundreds of runs."""
    import inspect
    if "do_bench" not in inspect.signature(triton.autotune).parameters:
        return {}

    def do_bench(fn, quantiles=None, **kw):
        return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)
    return {"do_bench": do_bench}


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool):
    """(fwd, fwd_autotuned, dw, dw_autotuned), jitted for the interpreter or the GPU."""
    del interpret  # only the cache key: triton.jit reads TRITON_INTERPRET itself
    fwd = triton.jit(_cvmm_fwd_kernel, do_not_specialize=_FWD_NO_SPECIALIZE)
    dw = triton.jit(_cvmm_dw_kernel, do_not_specialize=_DW_NO_SPECIALIZE)
    disk = {**_autotune_disk_cache(), **_short_bench()}
    fwd_tuned = triton.autotune(FWD_CONFIGS, key=_FWD_KEY, reset_to_zero=["OUT", "DOT_OUT"],
                                prune_configs_by={"early_config_prune": _prune("fwd")}, **disk)(fwd)
    dw_tuned = triton.autotune(DW_CONFIGS, key=_DW_KEY, reset_to_zero=["DW"],
                               prune_configs_by={"early_config_prune": _prune("dw")}, **disk)(dw)
    return fwd, fwd_tuned, dw, dw_tuned


# ------------------------------------------------------------------------------------------
# Recording (the compile footprint without a GPU, see moeut.tools.footprint)
# ------------------------------------------------------------------------------------------

class Recorder:
    """While active (`with recording(...) as rec`), launches are recorded in `rec.launches`
    instead of run: one dict per launch with the kernel, its constexpr arguments, the dtypes of
    its tensor arguments, its integer arguments, the autotune key and the configs it would compile.
    `s_scale` multiplies every slot count (trace a small batch, report the real one); `sms` is
    the target GPU's multiprocessor count (the weight-gradient split depends on it)."""

    def __init__(self, s_scale: float = 1.0, sms: int = 132, tf32: bool = False):
        self.s_scale, self.sms, self.tf32 = s_scale, sms, tf32
        self.launches = []


_recorder: Optional[Recorder] = None


class recording:
    """Context manager: `with recording(s_scale=..., sms=..., tf32=...) as rec:` records every
    kernel launch into `rec.launches` (a `Recorder`) instead of running it; nests (restores the
    previous recorder on exit). Used by `moeut.tools.footprint` to count compiles without a GPU."""

    def __init__(self, **kw):
        self.rec = Recorder(**kw)

    def __enter__(self) -> Recorder:
        global _recorder
        self._prev, _recorder = _recorder, self.rec
        return self.rec

    def __exit__(self, *exc):
        global _recorder
        _recorder = self._prev
        return False


def _record(kind, args, kwargs):
    import inspect
    fn = _cvmm_fwd_kernel if kind == "fwd" else _cvmm_dw_kernel
    names = list(inspect.signature(fn).parameters)
    named = dict(zip(names, args))
    tensors = {n: str(v.dtype).replace("torch.", "") for n, v in named.items() if isinstance(v, torch.Tensor)}
    ints = {n: int(v) for n, v in named.items() if not isinstance(v, torch.Tensor)}
    keys = _FWD_KEY if kind == "fwd" else _DW_KEY
    key = tuple({**ints, **kwargs}[k] for k in keys) + tuple(tensors[n] for n in names if n in tensors)
    cfg = _pinned_config()
    if cfg is None and deterministic():
        cfg = FWD_DETERMINISTIC if kind == "fwd" else DW_DETERMINISTIC
    tile = named["A" if kind == "fwd" else "X"]
    configs = [cfg] if cfg is not None else candidate_configs(kind, tile.dtype, ints["S_BUCKET"],
                                                              tf32=kwargs["DOT_PREC"] == "tf32")
    _recorder.launches.append(dict(kernel=kind, constexprs=dict(kwargs), tensors=tensors, ints=ints, key=key,
                                   configs=configs, no_specialize=_FWD_NO_SPECIALIZE if kind == "fwd"
                                   else _DW_NO_SPECIALIZE))


def _launch(kind: str, grid, args, kwargs):
    if _recorder is not None:
        return _record(kind, args, kwargs)
    fwd, fwd_tuned, dw, dw_tuned = _kernels(interpreting())
    raw, tuned, det = (fwd, fwd_tuned, FWD_DETERMINISTIC) if kind == "fwd" else (dw, dw_tuned, DW_DETERMINISTIC)
    cfg = _pinned_config()
    if cfg is None and deterministic():
        cfg = det
    if cfg is None:
        tuned[grid](*args, **kwargs)
    else:
        raw[grid](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _dot_prec(dtype: torch.dtype) -> str:
    # "ieee": exact fp32 products. For 16-bit inputs the precision flag has no effect.
    return "tf32" if (dtype != torch.float32 or _allow_tf32_now()) else "ieee"


def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"cvmm_triton: {name} must be fp32/fp16/bf16, got {t.dtype}")


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else _nullctx()


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _slots(S: int) -> int:
    """S, or under a footprint recording the slot count of the batch being reported."""
    return S if _recorder is None else int(round(S * _recorder.s_scale))


def _bucket(S: int) -> int:
    """Autotune bucket of a problem with S slots: 0 for small problems (<= SMALL_S; one fixed
    config, never tuned), else S rounded up to a power of two."""
    S = _slots(S)
    if S <= SMALL_S:
        return 0
    return 1 << (S - 1).bit_length()


# ------------------------------------------------------------------------------------------
# Launchers (sorted-space primitives; the layouts live in moeut.kernels.ops)
# ------------------------------------------------------------------------------------------

def fwd(a: torch.Tensor, w: torch.Tensor, sorted_experts: torch.Tensor, offsets: torch.Tensor, *,
        a_idx: Optional[torch.Tensor] = None, o_idx: Optional[torch.Tensor] = None,
        out_rows: Optional[int] = None, atomic: bool = False, scale: Optional[torch.Tensor] = None,
        dot_x: Optional[torch.Tensor] = None, dot_idx: Optional[torch.Tensor] = None,
        transpose_w: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One "scatter2scatter" product over the S expert-sorted slots (see the module docstring).

    a: [M_a, K] in the op dtype; w: [E, K, N] (or [E, N, K] with transpose_w, read as W[e]ᵀ
    through strides) in any float dtype (cast in-kernel); a_idx/o_idx/dot_idx: [S] int rows;
    scale: [S] per sorted slot. Without o_idx, out row m = sorted slot m. With `atomic`, out is
    [out_rows, N] and slots add into out[o_idx[m]] in fp32; otherwise o_idx must be a permutation
    and out is [S, N]. Returns (out in a.dtype, dot [S] fp32 or None).
    """
    _check_dtype("a", a)
    _check_dtype("w", w)
    S = sorted_experts.numel()
    E = w.shape[0]
    if transpose_w:
        K, N = w.shape[2], w.shape[1]
        s_we, s_wk, s_wn = w.stride(0), w.stride(2), w.stride(1)
    else:
        K, N = w.shape[1], w.shape[2]
        s_we, s_wk, s_wn = w.stride(0), w.stride(1), w.stride(2)
    if a.shape[1] != K:
        raise ValueError(f"cvmm_triton.fwd: a has {a.shape[1]} columns, weights expect D_in={K}")
    rows = out_rows if (atomic and out_rows is not None) else S
    if atomic:
        out = torch.zeros(rows, N, device=a.device, dtype=torch.float32)
    else:
        out = torch.empty(rows, N, device=a.device, dtype=a.dtype)
    has_dot = dot_x is not None
    padded = _tiling_padded()
    min_bn = 16 if interpreting() else min(c.kwargs["BN"] for c in FWD_CONFIGS)
    pinned = _pinned_config()
    if pinned is not None:
        min_bn = pinned.kwargs["BN"]
    # One partial dot per N-tile; sized for the smallest BN, unused tiles stay zero.
    dot_out = torch.zeros(triton.cdiv(N, min_bn) if has_dot else 1, S if has_dot else 1,
                          device=a.device, dtype=torch.float32)
    if S == 0:
        return out.to(a.dtype), (dot_out.sum(0) if has_dot else None)
    dummy = sorted_experts
    a = a if a.stride(1) == 1 or a.shape[1] == 1 else a.contiguous()

    def grid(meta):
        n_m = min(triton.cdiv(S, meta["BM"]) + E, S) if padded else triton.cdiv(S, meta["BM"])
        return (n_m * triton.cdiv(N, meta["BN"]),)

    xs = dot_x if has_dot else a
    args = (a, a_idx if a_idx is not None else dummy, w, out, o_idx if o_idx is not None else dummy,
            scale if scale is not None else dummy, xs, dot_idx if dot_idx is not None else dummy, dot_out,
            sorted_experts, offsets, S, K, N, E, _bucket(S),
            a.stride(0), a.stride(1), s_we, s_wk, s_wn, out.stride(0), out.stride(1), xs.stride(0), xs.stride(1))
    kwargs = dict(A_GATHER=a_idx is not None, O_SCATTER=o_idx is not None, OUT_ATOMIC=atomic,
                  HAS_SCALE=scale is not None, HAS_DOT=has_dot, DOT_GATHER=dot_idx is not None,
                  PADDED=padded, BLOCK_E=triton.next_power_of_2(E), DOT_PREC=_dot_prec(a.dtype),
                  UPCAST=interpreting() and a.dtype == torch.bfloat16)
    with _device_ctx(a):
        _launch("fwd", grid, args, kwargs)
    if atomic:
        out = out.to(a.dtype)
    return out, (dot_out.sum(0) if has_dot else None)


def _dw_split(S: int, E: int, K: int, N: int, device: torch.device, det: bool) -> int:
    env = os.environ.get(DW_SPLIT_ENV)
    if env:
        try:
            split = int(env)
        except ValueError:
            raise ValueError(f"{DW_SPLIT_ENV}: expected an integer, got {env!r}") from None
        if split < 1:
            raise ValueError(f"{DW_SPLIT_ENV}: must be >= 1, got {split}")
        return split
    if _recorder is not None:
        sms, S = _recorder.sms, _slots(S)
    elif device.type != "cuda":
        return 1
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    # Split the slot axis only when (expert, tile) programs alone cannot fill the GPU (e.g. the
    # SwitchHead banks: E = H * E_att is small), keeping >= 256 slots per program.
    programs = E * triton.cdiv(K, 128) * triton.cdiv(N, 128)
    split = max(1, min(triton.cdiv(2 * sms, programs), (S // max(E, 1)) // 256))
    if det:  # partial sums need split * |W| fp32 scratch: cap it at 256 MiB
        split = max(1, min(split, (256 << 20) // max(1, 4 * E * K * N)))
    return split


def dw(x: torch.Tensor, g: torch.Tensor, offsets: torch.Tensor, n_experts: int, *,
       x_idx: Optional[torch.Tensor] = None, g_idx: Optional[torch.Tensor] = None,
       scale: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.float32,
       det: Optional[bool] = None, split: Optional[int] = None) -> torch.Tensor:
    """dW[e] = Σ_{sorted slots m of e} x[x_idx[m]]ᵀ (scale[m] g[g_idx[m]]) -> [E, D_in, D_out].

    x: [M_x, D_in] and g: [M_g, D_out] in the op dtype (fp32/fp16/bf16, else TypeError); x_idx /
    g_idx: [S] int row of each sorted slot (None = row m itself); scale: [S] per sorted slot;
    offsets: [E] int32 cumulative slot ends per expert. Accumulated in fp32 and returned in
    `out_dtype`; experts without slots get zeros. `det` (default `deterministic()`) avoids
    atomics; `split` (default: by GPU size, or MOEUT_CVMM_DW_SPLIT) splits each expert's slots."""
    _check_dtype("x", x)
    _check_dtype("g", g)
    S = (x_idx.numel() if x_idx is not None else x.shape[0])
    E, K, N = n_experts, x.shape[1], g.shape[1]
    det = deterministic() if det is None else det
    split = split or _dw_split(S, E, K, N, x.device, det)
    atomic = split > 1 and not det
    if atomic:
        buf = torch.zeros(1, E, K, N, device=x.device, dtype=torch.float32)
        s_ds = 0
    else:
        buf = torch.empty(split, E, K, N, device=x.device, dtype=torch.float32 if split > 1 else out_dtype)
        s_ds = buf.stride(0)
    if E == 0:
        return buf.sum(0).to(out_dtype)
    dummy = offsets

    def grid(meta):
        return (E * triton.cdiv(K, meta["BM"]) * triton.cdiv(N, meta["BN"]), split)

    args = (x, x_idx if x_idx is not None else dummy, g, g_idx if g_idx is not None else dummy,
            scale if scale is not None else dummy, buf, offsets, E, K, N, _bucket(S),
            x.stride(0), x.stride(1), g.stride(0), g.stride(1), s_ds, buf.stride(1), buf.stride(2), buf.stride(3))
    kwargs = dict(X_GATHER=x_idx is not None, G_GATHER=g_idx is not None, HAS_SCALE=scale is not None,
                  ATOMIC=atomic, DOT_PREC=_dot_prec(x.dtype),
                  UPCAST=interpreting() and x.dtype == torch.bfloat16)
    with _device_ctx(x):
        _launch("dw", grid, args, kwargs)
    if split == 1 or atomic:
        return buf[0].to(out_dtype)
    return buf.sum(0).to(out_dtype)  # fixed-order reduction of the split partials
