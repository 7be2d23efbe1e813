"""Compute-matched comparisons of trained runs (SPEC 9.4, Du et al.'s protocol of 8.7).

    python -m moeut.analysis compare runs=[RUN_DIR,RUN_DIR,...] out=compare_out [seq_len=1024]
        [param_tol=0.05] [metric=val_ppl|EVAL_KEY] [measure=true batch_size=8 device=cuda]
    python -m moeut.analysis compare 'runs=[runs/*]' out=compare      # glob patterns expand
    python -m moeut.analysis compare --help                           # every option

Writes to `out`: `summary.md/.csv/.json` (one row per run), `iso_param.md` (runs grouped by total
parameters within `param_tol`), `iso_mac.md` and `iso_step_time.md` (validation perplexity of every
run interpolated at a common training-MAC budget and a common wall-clock budget: the smallest
final budget among the runs, or `mac_budget` / `time_budget`) and `speed_accuracy.png/.pdf`
(Du et al.: step time vs quality, plus perplexity-vs-MACs and perplexity-vs-wall-clock curves).

What is read from each run dir, through moeut.rundir (all optional except the model config; missing
numbers print "-"; a cut last line of metrics.jsonl is skipped with a warning naming file:line, any
other damaged line or file is an error naming file:line):
- model config: `checkpoints/step_*/model_config.json` of the newest checkpoint (or
  `model_config.json` in the run dir) -> parameters, active parameters, MACs and FLOPs per token
  (moeut.compute, "paper" convention, full T^2).
- `metrics.jsonl`: JSON lines with "step" and scalar keys. Validation perplexity: its key by
  moeut.rundir's one rule (`val_ppl_key`; or `val_key`); training loss
  "train/loss"; tokens seen "train/tokens_seen" / "tokens_seen" / "tokens" (else step x tokens per
  step from meta.json); step time "perf/step_time" / "train/step_time" / "step_time" (seconds),
  else tokens per step / "train/tokens_per_s" (median over the logged intervals); wall clock
  "time" (unused: restarts and evaluation pauses make it unreliable; we use step x step time).
- `step_time.json` in the run dir (written by measure=true or by hand: {"step_time_s": ...}) overrides
  the logged step time: Du et al. require step times measured under identical settings (same GPU
  type, software, batch) after optimising each model, which training logs from different
  clusters are not.
- `eval/results_*.json` (python -m moeut.evaluate), the run's evaluation by moeut.rundir's rule
  (`RunDir.latest_eval`: newest evaluated step, its evaluations merged per task): numeric leaves under "tasks" become
  "<task>/<metric>" keys; "eval/mean_acc" averages each task's "accuracy"/"acc" entry.

Interpolation: perplexity is interpolated linearly in log(budget) between the two logged
validation points around the budget; a budget before a run's first validation point gives "-".
Tables are laid out by moeut.analysis.tables, the figure by moeut.analysis.style.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..cli import REQUIRED, bad_input_exits, check_device_available, check_out_dir, option, typed_tool
from . import style, tables

STEP_TIME_KEYS = ("perf/step_time", "train/step_time", "step_time")
TOKENS_KEYS = ("train/tokens_seen", "tokens_seen", "tokens")
TPS_KEYS = ("train/tokens_per_s", "perf/tokens_per_s", "tokens_per_s")


@dataclass
class Run:
    """What compare reads from one run dir (load_run). Counts: params/active in parameters,
    MACs/FLOPs per token (paper convention), tokens, step_time in seconds; `val` is the
    validation curve [(step, perplexity)], sorted by step; `eval` maps "<task>/<metric>" keys
    (and "eval/mean_acc") to numbers."""
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
    commit: str = "-"  # provenance.jsonl (moeut.provenance.commit_label): short hash, -dirty

    @property
    def final_ppl(self) -> float:
        """Validation perplexity at the last logged validation step (NaN without one)."""
        return self.val[-1][1] if self.val else float("nan")

    @property
    def train_macs(self) -> float:
        """Forward training MACs (the authors' convention): MACs/token x tokens seen."""
        return self.macs_per_token * self.tokens

    @property
    def wall_clock(self) -> float:
        """Training wall clock in seconds = steps x step time (Du et al.)."""
        return self.step_time * self.steps

    def macs_at(self, step: int) -> float:
        """Forward training MACs after `step` steps."""
        return self.macs_per_token * self.tokens_per_step * step

    def time_at(self, step: int) -> float:
        """Wall clock in seconds after `step` steps."""
        return self.step_time * step

    def metric(self, key: str) -> float:
        """"val_ppl" (final validation perplexity) or an eval key such as "piqa/accuracy"; NaN if absent."""
        if key == "val_ppl":
            return self.final_ppl
        return self.eval.get(key, float("nan"))


# ------------------------------------------------------------------------------------------
# Reading run dirs
# ------------------------------------------------------------------------------------------

def _num(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _flatten(prefix: str, obj, out: Dict[str, float]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif _num(obj) is not None:
        out[prefix] = _num(obj)


def load_run(run_dir: str, seq_len: int = 1024, val_key: Optional[str] = None) -> Run:
    """Read one run dir (through moeut.rundir) into a Run: model config of the newest readable
    checkpoint -> parameter/MAC/FLOP counts at `seq_len` (moeut.compute, paper convention);
    metrics.jsonl -> validation curve (moeut.rundir.val_ppl_curve: `val_key`, default the one
    rule), train loss, tokens per step, step time; step_time.json; eval/results_*.json.
    Raises FileNotFoundError (no model config), ValueError (config not understood, bad
    step_time.json), CorruptRunFile (a damaged run-dir file, named with its line)."""
    from .. import compute
    from ..registry import config_from_dict
    from ..rundir import EVAL_RESULTS_GLOB, RunDir, read_json, val_ppl_curve

    run = Run(name=RunDir(run_dir).label(), path=run_dir)
    rd = RunDir(run_dir)
    run.commit = rd.commit() or "-"
    found = rd.model_config(option="runs")
    if found is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoints/step_*/model_config.json (nor model_config.json)")
    ckpt_dir, model_config = found
    try:
        run.config = config_from_dict(model_config)
    except ValueError as e:
        raise ValueError(f"{os.path.join(ckpt_dir, 'model_config.json')}: {e}") from None
    run.arch = getattr(run.config, "arch", "moeut")
    if run.arch == "moeut" and getattr(run.config, "mlp_type", "sigma_moe") != "sigma_moe":
        run.arch = f"moeut/{run.config.mlp_type}"
    if run.arch == "moe_transformer":
        run.arch = f"moe_transformer/{run.config.mlp_type}/every{run.config.moe_every}"
    s = compute.summarize(run.config, seq_len)
    run.params, run.active = s["params_total"], s["params_active"]
    run.macs_per_token, run.flops_per_token = s["macs_per_token"], s["flops_per_token"]

    rows = rd.metrics()  # a cut last line is skipped with a warning naming file:line
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
            if k == "train/loss":
                run.train_loss = float(v)
            elif k in STEP_TIME_KEYS:
                times.append(float(v))
            elif k in TPS_KEYS and v > 0:
                tps.append(float(v))
            elif k in TOKENS_KEYS and step > 0:
                tokens_rows.append((step, float(v)))
    run.val = sorted(val_ppl_curve(rows, val_key)[1])
    if tokens_rows:
        step, tok = max(tokens_rows)
        run.tokens_per_step = tok / step
    else:  # fall back to the newest checkpoint's meta.json
        meta = os.path.join(ckpt_dir, "meta.json")
        if os.path.exists(meta):
            m = read_json(meta)
            if _num(m.get("tokens_seen")) and _num(m.get("step")):
                run.tokens_per_step = m["tokens_seen"] / m["step"]
                run.steps = max(run.steps, int(m["step"]))
    run.tokens = run.tokens_per_step * run.steps
    if times:
        run.step_time, run.step_time_source = statistics.median(times), "logged"
    elif tps and math.isfinite(run.tokens_per_step):
        run.step_time, run.step_time_source = run.tokens_per_step / statistics.median(tps), "tokens/s"
    v = rd.step_time()
    if v is not None:
        run.step_time, run.step_time_source = v, "measured"

    latest = rd.latest_eval(rd.eval_files(EVAL_RESULTS_GLOB))  # moeut.rundir's rule: newest step, merged per task
    for res in [latest[1]] if latest is not None else []:
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
    """The run's validation perplexity at `budget` forward training MACs (interpolate_log)."""
    return interpolate_log([(run.macs_at(s), p) for s, p in run.val], budget)


def ppl_at_time(run: Run, budget: float) -> float:
    """The run's validation perplexity at `budget` seconds of wall clock (interpolate_log)."""
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


def summary_rows(runs: List[Run]) -> Tuple[List[str], List[List[str]]]:
    """(header, formatted rows) of the one-row-per-run summary table."""
    header = ["run", "commit", "arch", "params", "active", "MACs/tok", "FLOPs/tok", "steps", "tokens", "train MACs",
              "step time (s)", "source", "val ppl"]
    rows = [[r.name, r.commit, r.arch, _fmt(r.params, "M"), _fmt(r.active, "M"), _fmt(r.macs_per_token, "M"),
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
    """Markdown: one table per iso_param_groups group, `metric` and MACs/step time relative to
    the group's first (smallest) run."""
    parts = []
    for group in iso_param_groups(runs, tol):
        ref = group[0]
        header = ["run", "arch", "params", metric, "MACs/tok vs first", "step time vs first"]
        rows = [[r.name, r.arch, _fmt(r.params, "M"), _fmt(r.metric(metric), "p"),
                 _fmt(r.macs_per_token / ref.macs_per_token, "p"), _fmt(r.step_time / ref.step_time, "p")]
                for r in group]
        parts.append(f"### ~{ref.params / 1e6:.3g}M parameters\n\n" + tables.to_markdown(header, rows))
    return "## Iso-parameter (SPEC 9.4; the paper's main comparison)\n\n" + "\n".join(parts)


def common_budget(values: List[float], override: Optional[float]) -> float:
    """`override` if given, else the smallest finite positive value (NaN when none)."""
    if override is not None:
        return override
    finite = [v for v in values if math.isfinite(v) and v > 0]
    return min(finite) if finite else float("nan")


def iso_mac_table(runs: List[Run], budget: Optional[float] = None) -> Tuple[str, float]:
    """(markdown, budget in MACs): every run's validation perplexity at a common training-MAC
    budget (`budget`, default the smallest run's total), best first."""
    b = common_budget([r.train_macs for r in runs], budget)
    rows = [[r.name, r.arch, _fmt(r.params, "M"), _fmt(r.train_macs, "e"), _fmt(ppl_at_macs(r, b), "p")]
            for r in sorted(runs, key=lambda r: ppl_at_macs(r, b) if math.isfinite(ppl_at_macs(r, b)) else 1e30)]
    text = (f"## Iso-MAC (forward training MACs, paper convention)\n\nBudget: {b:.3e} MACs\n\n"
            + tables.to_markdown(["run", "arch", "params", "total train MACs", "val ppl at budget"], rows))
    return text, b


def iso_time_table(runs: List[Run], budget: Optional[float] = None) -> Tuple[str, float]:
    """(markdown, budget in seconds): every run's validation perplexity at a common wall clock
    (`budget`, default the smallest run's steps x step time), best first."""
    b = common_budget([r.wall_clock for r in runs], budget)
    rows = [[r.name, r.arch, _fmt(r.params, "M"), _fmt(r.step_time, "s"), r.step_time_source,
             _fmt(ppl_at_time(r, b), "p")]
            for r in sorted(runs, key=lambda r: ppl_at_time(r, b) if math.isfinite(ppl_at_time(r, b)) else 1e30)]
    text = (f"## Iso-step-time (Du et al.: equal wall-clock = steps x step time)\n\nBudget: {b:.4g} s\n\n"
            "Compare only step times measured on the same hardware (GPU or CPU type) and software stack.\n\n"
            + tables.to_markdown(["run", "arch", "params", "step time (s)", "source", "val ppl at budget"], rows))
    return text, b


# ------------------------------------------------------------------------------------------
# Plot
# ------------------------------------------------------------------------------------------

def plot_speed_accuracy(runs: List[Run], metric: str, stem: str) -> List[str]:
    """Three panels (step time vs `metric`; perplexity vs training MACs; perplexity vs wall
    clock) written to `stem`.png and `stem`.pdf, each run labelled by what differs between the
    runs (moeut.analysis.curves.legend_labels; the tables keep the full names); returns the two paths."""
    import matplotlib.ticker

    from .curves import legend_labels

    short = dict(zip((r.path for r in runs), legend_labels([r.path for r in runs])[0]))
    fig, axes = style.figure(figsize=(16, 4.6), ncols=3)
    ax = axes[0]
    for r in runs:
        y = r.metric(metric)
        if math.isfinite(r.step_time) and math.isfinite(y):
            ax.scatter(r.step_time, y, s=40)
            ax.annotate(short[r.path], (r.step_time, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("training step time (s)")
    ax.set_ylabel("validation perplexity" if metric == "val_ppl" else metric)
    ax.set_title("Speed vs quality (Du et al.)")
    ax.grid(alpha=0.3)
    for ax, xfn, xlabel, title in ((axes[1], Run.macs_at, "training MACs (forward, paper convention)", "Iso-MAC"),
                                   (axes[2], Run.time_at, "wall clock = steps x step time (s)", "Iso-step-time")):
        for r in runs:
            pts = [(xfn(r, s), p) for s, p in r.val if math.isfinite(xfn(r, s)) and xfn(r, s) > 0]
            if pts:
                ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", ms=3, label=short[r.path])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation perplexity")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return style.save(fig, stem, formats=("png", "pdf"), dpi=150)


# ------------------------------------------------------------------------------------------
# Measuring step time (Du et al.: same hardware, same batch, after optimisation)
# ------------------------------------------------------------------------------------------

def measure_runs(runs: List[Run], batch_size: int, seq_len: int, device: str, dtype: Optional[str],
                 n_warmup: int, n_iters: int) -> None:
    """Build every run's model fresh on `device` and time forward+backward+AdamW on random tokens;
    writes `<run>/step_time.json` and updates the runs."""
    import torch

    from ..registry import build_model
    from ..compute import measure_step_time

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
    from ..rundir import EVAL_DIR, EVAL_RESULTS_GLOB, METRICS_FILE
    where = {r.name: (os.path.join(r.path, METRICS_FILE) if metric == "val_ppl"
                      else os.path.join(r.path, EVAL_DIR, EVAL_RESULTS_GLOB)) for r in runs}
    lacking = [r for r in runs if not math.isfinite(r.metric(metric))]
    what = (f"validation perplexity (key {val_key!r})" if val_key else
            "validation perplexity (moeut.rundir.val_ppl_key)") if metric == "val_ppl" else f"metric={metric}"
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
    """Load `run_dirs` (load_run), check some run has `metric` (check_has_metric), optionally
    measure step times (`measure`: measure_runs' keyword arguments), and write summary.{md,csv,json},
    iso_param.md, iso_mac.md, iso_step_time.md and (when `plot`) speed_accuracy.{png,pdf} to
    `out_dir`. Returns the summary dict with "files" ({name: path}) and "_runs" (the Run objects).
    Raises what load_run and check_has_metric raise, before anything is written."""
    runs = [load_run(d, seq_len, val_key) for d in run_dirs]
    check_has_metric(runs, metric, val_key)
    if measure:
        measure_runs(runs, seq_len=seq_len, **measure)
    os.makedirs(out_dir, exist_ok=True)
    header, rows = summary_rows(runs)
    files = {}
    tables.write_tables(os.path.join(out_dir, "summary"), header, rows, formats=("md", "csv"))
    mac_text, mac_b = iso_mac_table(runs, mac_budget)
    time_text, time_b = iso_time_table(runs, time_budget)
    for name, text in (("iso_param", iso_param_table(runs, param_tol, metric)), ("iso_mac", mac_text),
                       ("iso_step_time", time_text)):
        files[name] = tables.write_text(os.path.join(out_dir, f"{name}.md"), text)
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


def expand_runs(runs: Any) -> List[str]:
    """The `runs` option as a list of run dirs: one path or a list; an entry with glob characters
    (`*`, `?`, `[`) expands to its matches, sorted. Raises ValueError naming an empty option or a
    pattern matching nothing."""
    from ..cli import path_list_option
    return path_list_option(runs, "runs", "runs=[RUN_DIR,...] (run dirs or glob patterns)", keep=os.path.isdir,
                            kept="run dirs")


@dataclass
class CompareOptions:
    """Options of `python -m moeut.analysis compare`."""
    runs: List[str] = option(REQUIRED, help="run dirs to compare (checkpoints/ and metrics.jsonl); entries with * ? [ "
                             "are glob patterns, e.g. 'runs=[runs/c4_*]'")
    out: str = option("compare_out", help="output folder (summary.*, iso_*.md, speed_accuracy.*)")
    seq_len: int = option(1024, help="context length T for MACs/FLOPs per token (the paper's: 1024)", lo=1)
    param_tol: float = option(0.05, help="relative tolerance of the iso-parameter groups", lo=0)
    metric: str = option("val_ppl", help="quality axis: val_ppl, or an eval key such as eval/mean_acc or piqa/accuracy")
    val_key: Optional[str] = option(None, help="metrics.jsonl key of the validation perplexity; null = moeut.rundir's "
                                    "rule (validation/val/perplexity, else another validation set's)")
    mac_budget: Optional[float] = option(None, help="iso-MAC budget in forward training MACs; null = the smallest "
                                         "run's total", lo=0)
    time_budget: Optional[float] = option(None, help="iso-step-time budget in seconds; null = the smallest run's "
                                          "wall clock", lo=0)
    plot: bool = option(True, help="false: no speed_accuracy.png/.pdf")
    measure: bool = option(False, help="true: time every model here and write <run>/step_time.json (Du et al.: step "
                           "times measured under identical settings); the options below")
    batch_size: int = option(8, help="measure: sequences per step", lo=1)
    device: str = option("cuda", help="measure: device (cpu, cuda, cuda:N)")
    dtype: str = option("bf16", help="measure: autocast precision", choices=("fp32", "bf16", "fp16"))
    warmup: int = option(5, help="measure: untimed steps first", lo=0)
    iters: int = option(20, help="measure: timed steps", lo=1)


def work(opts: CompareOptions) -> Dict[str, Any]:
    """The command's work: compare the runs, print the tables and the written files; returns
    `compare`'s result. A bad option or run dir is one line naming it, exit status 1."""
    measure = None
    if opts.measure:
        measure = {"batch_size": opts.batch_size, "device": opts.device, "dtype": opts.dtype,
                   "n_warmup": opts.warmup, "n_iters": opts.iters}
    with bad_input_exits("moeut.analysis compare"):
        check_out_dir(opts.out, "out")
        if opts.measure:  # a GPU this machine lacks: one line, before any run is read
            check_device_available(opts.device, "device")
        res = compare(expand_runs(opts.runs), opts.out, seq_len=opts.seq_len, param_tol=opts.param_tol,
                      metric=opts.metric, val_key=opts.val_key, mac_budget=opts.mac_budget,
                      time_budget=opts.time_budget, plot=opts.plot, measure=measure)
    for name in ("summary_md", "iso_param", "iso_mac", "iso_step_time"):
        with open(res["files"][name]) as f:
            print(f.read())
    for name, path in res["files"].items():
        print(f"{name}: {path}")
    return res


main = typed_tool("moeut.analysis compare", CompareOptions,
                  summary="Compute-matched comparisons of trained runs (SPEC 9.4, Du et al.): iso-parameter, "
                          "iso-MAC and iso-step-time tables and the speed-accuracy plot.",
                  usage="python -m moeut.analysis compare runs=[RUN_DIR,...] [option=value ...]",
                  notes="Run dirs are read through moeut/rundir.py: a cut last line of metrics.jsonl is skipped "
                        "with a warning naming file:line; any other damaged line or file is an error naming "
                        "file:line.")(work)

