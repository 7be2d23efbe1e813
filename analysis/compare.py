"""Compute-matched comparisons of trained runs (SPEC 9.4, Du et al.'s protocol of 8.7).

    python analysis/compare.py RUN_DIR [RUN_DIR ...] --out compare_out [--seq-len 1024]
        [--param-tol 0.05] [--metric val_ppl | EVAL_KEY] [--measure --batch-size 8 --device cuda]

Writes to --out: `summary.md/.csv/.json` (one row per run), `iso_param.md` (runs grouped by total
parameters within --param-tol), `iso_mac.md` and `iso_step_time.md` (validation perplexity of every
run interpolated at a common training-MAC budget and a common wall-clock budget: the smallest
final budget among the runs, or --mac-budget / --time-budget) and `speed_accuracy.png/.pdf`
(Du et al.: step time vs quality, plus perplexity-vs-MACs and perplexity-vs-wall-clock curves).

What is read from each run dir (all optional except the model config; missing numbers print "-"):
- model config: `checkpoints/step_*/model_config.json` of the newest checkpoint (or
  `model_config.json` in the run dir) -> parameters, active parameters, MACs and FLOPs per token
  (moeut.compute, "paper" convention, full T^2).
- `metrics.jsonl`: JSON lines with "step" and scalar keys. Validation perplexity: the first key
  matching `(val|valid|validation)[/...]/(perplexity|ppl)` (or --val-key); training loss
  "train/loss"; tokens seen "train/tokens_seen" / "tokens_seen" / "tokens" (else step x tokens per
  step from meta.json); step time "perf/step_time" / "train/step_time" / "step_time" (seconds),
  else tokens per step / "train/tokens_per_s" (median over the logged intervals); wall clock
  "time" (unused: restarts and evaluation pauses make it unreliable; we use step x step time).
- `step_time.json` in the run dir (written by --measure or by hand: {"step_time_s": ...}) overrides
  the logged step time: Du et al. require step times measured under identical settings (same GPU
  type, software, batch) after optimising each model, which training logs from different
  clusters are not.
- `eval/results_*.json` (python -m moeut.evaluate): numeric leaves under "tasks" become
  "<task>/<metric>" keys; "eval/mean_acc" averages each task's "accuracy"/"acc" entry.

Interpolation: perplexity is interpolated linearly in log(budget) between the two logged
validation points around the budget; a budget before a run's first validation point gives "-".
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import re
import statistics
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(_HERE) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, os.path.dirname(_HERE))

VAL_RE = re.compile(r"^(val|valid|validation)(/.*)?/(perplexity|ppl)$")
STEP_TIME_KEYS = ("perf/step_time", "train/step_time", "step_time")
TOKENS_KEYS = ("train/tokens_seen", "tokens_seen", "tokens")
TPS_KEYS = ("train/tokens_per_s", "perf/tokens_per_s", "tokens_per_s")


@dataclass
class Run:
    name: str
    path: str
    config: Any = None
    arch: str = "?"
    params: float = float("nan")
    active: float = float("nan")
    macs_per_token: float = float("nan")
    flops_per_token: float = float("nan")
    steps: int = 0
    tokens: float = float("nan")
    tokens_per_step: float = float("nan")
    step_time: float = float("nan")
    step_time_source: str = "-"
    val: List[Tuple[int, float]] = field(default_factory=list)  # (step, perplexity)
    train_loss: float = float("nan")
    eval: Dict[str, float] = field(default_factory=dict)

    @property
    def final_ppl(self) -> float:
        return self.val[-1][1] if self.val else float("nan")

    @property
    def train_macs(self) -> float:
        """Forward training MACs (the authors' convention): MACs/token x tokens seen."""
        return self.macs_per_token * self.tokens

    @property
    def wall_clock(self) -> float:
        return self.step_time * self.steps

    def macs_at(self, step: int) -> float:
        return self.macs_per_token * self.tokens_per_step * step

    def time_at(self, step: int) -> float:
        return self.step_time * step

    def metric(self, key: str) -> float:
        if key == "val_ppl":
            return self.final_ppl
        return self.eval.get(key, float("nan"))


# ------------------------------------------------------------------------------------------
# Reading run dirs
# ------------------------------------------------------------------------------------------

def _model_config_path(run_dir: str) -> Optional[str]:
    from moeut.checkpoint import find_checkpoints, open_checkpoint, read_checkpoint_file
    if os.path.isdir(os.path.join(run_dir, "checkpoints")) and find_checkpoints(run_dir):
        def read(ckpt: str) -> str:  # only the config is used: an unreadable one is skipped, named
            path = os.path.join(ckpt, "model_config.json")
            read_checkpoint_file(path)
            return path
        return open_checkpoint(run_dir, read, option="runs")
    p = os.path.join(run_dir, "model_config.json")
    return p if os.path.exists(p) else None


def _read_jsonl(path: str) -> List[Dict[str, Any]]:
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                # A run killed mid-write leaves a truncated last line: skip it, say where.
                print(f"[compare] {path}:{i}: skipping unreadable line ({e.msg})", file=sys.stderr)
    return rows


def _num(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _flatten(prefix: str, obj, out: Dict[str, float]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif _num(obj) is not None:
        out[prefix] = _num(obj)


def load_run(run_dir: str, seq_len: int = 1024, val_key: Optional[str] = None) -> Run:
    from moeut import compute
    from moeut.registry import config_from_dict

    run = Run(name=os.path.basename(os.path.normpath(run_dir)), path=run_dir)
    cfg_path = _model_config_path(run_dir)
    if cfg_path is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoints/step_*/model_config.json (nor model_config.json)")
    with open(cfg_path) as f:
        try:
            run.config = config_from_dict(json.load(f))
        except ValueError as e:
            raise ValueError(f"{cfg_path}: {e}") from None
    run.arch = getattr(run.config, "arch", "moeut")
    if run.arch == "moeut" and getattr(run.config, "mlp_type", "sigma_moe") != "sigma_moe":
        run.arch = f"moeut/{run.config.mlp_type}"
    if run.arch == "moe_transformer":
        run.arch = f"moe_transformer/{run.config.mlp_type}/every{run.config.moe_every}"
    s = compute.summarize(run.config, seq_len)
    run.params, run.active = s["params_total"], s["params_active"]
    run.macs_per_token, run.flops_per_token = s["macs_per_token"], s["flops_per_token"]

    rows = []
    mpath = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(mpath):
        rows = _read_jsonl(mpath)
    tps, times, tokens_rows = [], [], []
    for r in rows:
        step = r.get("step")
        if not isinstance(step, int) and _num(step) is None:
            continue
        step = int(step)
        run.steps = max(run.steps, step)
        for k, v in r.items():
            if _num(v) is None:
                continue
            if (val_key is not None and k == val_key) or (val_key is None and VAL_RE.match(k)):
                if val_key is None:
                    val_key = k  # the first matching key wins for the whole run
                run.val.append((step, float(v)))
            elif k == "train/loss":
                run.train_loss = float(v)
            elif k in STEP_TIME_KEYS:
                times.append(float(v))
            elif k in TPS_KEYS and v > 0:
                tps.append(float(v))
            elif k in TOKENS_KEYS and step > 0:
                tokens_rows.append((step, float(v)))
    run.val.sort()
    if tokens_rows:
        step, tok = max(tokens_rows)
        run.tokens_per_step = tok / step
    else:  # fall back to the newest checkpoint's meta.json
        meta = os.path.join(os.path.dirname(cfg_path), "meta.json")
        if os.path.exists(meta):
            with open(meta) as f:
                m = json.load(f)
            if _num(m.get("tokens_seen")) and _num(m.get("step")):
                run.tokens_per_step = m["tokens_seen"] / m["step"]
                run.steps = max(run.steps, int(m["step"]))
    run.tokens = run.tokens_per_step * run.steps
    if times:
        run.step_time, run.step_time_source = statistics.median(times), "logged"
    elif tps and math.isfinite(run.tokens_per_step):
        run.step_time, run.step_time_source = run.tokens_per_step / statistics.median(tps), "tokens/s"
    st = os.path.join(run_dir, "step_time.json")
    if os.path.exists(st):
        with open(st) as f:
            v = _num(json.load(f).get("step_time_s"))
        if v is None:
            raise ValueError(f"{st}: needs a positive number under 'step_time_s'")
        run.step_time, run.step_time_source = v, "measured"

    for path in sorted(glob.glob(os.path.join(run_dir, "eval", "results_*.json"))):
        with open(path) as f:
            res = json.load(f)
        flat: Dict[str, float] = {}
        _flatten("", res.get("tasks", {}), flat)
        run.eval.update(flat)
        accs = []
        for task, tr in (res.get("tasks") or {}).items():
            if isinstance(tr, dict):
                a = next((_num(tr[k]) for k in ("accuracy", "acc") if _num(tr.get(k)) is not None), None)
                if a is not None:
                    accs.append(a)
        if accs:
            run.eval["eval/mean_acc"] = sum(accs) / len(accs)
    return run


# ------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------

def interpolate_log(points: Sequence[Tuple[float, float]], x: float) -> float:
    """y at x, linear in log(x) between the neighbouring points; NaN outside [first, last]."""
    pts = sorted((a, b) for a, b in points if a > 0 and math.isfinite(b))
    if not pts or not math.isfinite(x) or x <= 0 or x < pts[0][0] * (1 - 1e-9) or x > pts[-1][0] * (1 + 1e-9):
        return float("nan")
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            if x1 == x0:
                return y1
            w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + w * (y1 - y0)
    return pts[-1][1]


def ppl_at_macs(run: Run, budget: float) -> float:
    return interpolate_log([(run.macs_at(s), p) for s, p in run.val], budget)


def ppl_at_time(run: Run, budget: float) -> float:
    return interpolate_log([(run.time_at(s), p) for s, p in run.val], budget)


def _fmt(v, kind: str = "g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if kind == "M":
        return f"{v / 1e6:.2f}M"
    if kind == "e":
        return f"{v:.3e}"
    if kind == "s":
        return f"{v:.4g}"
    if kind == "p":
        return f"{v:.2f}"
    return f"{v:.4g}"


def _markdown(header: List[str], rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def summary_rows(runs: List[Run]) -> Tuple[List[str], List[List[str]]]:
    header = ["run", "arch", "params", "active", "MACs/tok", "FLOPs/tok", "steps", "tokens", "train MACs",
              "step time (s)", "source", "val ppl"]
    rows = [[r.name, r.arch, _fmt(r.params, "M"), _fmt(r.active, "M"), _fmt(r.macs_per_token, "M"),
             _fmt(r.flops_per_token, "M"), str(r.steps), _fmt(r.tokens, "e"), _fmt(r.train_macs, "e"),
             _fmt(r.step_time, "s"), r.step_time_source, _fmt(r.final_ppl, "p")] for r in runs]
    return header, rows


def iso_param_groups(runs: List[Run], tol: float) -> List[List[Run]]:
    """Greedy grouping by total parameters: a run joins a group if within `tol` (relative) of the
    group's smallest member."""
    groups: List[List[Run]] = []
    for r in sorted(runs, key=lambda r: r.params):
        if groups and abs(r.params - groups[-1][0].params) <= tol * groups[-1][0].params:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def iso_param_table(runs: List[Run], tol: float, metric: str) -> str:
    parts = []
    for group in iso_param_groups(runs, tol):
        ref = group[0]
        header = ["run", "arch", "params", metric, "MACs/tok vs first", "step time vs first"]
        rows = [[r.name, r.arch, _fmt(r.params, "M"), _fmt(r.metric(metric), "p"),
                 _fmt(r.macs_per_token / ref.macs_per_token, "p"), _fmt(r.step_time / ref.step_time, "p")]
                for r in group]
        parts.append(f"### ~{ref.params / 1e6:.3g}M parameters\n\n" + _markdown(header, rows))
    return "## Iso-parameter (SPEC 9.4; the paper's main comparison)\n\n" + "\n".join(parts)


def common_budget(values: List[float], override: Optional[float]) -> float:
    if override is not None:
        return override
    finite = [v for v in values if math.isfinite(v) and v > 0]
    return min(finite) if finite else float("nan")


def iso_mac_table(runs: List[Run], budget: Optional[float] = None) -> Tuple[str, float]:
    b = common_budget([r.train_macs for r in runs], budget)
    rows = [[r.name, r.arch, _fmt(r.params, "M"), _fmt(r.train_macs, "e"), _fmt(ppl_at_macs(r, b), "p")]
            for r in sorted(runs, key=lambda r: ppl_at_macs(r, b) if math.isfinite(ppl_at_macs(r, b)) else 1e30)]
    text = (f"## Iso-MAC (forward training MACs, paper convention)\n\nBudget: {b:.3e} MACs\n\n"
            + _markdown(["run", "arch", "params", "total train MACs", "val ppl at budget"], rows))
    return text, b


def iso_time_table(runs: List[Run], budget: Optional[float] = None) -> Tuple[str, float]:
    b = common_budget([r.wall_clock for r in runs], budget)
    rows = [[r.name, r.arch, _fmt(r.params, "M"), _fmt(r.step_time, "s"), r.step_time_source,
             _fmt(ppl_at_time(r, b), "p")]
            for r in sorted(runs, key=lambda r: ppl_at_time(r, b) if math.isfinite(ppl_at_time(r, b)) else 1e30)]
    text = (f"## Iso-step-time (Du et al.: equal wall-clock = steps x step time)\n\nBudget: {b:.4g} s\n\n"
            "Compare only step times measured on the same GPU type and software stack.\n\n"
            + _markdown(["run", "arch", "params", "step time (s)", "source", "val ppl at budget"], rows))
    return text, b


# ------------------------------------------------------------------------------------------
# Plot
# ------------------------------------------------------------------------------------------

def plot_speed_accuracy(runs: List[Run], metric: str, stem: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    for r in runs:
        y = r.metric(metric)
        if math.isfinite(r.step_time) and math.isfinite(y):
            ax.scatter(r.step_time, y, s=40)
            ax.annotate(r.name, (r.step_time, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("training step time (s)")
    ax.set_ylabel("validation perplexity" if metric == "val_ppl" else metric)
    ax.set_title("Speed vs quality (Du et al.)")
    ax.grid(alpha=0.3)
    for ax, xfn, xlabel, title in ((axes[1], Run.macs_at, "training MACs (forward, paper convention)", "Iso-MAC"),
                                   (axes[2], Run.time_at, "wall clock = steps x step time (s)", "Iso-step-time")):
        for r in runs:
            pts = [(xfn(r, s), p) for s, p in r.val if math.isfinite(xfn(r, s)) and xfn(r, s) > 0]
            if pts:
                ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", ms=3, label=r.name)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation perplexity")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    paths = []
    for ext in ("png", "pdf"):
        fig.savefig(f"{stem}.{ext}", dpi=150)
        paths.append(f"{stem}.{ext}")
    plt.close(fig)
    return paths


# ------------------------------------------------------------------------------------------
# Measuring step time (Du et al.: same hardware, same batch, after optimisation)
# ------------------------------------------------------------------------------------------

def measure_runs(runs: List[Run], batch_size: int, seq_len: int, device: str, dtype: Optional[str],
                 n_warmup: int, n_iters: int) -> None:
    """Build every run's model fresh on `device` and time forward+backward+AdamW on random tokens;
    writes `<run>/step_time.json` and updates the runs."""
    import torch

    from moeut.registry import build_model
    from moeut.compute import measure_step_time

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None, "fp32": None}[dtype]
    for r in runs:
        torch.manual_seed(0)
        model = build_model(r.config).to(device)
        batch = torch.randint(0, r.config.vocab_size, (batch_size, seq_len + 1), device=device)
        res = measure_step_time(model, batch, n_warmup=n_warmup, n_iters=n_iters, autocast_dtype=dt)
        res.update({"device": str(torch.cuda.get_device_name(device)) if device.startswith("cuda") else device,
                    "batch_size": batch_size, "seq_len": seq_len, "dtype": dtype or "fp32",
                    "torch": torch.__version__})
        with open(os.path.join(r.path, "step_time.json"), "w") as f:
            json.dump(res, f, indent=1)
        r.step_time, r.step_time_source = res["step_time_s"], "measured"
        print(f"[compare] {r.name}: {res['step_time_s'] * 1e3:.1f} ms/step on {res['device']}")
        del model


# ------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------

def check_has_metric(runs: List[Run], metric: str, val_key: Optional[str] = None) -> None:
    """A comparison whose quality metric no run has would be a table of dashes: fail naming what
    is missing; warn for the runs that lack it while others have it."""
    where = {r.name: (os.path.join(r.path, "metrics.jsonl") if metric == "val_ppl"
                      else os.path.join(r.path, "eval", "results_*.json")) for r in runs}
    lacking = [r for r in runs if not math.isfinite(r.metric(metric))]
    what = (f"validation perplexity (key {val_key!r})" if val_key else
            f"validation perplexity (a key matching {VAL_RE.pattern})") if metric == "val_ppl" else f"--metric {metric!r}"
    if len(lacking) == len(runs):
        raise ValueError(f"no run has a {what}; nothing to compare. Looked in: "
                         + ", ".join(where[r.name] for r in runs)
                         + ("" if metric == "val_ppl" else " (eval keys look like 'piqa/accuracy' or 'eval/mean_acc')"))
    for r in lacking:
        warnings.warn(f"{r.name}: no {what} in {where[r.name]}; its cells read n/a")


def compare(run_dirs: Sequence[str], out_dir: str, *, seq_len: int = 1024, param_tol: float = 0.05,
            metric: str = "val_ppl", val_key: Optional[str] = None, mac_budget: Optional[float] = None,
            time_budget: Optional[float] = None, plot: bool = True, measure: Optional[Dict[str, Any]] = None
            ) -> Dict[str, Any]:
    runs = [load_run(d, seq_len, val_key) for d in run_dirs]
    check_has_metric(runs, metric, val_key)
    if measure:
        measure_runs(runs, seq_len=seq_len, **measure)
    os.makedirs(out_dir, exist_ok=True)
    header, rows = summary_rows(runs)
    files = {}
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(_markdown(header, rows))
    with open(os.path.join(out_dir, "summary.csv"), "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    mac_text, mac_b = iso_mac_table(runs, mac_budget)
    time_text, time_b = iso_time_table(runs, time_budget)
    for name, text in (("iso_param", iso_param_table(runs, param_tol, metric)), ("iso_mac", mac_text),
                       ("iso_step_time", time_text)):
        path = os.path.join(out_dir, f"{name}.md")
        with open(path, "w") as f:
            f.write(text)
        files[name] = path
    summary = {
        "seq_len": seq_len, "mac_budget": mac_b, "time_budget": time_b,
        "runs": [{"name": r.name, "path": r.path, "arch": r.arch, "params": r.params, "active": r.active,
                  "macs_per_token": r.macs_per_token, "flops_per_token": r.flops_per_token, "steps": r.steps,
                  "tokens": r.tokens, "train_macs": r.train_macs, "step_time_s": r.step_time,
                  "step_time_source": r.step_time_source, "final_val_ppl": r.final_ppl,
                  "val_ppl_at_mac_budget": ppl_at_macs(r, mac_b), "val_ppl_at_time_budget": ppl_at_time(r, time_b),
                  "eval": r.eval} for r in runs],
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=lambda x: None)
    files.update({"summary_md": os.path.join(out_dir, "summary.md"), "summary_json": os.path.join(out_dir, "summary.json")})
    if plot:
        files["plot"] = plot_speed_accuracy(runs, metric, os.path.join(out_dir, "speed_accuracy"))
    summary["files"] = files
    summary["_runs"] = runs
    return summary


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("runs", nargs="+", help="run directories (each with checkpoints/ and metrics.jsonl)")
    ap.add_argument("--out", default="compare_out", help="output directory")
    ap.add_argument("--seq-len", type=int, default=1024, help="context length T for MACs/FLOPs (paper: 1024)")
    ap.add_argument("--param-tol", type=float, default=0.05, help="relative tolerance for iso-parameter groups")
    ap.add_argument("--metric", default="val_ppl", help="y axis / quality: val_ppl or an eval key, e.g. eval/mean_acc")
    ap.add_argument("--val-key", default=None, help="metrics.jsonl key of validation perplexity (default: auto)")
    ap.add_argument("--mac-budget", type=float, default=None, help="iso-MAC budget (default: smallest run's)")
    ap.add_argument("--time-budget", type=float, default=None, help="iso-step-time budget in s (default: smallest)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--measure", action="store_true", help="measure step time of every model here (writes step_time.json)")
    ap.add_argument("--batch-size", type=int, default=8, help="--measure: sequences per step")
    ap.add_argument("--device", default="cuda", help="--measure: device")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="--measure: autocast dtype")
    ap.add_argument("--warmup", type=int, default=5, help="--measure: untimed steps")
    ap.add_argument("--iters", type=int, default=20, help="--measure: timed steps")
    a = ap.parse_args(argv)
    measure = None
    if a.measure:
        measure = {"batch_size": a.batch_size, "device": a.device, "dtype": a.dtype, "n_warmup": a.warmup,
                   "n_iters": a.iters}
    res = compare(a.runs, a.out, seq_len=a.seq_len, param_tol=a.param_tol, metric=a.metric, val_key=a.val_key,
                  mac_budget=a.mac_budget, time_budget=a.time_budget, plot=not a.no_plot, measure=measure)
    for name in ("summary_md", "iso_param", "iso_mac", "iso_step_time"):
        with open(res["files"][name]) as f:
            print(f.read())
    for name, path in res["files"].items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
