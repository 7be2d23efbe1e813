"""Whole Triton compile cost of a run, measured ahead of time for a GPU target without a GPU.

    python benchmarks/compile_cost.py                         # sm_90, before vs after pruning
    python benchmarks/compile_cost.py --record docs/benchmarks.md
    python benchmarks/compile_cost.py --only moeut_44m --no-before --candidates triton_pad,triton_buffer,triton_pad_buffer

Two workloads (issue 13): one `moeut_44m` bf16 training step (batch 64 x 1024) plus KV-cache
decoding, and the fp32 golden check of `tiny` + `small_g3` (batch 2 x 64: eval forward, training
forward + backward, decoding). Their kernel variants come from `moeut.tools.footprint.trace`;
each variant is compiled for every config it may autotune over with Triton's real backend and
ptxas into a fresh cache, one after the other (Triton's autotuner compiles sequentially too).

"before" = the same variants with the config sets used before pruning (6 forward and 6
weight-gradient configs for every dtype and size, all autotuned). It is a lower bound on the old
cost: the old kernels were also specialised on the slot count (S % 16, S == 1), which compiled
extra variants at decoding and odd batch sizes. Must run without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_cost.py: unset TRITON_INTERPRET (the AOT compile needs Triton's real backend)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402

from moeut.tools import footprint as fp  # noqa: E402


def _cfg(BM, BN, BK, warps, stages):
    return triton.Config({"BM": BM, "BN": BN, "BK": BK}, num_warps=warps, num_stages=stages)


# The config sets before pruning (git history of moeut/kernels/cvmm_triton.py), autotuned for all.
LEGACY_FWD = [_cfg(128, 128, 64, 8, 3), _cfg(64, 128, 64, 4, 4), _cfg(128, 64, 64, 4, 4), _cfg(64, 64, 64, 4, 4),
              _cfg(128, 128, 32, 8, 4), _cfg(32, 64, 64, 4, 3)]
LEGACY_DW = [_cfg(128, 128, 32, 8, 3), _cfg(64, 128, 32, 4, 4), _cfg(128, 64, 32, 4, 4), _cfg(64, 64, 32, 4, 4),
             _cfg(128, 128, 64, 8, 3), _cfg(64, 64, 64, 4, 3)]

WORKLOADS = {
    "moeut_44m bf16 training step + decoding": dict(presets=["moeut_44m"], dtype="bf16", batch=64, seq_len=1024,
                                                    steps=["train", "decode"], prefill=100),
    "fp32 golden check (tiny + small_g3)": dict(presets=["golden_tiny", "golden_small_g3"], dtype="fp32", batch=2,
                                                seq_len=64, steps=["train", "eval", "decode"], prefill=32),
}


def _spec_key(s):
    return (s.kernel, s.constexprs, s.tensors, s.int_classes)


def measure(name, w, arch, legacy, log, backend="triton", baseline_keys=None):
    """Trace workload `w` with CVMM backend `backend` and AOT-compile its variants; with
    `baseline_keys` (the default backend's variants) also count the variants it shares."""
    traced = {}
    for p in w["presets"]:
        for step, ls in fp.trace(fp.model_config(p, backend), w["dtype"], w["batch"], w["seq_len"], w["steps"],
                                 w["prefill"]).items():
            traced.setdefault(f"{p}:{step}", []).extend(ls)
    summ = fp.summarise(traced)
    log(f"# {name} [{backend}]: {len(summ['specs'])} variants, {summ['compiles']} compiles")
    after, rows = fp.aot_time(summ["specs"], arch, log=log)
    res = dict(variants=len(summ["specs"]), compiles=len(rows), after=after,
               worst=max(r["seconds"] for r in rows), autotuned_keys=summ["autotuned_keys"],
               keys={_spec_key(s) for s in summ["specs"]}, backend=backend)
    if baseline_keys is not None:
        res["shared_with_default"] = len(res["keys"] & baseline_keys)
    if legacy:
        before, rows_b = fp.aot_time(summ["specs"], arch, log=log,
                                     configs_of=lambda s: LEGACY_FWD if s.kernel == "fwd" else LEGACY_DW)
        res.update(before=before, compiles_before=len(rows_b), worst_before=max(r["seconds"] for r in rows_b))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--no-before", action="store_true", help="skip the legacy config sets")
    ap.add_argument("--only", default=None, help="substring of one workload name")
    ap.add_argument("--record", default=None, help="append a markdown section to this file")
    ap.add_argument("--candidates", default=None,
                    help="comma-separated Triton CVMM backends (e.g. triton_pad,triton_buffer): also compile each "
                         "workload's footprint with them (docs/kernels.md \"Candidates\")")
    a = ap.parse_args(argv)
    from moeut.kernels.cvmm import TRITON_BACKENDS
    cands = [c for c in (a.candidates or "").split(",") if c]
    bad = [c for c in cands if c not in TRITON_BACKENDS or c == "triton"]
    if bad:
        sys.exit(f"compile_cost.py: error: --candidates: {bad} not among {TRITON_BACKENDS[1:]}")
    results = {}
    cand_results = []
    for name, w in WORKLOADS.items():
        if a.only and a.only not in name:
            continue
        results[name] = measure(name, w, a.arch, not a.no_before, lambda m: print(m, flush=True))
        for c in cands:
            cand_results.append((name, measure(name, w, a.arch, False, lambda m: print(m, flush=True), backend=c,
                                               baseline_keys=results[name]["keys"])))
    cpu = f"{platform.machine()}, {os.cpu_count()} cores"
    lines = [f"## Triton compile cost, AOT for sm_{a.arch} (`benchmarks/compile_cost.py`), {datetime.date.today()}", "",
             f"- machine: CPU only ({cpu}, shared with other jobs), no GPU: Triton's real CUDA backend + bundled "
             f"ptxas compile for sm_{a.arch}; torch {torch.__version__}, triton {triton.__version__}, "
             f"Python {platform.python_version()}",
             "- each kernel variant compiled for every config it may autotune over, sequentially, into a cold "
             "cache (what the first call on a GPU compiles; autotune benchmarking and launch time not included)",
             f"- command: python benchmarks/compile_cost.py {' '.join(sys.argv[1:] if argv is None else argv)}", "",
             "| workload | variants | compiles before | compile CPU s before | compiles after | compile CPU s after | "
             "slowest single compile CPU s (before / after) | autotuned keys after |",
             "|---|---|---|---|---|---|---|---|"]
    # Times are CPU seconds of the compiling process and its ptxas children: the machine is shared,
    # and wall time there measures the other jobs.
    for name, r in results.items():
        lines.append(f"| {name} | {r['variants']} | {r.get('compiles_before', '-')} | "
                     f"{r.get('before', float('nan')):.1f} | {r['compiles']} | {r['after']:.1f} | "
                     f"{r.get('worst_before', float('nan')):.1f} / {r['worst']:.1f} | {r['autotuned_keys']} |")
    lines += ["", "\"before\" = the same variants with the pre-pruning config sets (6 + 6, autotuned for every dtype "
              "and size); a lower bound, since the old kernels also compiled a variant per slot-count class "
              "(S % 16, S == 1).", ""]
    if cand_results:
        lines += ["Candidates (each workload's whole footprint compiled with the candidate backend, cold; "
                  "`shared` = variants identical to the default backend's, so compiled once when both run):", "",
                  "| workload | backend | variants | shared with triton | compiles | compile CPU s | slowest CPU s | "
                  "autotuned keys |", "|---|---|---|---|---|---|---|---|"]
        for name, r in [(n, dict(results[n], backend="triton")) for n in results] + cand_results:
            lines.append(f"| {name} | {r['backend']} | {r['variants']} | {r.get('shared_with_default', r['variants'])} | "
                         f"{r['compiles']} | {r['after']:.1f} | {r['worst']:.1f} | {r['autotuned_keys']} |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if a.record:
        with open(a.record, "a") as f:
            f.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
