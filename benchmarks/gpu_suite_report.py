"""Turn a benchmarks/gpu_suite.sh work directory into one dated markdown section (appended to --doc).

    python benchmarks/gpu_suite_report.py --work /tmp/gpu_suite.XXXX --doc docs/benchmarks.md

Reads steps.tsv (step, status, seconds), the step logs, gpu_report.jsonl (figures printed by
tests/unit/kernels/test_gpu_cuda.py), the evaluation table and the benchmark sections the suite wrote.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _lines(text: str, pattern: str):
    return [ln.strip() for ln in text.splitlines() if re.search(pattern, ln)]


def build(work: str, total_seconds: int, dry_run: bool) -> str:
    steps = [ln.split("\t") for ln in _read(os.path.join(work, "steps.tsv")).splitlines() if ln.strip()]
    versions = [ln for ln in _read(os.path.join(work, "versions.log")).splitlines() if ln.strip()]
    title = "GPU suite (`benchmarks/gpu_suite.sh`)" + (" -- CPU DRY RUN, not GPU figures" if dry_run else "")
    out = [f"## {title}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", ""]
    out += [f"- {v}" for v in versions]
    ok = all(s[1] in ("PASS", "SKIPPED") for s in steps)
    out += [f"- total {total_seconds} s (target <= 480 s on one GPU, cold); "
            f"{'all steps passed' if ok else 'SOME STEPS FAILED'}", "",
            "| step | status | seconds |", "|---|---|---|"]
    out += [f"| {s[0]} | {s[1]} | {s[2]} |" for s in steps]

    cold = _lines(_read(os.path.join(work, "cold_start.log")), r"^\[warmup\]")
    if cold:
        out += ["", "Cold start (first process: cold Triton cache; second: on-disk caches warm):", ""]
        out += [f"    {c}" for c in cold]
    fp = _lines(_read(os.path.join(work, "footprint.log")), r"kernel variants")
    if fp:
        out += ["", f"Compile footprint: {fp[0]}"]
    figures = [json.loads(ln) for ln in _read(os.path.join(work, "gpu_report.jsonl")).splitlines() if ln.strip()]
    if figures:
        out += ["", "Figures from `pytest -m gpu` (tests/unit/kernels/test_gpu_cuda.py):", ""]
        out += [f"- `{json.dumps(f)}`" for f in figures]
    summary = _lines(_read(os.path.join(work, "pytest_gpu.log")), r"(passed|failed|skipped|error)")
    if summary:
        out += ["", f"pytest: {summary[-1]}"]
    train = _read(os.path.join(work, "train_first.log")) + _read(os.path.join(work, "train_resume.log"))
    tl = _lines(train, r"(resumed from|signal received|\bval\b|ppl)")
    if tl:
        out += ["", "Training (SIGTERM after the first checkpoint, then resume):", ""]
        out += [f"    {t[:200]}" for t in tl[-8:]]
    tables = sorted(glob.glob(os.path.join(work, "eval", "table_step_*.md")))
    if tables:
        out += ["", "Zero-shot evaluation (with a per-task limit; not comparable to the paper):", "", _read(tables[-1]).strip()]
    if os.path.exists(os.path.join(work, "analysis", "report.md")):
        figs = glob.glob(os.path.join(work, "analysis", "figures", "*.png"))
        out += ["", f"Analysis: report.md and {len(figs)} PNG figures written."]
    for name in ("rank/rank.md", "bench_train_step.md", "bench_cvmm.md"):
        text = _read(os.path.join(work, name)).strip()
        if text:
            out += ["", re.sub(r"^## ", "### ", text, flags=re.M)]
    layer = _lines(_read(os.path.join(work, "bench_moe_layer.log")), r"(ratio|device=)")
    if layer:
        out += ["", "σ-MoE layer vs dense-active (`benchmarks/moe_layer.py`):", ""] + [f"    {x}" for x in layer]
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", required=True)
    ap.add_argument("--doc", required=True)
    ap.add_argument("--total-seconds", type=int, default=0)
    ap.add_argument("--dry-run", default="0")
    a = ap.parse_args(argv)
    text = build(a.work, a.total_seconds, a.dry_run == "1")
    with open(a.doc, "a") as f:
        f.write("\n" + text)
    print(text)


if __name__ == "__main__":
    main()
