"""The Triton compile footprint of a run: every kernel specialisation x config it will compile.

    python -m moeut.tools.footprint preset=moeut_44m dtype=bf16
    python -m moeut.tools.footprint preset=[golden_tiny,golden_small_g3] dtype=fp32 batch=2 seq_len=64
    python -m moeut.tools.footprint preset=moeut_44m dtype=bf16 aot=90     # + compile it all for sm_90

A typed tool (`FootprintOptions`, moeut.cli.typed_tool; `--help` lists the options): preset (a
registry preset, golden_tiny / golden_small_g3 = the shapes of the golden files, or a list
[a,b]), dtype, the batch (batch x seq_len), the steps to trace (train, eval, decode), prefill,
sms of the target GPU, aot=<sm> to compile everything ahead of time (no GPU needed) and print the
compile time, json=<file> to write the footprint.

How it works (`trace`): the model runs once on CPU at a small batch with the Triton backend,
and every `moeut::cvmm*` custom-op call is replayed through the Triton launchers with launching
replaced by recording (`cvmm_triton.recording`), with slot counts scaled to the requested batch.
So the list is what the launchers would really do -- the same layout dispatch, the same
constexprs, dtypes, autotune keys and `candidate_configs` -- not a separate description of it.
Each distinct (kernel, constexprs, tensor dtypes, integer specialisation) is compiled once per
config of its candidate set; keys with more than one candidate are autotuned (benchmarked) once
per process, or once ever with the on-disk autotune cache.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..cli import bad_input_exits, check_out_file, option, typed_tool

# The shapes of the golden files (shared/golden/README.md; official constructor arguments).
GOLDEN_CONFIGS = {
    "golden_tiny": dict(d_model=64, n_layers=4, group_size=2, n_heads=2, att_n_experts=4, d_head=16,
                        ff_n_experts=16, ff_expert_size=32, ff_k=4, att_k=2, vocab_size=512),
    "golden_small_g3": dict(d_model=96, n_layers=6, group_size=3, n_heads=3, att_n_experts=5, d_head=22,
                            ff_n_experts=24, ff_expert_size=32, ff_k=5, att_k=2, vocab_size=1000),
}
DTYPES = ("bf16", "fp16", "fp32", "tf32")
STEPS = ("train", "eval", "decode")


def model_config(preset: str, backend: str = "triton"):
    """A model config by preset name (moeut.registry), or one of GOLDEN_CONFIGS, with CVMM backend
    `backend` (a Triton backend: "triton" or a candidate such as "triton_pad")."""
    if preset in GOLDEN_CONFIGS:
        from moeut.official import config_from_official
        return config_from_official(dict(GOLDEN_CONFIGS[preset], dropout=0.0, entropy_reg=0.01,
                                         att_entropy_reg=0.001), cvmm_backend=backend)
    from moeut.registry import get_preset
    return get_preset(preset, cvmm_backend=backend)


class _Replay(torch.utils._python_dispatch.TorchDispatchMode):
    """Sees every moeut::cvmm* call; replays it with the Triton `impl` ("triton", or the candidate
    "triton_buffer") under recording, then runs it."""

    def __init__(self, recorder_kwargs, impl: str = "triton"):
        super().__init__()
        self.recorder_kwargs = recorder_kwargs
        self.impl = impl
        self.launches: List[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "moeut":
            from ..kernels import cvmm_triton as kt
            with kt.recording(**self.recorder_kwargs) as rec:
                func(*args[:-1], self.impl, **kwargs)  # impl is each op's last argument
            self.launches += rec.launches
            # The values come from the PyTorch implementation (CPU; never the interpreter).
            return func(*args[:-1], "grouped_mm", **kwargs)
        return func(*args, **kwargs)


def trace(cfg, dtype: str = "bf16", batch: int = 64, seq_len: int = 1024, steps: Sequence[str] = ("train",),
          prefill: int = 100, sms: int = 132, trace_tokens: int = 64) -> Dict[str, List[dict]]:
    """Record the Triton launches of each step in `steps` for a model config.

    The model runs on CPU with `trace_tokens` tokens (1 sequence); slot counts are scaled to
    batch x seq_len (train/eval) or to `prefill` and 1-token steps of `batch` sequences (decode).
    Returns {step: [launch dicts of cvmm_triton.Recorder]}. Raises ValueError for an unknown
    dtype or step."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
    bad = [s for s in steps if s not in STEPS]
    if bad:
        raise ValueError(f"steps: unknown {bad}; known: {STEPS}")
    from moeut.registry import build_model
    from moeut.model import KVCache
    torch.manual_seed(0)
    model = build_model(cfg)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    V = cfg.vocab_size
    out: Dict[str, List[dict]] = {}
    # The no-atomics candidates launch other variants; the "*_pad" ones pad before the op is called.
    replay_impl = "triton_buffer" if cfg.cvmm_backend in ("triton_buffer", "triton_pad_buffer") else "triton"
    saved = {k: os.environ.pop(k, None) for k in ("MOEUT_CVMM_BACKEND",)}
    try:
        for step in steps:
            t = min(trace_tokens, seq_len) if step != "decode" else min(trace_tokens, prefill)
            scale = batch * (seq_len if step != "decode" else prefill) / t
            mode = _Replay(dict(s_scale=scale, sms=sms, tf32=dtype == "tf32"), impl=replay_impl)
            ids = torch.randint(0, V, (1, t + 1))
            with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
                if step == "train":
                    model.train()
                    with mode:
                        res = model(ids[:, :-1])
                        ce = F.cross_entropy(res.logits.float().flatten(0, 1), ids[:, 1:].flatten())
                        (ce + res.reg_loss).backward()
                    model.zero_grad(set_to_none=True)
                elif step == "eval":
                    model.eval()
                    with torch.no_grad(), mode:
                        model(ids[:, :-1])
                else:
                    model.eval()
                    cache = KVCache()
                    with torch.no_grad(), mode:
                        model(ids[:, :t], cache=cache)
                        prefill_launches = len(mode.launches)
                        mode.recorder_kwargs["s_scale"] = batch  # one token per sequence per step
                        model(ids[:, t:t + 1], cache=cache)
                    for launch in mode.launches[prefill_launches:]:
                        launch["phase"] = "decode step"
            out[step] = mode.launches
    finally:
        for k, v in saved.items():
            if v is not None:
                os.environ[k] = v
    return out


# ------------------------------------------------------------------------------------------
# Specialisations, compiles and autotune keys
# ------------------------------------------------------------------------------------------

def _int_class(v: int) -> str:
    return "1" if v == 1 else ("D" if v % 16 == 0 else "")


@dataclass
class Spec:
    """One compiled kernel variant (Triton's JIT cache key, less the pointer alignment: all our
    tensors are 16-byte aligned) and the configs it is compiled for."""

    kernel: str
    constexprs: Tuple[Tuple[str, object], ...]
    tensors: Tuple[Tuple[str, str], ...]
    int_classes: Tuple[Tuple[str, str], ...]
    ints: Dict[str, int] = field(default_factory=dict)  # one example of the integer arguments
    configs: List = field(default_factory=list)
    keys: set = field(default_factory=set)  # autotune keys that launch this variant
    steps: set = field(default_factory=set)
    shapes: set = field(default_factory=set)  # (K, N) = (D_in, D_out) of the products using it

    def label(self) -> str:
        """One-line name of the variant: kernel, tile dtype, K (D_in), N (D_out), dot precision, flags."""
        c = dict(self.constexprs)
        flags = [k for k, v in c.items() if v is True]
        dt = dict(self.tensors)["A" if self.kernel == "fwd" else "X"]
        ints = dict(self.ints)
        return (f"{self.kernel} {dt} K={ints['K']} N={ints['N']} {c['DOT_PREC']} {'+'.join(flags) or '-'}")


def specialisations(launches: Sequence[dict], step_names: Optional[Sequence[str]] = None) -> List[Spec]:
    """Group recorded launches into compiled variants, each with the union of its configs."""
    specs: Dict[tuple, Spec] = {}
    for i, la in enumerate(launches):
        ints = la["ints"]
        classes = tuple((k, _int_class(v)) for k, v in ints.items() if k not in la["no_specialize"])
        key = (la["kernel"], tuple(sorted(la["constexprs"].items())), tuple(sorted(la["tensors"].items())), classes)
        sp = specs.get(key)
        if sp is None:
            sp = specs[key] = Spec(la["kernel"], key[1], key[2], classes, dict(ints))
        for c in la["configs"]:
            if str(c) not in {str(x) for x in sp.configs}:
                sp.configs.append(c)
        sp.keys.add((la["kernel"],) + tuple(la["key"]))
        sp.shapes.add((ints["K"], ints["N"]))
        if "step" in la:
            sp.steps.add(la["step"])
    return list(specs.values())


def summarise(traced: Dict[str, List[dict]]) -> dict:
    """{'specs': [Spec], 'compiles': n, 'autotuned_keys': n, 'launches': n} over all steps."""
    launches = []
    for step, ls in traced.items():
        for la in ls:
            launches.append(dict(la, step=step))
    specs = specialisations(launches)
    tuned = {tuple([la["kernel"], *la["key"]]) for la in launches if len(la["configs"]) > 1}
    return dict(specs=specs, compiles=sum(len(s.configs) for s in specs), autotuned_keys=len(tuned),
                launches=len(launches))


def format_table(summary: dict, title: str) -> str:
    """A Markdown section (`## title`, totals, one table row per variant with its configs) of a
    `summarise` result."""
    lines = [f"## {title}", "",
             f"{len(summary['specs'])} kernel variants, {summary['compiles']} compiles (variant x config), "
             f"{summary['autotuned_keys']} autotuned keys, {summary['launches']} launches per traced step set", "",
             "| kernel | tiles | (D_in, D_out) of its products | dot precision | flags | steps | "
             "configs (BM,BN,BK,warps,stages) |",
             "|---|---|---|---|---|---|---|"]
    for s in sorted(summary["specs"], key=lambda s: (s.kernel, s.label())):
        c = dict(s.constexprs)
        flags = "+".join(k for k, v in c.items() if v is True) or "-"
        cfgs = " ".join(f"{x.kwargs['BM']},{x.kwargs['BN']},{x.kwargs['BK']},{x.num_warps},{x.num_stages}"
                        for x in s.configs)
        dt = dict(s.tensors)["A" if s.kernel == "fwd" else "X"]
        shapes = " ".join(f"({k},{n})" for k, n in sorted(s.shapes))
        lines.append(f"| {s.kernel} | {dt} | {shapes} | {c['DOT_PREC']} | {flags} | "
                     f"{','.join(sorted(s.steps))} | {cfgs} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Ahead-of-time compilation (real backend + ptxas, no GPU)
# ------------------------------------------------------------------------------------------

_TT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int32": "i32", "int64": "i64"}


def aot_compile(spec: Spec, config, arch: int = 90):
    """Compile one variant x config for sm_`arch` like the JIT would (ints equal to 1 as
    constants, 16-divisible ints and all pointers with divisibility hints). Needs a process in
    which Triton was imported without TRITON_INTERPRET. Returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
    from ..kernels import cvmm_triton as kt
    fn = JITFunction(kt._cvmm_fwd_kernel if spec.kernel == "fwd" else kt._cvmm_dw_kernel,
                     do_not_specialize=kt._FWD_NO_SPECIALIZE if spec.kernel == "fwd" else kt._DW_NO_SPECIALIZE)
    consts = dict(spec.constexprs)
    consts.update(config.kwargs)
    classes = dict(spec.int_classes)
    tensors = dict(spec.tensors)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in tensors:
            sig[name] = "*" + _TT[tensors[name]]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif classes.get(name) == "1":
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i64" if abs(spec.ints[name]) >= 2 ** 31 else "i32"
            if classes.get(name) == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (ptxas runs as a subprocess): a
    compile-cost measure that other jobs on a shared machine do not inflate, unlike wall time."""
    import resource
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _cfg_str(c) -> str:
    k = c.kwargs
    return f"BM{k['BM']} BN{k['BN']} BK{k['BK']} w{c.num_warps} s{c.num_stages}"


def aot_time(specs: Sequence[Spec], arch: int = 90, configs_of=None, log=print) -> Tuple[float, List[dict]]:
    """Compile every (variant, config) cold (a fresh TRITON_CACHE_DIR) and time it in CPU seconds
    (this process + ptxas; single-threaded, so on an idle machine about the wall time). `configs_of`
    overrides a variant's config list (e.g. to measure an older config set). Returns (total s, rows)."""
    import tempfile
    from ..kernels import cvmm_triton as kt
    if kt.interpreting():
        raise RuntimeError("aot: TRITON_INTERPRET is set in this process; run without it")
    rows, total = [], 0.0
    with tempfile.TemporaryDirectory() as cache:
        old = os.environ.get("TRITON_CACHE_DIR")
        os.environ["TRITON_CACHE_DIR"] = cache
        try:
            for s in specs:
                for c in (configs_of(s) if configs_of else s.configs):
                    t0, c0 = time.perf_counter(), _cpu_seconds()
                    k = aot_compile(s, c, arch)
                    dt, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
                    total += cpu
                    rows.append(dict(variant=s.label(), config=_cfg_str(c), seconds=round(cpu, 2),
                                     wall_seconds=round(dt, 2), shared_bytes=k.metadata.shared))
                    log(f"  {cpu:6.2f} s CPU ({dt:6.2f} s wall)  {s.label()}  {_cfg_str(c)}")
        finally:
            if old is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = old
    return total, rows


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------

@dataclass
class FootprintOptions:
    """The options of `python -m moeut.tools.footprint` (checked by moeut.cli.typed_tool, then `run`)."""

    preset: Any = option("moeut_44m", help="model preset, or a list preset=[a,b] (registry presets, "
                                           "golden_tiny, golden_small_g3: the golden files' shapes)")
    dtype: str = option("bf16", choices=DTYPES,
                        help="bf16 | fp16 (autocast), fp32 (true fp32), tf32 (fp32 with TF32 allowed)")
    batch: int = option(64, lo=1, help="sequences per training batch")
    seq_len: int = option(1024, lo=1, help="tokens per sequence")
    steps: List[str] = option(default_factory=lambda: ["train", "decode"], choices=STEPS,
                              help="work to trace: train (forward + backward), eval (forward), decode "
                                   "(prefill `prefill` tokens, then one-token steps), e.g. steps=[train,eval,decode]")
    prefill: int = option(100, lo=1, help="prompt length (tokens) of the decode trace")
    sms: int = option(132, lo=1, help="streaming multiprocessors of the target GPU (H100/H200: 132)")
    aot: Optional[int] = option(None, lo=1, help="compile everything ahead of time for this sm (e.g. aot=90), "
                                                 "timed; null = off")
    json: Optional[str] = option(None, help="write the footprint (and AOT times) to this file; null = off")


def preset_names(value: Any) -> List[str]:
    """The `preset` option as a list of names, each checked (`model_config`). Raises ValueError
    naming `preset` for an empty list, a non-string or an unknown preset."""
    names = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"preset: expected a preset name or a non-empty list of names, got {value!r}")
    for p in names:
        try:
            model_config(p)
        except (KeyError, ValueError) as e:
            raise ValueError(f"preset: {p!r}: {e}") from None
    return names


def check(a: FootprintOptions) -> List[str]:
    """The cross-option checks the schema cannot express; returns the preset names. Raises
    ValueError naming `preset` (see preset_names), `steps` (an empty list) or `json` (a directory,
    or under a file)."""
    if not a.steps:
        raise ValueError(f"steps: expected a non-empty list of {list(STEPS)}, got []")
    check_out_file(a.json, "json")
    return preset_names(a.preset)


def run(a: FootprintOptions) -> int:
    """Trace, print the footprint table per preset (and all together), optionally compile it
    ahead of time and write `json`; returns 0. Raises the ValueErrors of `check` and
    RuntimeError from aot_time under TRITON_INTERPRET."""
    presets = check(a)
    steps = list(a.steps)
    report: Dict[str, object] = {"args": dict(dataclasses.asdict(a), preset=presets)}
    traced_all: Dict[str, List[dict]] = {}
    for preset in presets:
        traced = trace(model_config(preset), a.dtype, a.batch, a.seq_len, steps, a.prefill, a.sms)
        for step, ls in traced.items():
            traced_all.setdefault(f"{preset}:{step}", []).extend(ls)
        summ = summarise(traced)
        print(format_table(summ, f"{preset}, {a.dtype}, batch {a.batch} x {a.seq_len}, steps {','.join(steps)}"))
        print()
        report[preset] = dict(variants=len(summ["specs"]), compiles=summ["compiles"],
                              autotuned_keys=summ["autotuned_keys"])
    summ = summarise(traced_all)
    if len(presets) > 1:
        print(f"all presets together: {len(summ['specs'])} kernel variants, {summ['compiles']} compiles, "
              f"{summ['autotuned_keys']} autotuned keys")
    report["total"] = dict(variants=len(summ["specs"]), compiles=summ["compiles"], autotuned_keys=summ["autotuned_keys"])
    if a.aot is not None:
        print(f"AOT compile for sm_{a.aot} (cold cache):")
        total, rows = aot_time(summ["specs"], a.aot)
        print(f"total compile time: {total:.1f} s for {len(rows)} compiles")
        report["aot"] = dict(arch=a.aot, seconds=round(total, 1), rows=rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


APP = "moeut.tools.footprint"


def _work(a: FootprintOptions) -> int:
    with bad_input_exits(APP):  # bad input: one line, exit 1 (a later crash keeps its traceback)
        check(a)
    return run(a)


main = typed_tool(
    APP, FootprintOptions,
    summary="List every Triton CVMM kernel variant x config a run will compile (and autotune): the model "
            "runs once on CPU and each custom-op call is replayed through the Triton launchers with "
            "launching replaced by recording. With aot=<sm>, compile them all for that GPU architecture "
            "(no GPU needed) and print the compile time.",
    usage="python -m moeut.tools.footprint [key=value ...]",
    notes="See docs/kernels.md.")(_work)


if __name__ == "__main__":
    main()
