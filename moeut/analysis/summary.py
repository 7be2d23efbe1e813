"""Gather a sweep's run directories into one table and draw the paper's comparison plots.

    python -m moeut.analysis summary dir=outputs/sweeps/main_table            # table on stdout + files
    python -m moeut.analysis summary dir=outputs/sweeps/g_ablation out=/tmp/g metric=val/perplexity
    python -m moeut.analysis summary --help                                   # every option

A *run* is any directory under the sweep dir holding a `metrics.jsonl` or a `checkpoints/` folder
(Hydra multirun sub-directories, `sbatch` run dirs, or a single `python train.py` run dir). For each
run it reads, through `moeut.rundir` (one reader, one corrupt-line policy), tolerating missing pieces:

- `metrics.jsonl`: JSON lines with "step" and keys such as "train/loss", "validation/val/perplexity".
  The table keeps the last logged value of each key, and the last and best validation perplexity
  (its key by moeut.rundir's one rule, `val_ppl_key`). A cut last line
  (a run killed mid-write) is skipped with a warning naming file:line; any other damaged line is
  an error naming file:line (`metrics.rewound.jsonl` is never read: no step counts twice);
- `.hydra/overrides.yaml`, `.hydra/hydra.yaml` and `.hydra/config.yaml`: the job's overrides
  (experiment name) and dataset (the `data` group choice, else `RunDir.dataset`);
- the newest readable checkpoint's `model_config.json` (`RunDir.model_config`): architecture,
  G, K, d_expert, LayerNorm placement, and the parameter count (SPEC §2 closed form, or the model
  built on the meta device when no closed form exists);
- `eval/*.json`: the newest `python -m moeut.evaluate` results as `eval/<task>` accuracies
  (`eval/text_ppl`, `eval/bits_per_byte` for the perplexity task; "skipped" for a task without
  data), and lm-eval results files as `lm_eval/<task>/<metric>` (see `read_eval`).

Outputs (in `out`, default the sweep dir): `summary.csv`, `summary.md` and the plots
`ppl_vs_params.png` (perplexity vs parameters, one line per architecture and dataset: the paper's
MoEUT-vs-dense figure) and `g_ablation.png` (perplexity vs group size G for runs that differ in G
only: the paper's G ablation). The analysis reads these files only, never the wandb API. Tables are laid out by moeut.analysis.tables, figures by moeut.analysis.style.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from .. import results_files, rundir
from ..cli import REQUIRED, bad_input_exits, check_out_dir, option, typed_tool
from . import style, tables

# columns shown first in the table, in this order; every other gathered key follows, sorted
LEAD_COLUMNS = ["run", "commit", "experiment", "dataset", "arch", "params", "d_model", "n_layers", "G", "K",
                "d_expert", "ln", "step", "val_ppl", "best_val_ppl", "train_loss"]


@dataclass
class RunSummary:
    """One run of a sweep: its directory and its table row ({column: value}, see summarize_run)."""
    run_dir: Path
    row: Dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# Reading one run
# ------------------------------------------------------------------------------------------

def find_runs(sweep_dir: os.PathLike) -> List[Path]:
    """Run directories under `sweep_dir` (itself included), sorted by path: `moeut.rundir.find_runs`.
    Raises FileNotFoundError when `sweep_dir` is not a directory."""
    return rundir.find_runs(sweep_dir)


def read_metrics(path: os.PathLike) -> List[Dict[str, Any]]:
    """Records of a metrics.jsonl (`moeut.rundir.read_metrics`): a cut last line (a run killed
    mid-write) is skipped with a warning naming file:line; any other unparsable line raises
    CorruptRunFile naming file:line."""
    return rundir.read_metrics(path)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def last_values(records: Iterable[Dict[str, Any]]) -> Dict[str, Any]:
    """Last logged numeric value of every key (records are in logging order; a requeued run
    appends, so a resumed run's later records win)."""
    out: Dict[str, Any] = {}
    for rec in records:
        for k, v in rec.items():
            if _is_number(v):
                out[k] = v
    return out


def read_overrides(run_dir: Path) -> List[str]:
    """The job's command-line overrides (`.hydra/overrides.yaml`); [] when absent. Raises
    CorruptRunFile (file:line) when the file does not parse."""
    return rundir.RunDir(run_dir).overrides()


def _dataset_name(run: rundir.RunDir, experiment: Optional[str], choices: Dict[str, Any]) -> Optional[str]:
    """Dataset label: the job's `data` group choice (c4, c4_sample, gutenberg, slimpajama, ...),
    else the training corpus of the saved job config (`RunDir.dataset`: "C4", or the folder of
    local files), else the experiment name's prefix."""
    if isinstance(choices.get("data"), str):
        return choices["data"]
    name = run.dataset()
    if name:
        return name
    if experiment:
        m = re.match(r"(c4|slimpajama|pes2o|thestack)_", experiment)
        if m:
            return m.group(1)
    return None


def read_model_config(run_dir: Path) -> Optional[Dict[str, Any]]:
    """model_config.json of the newest checkpoint whose config reads (`RunDir.model_config`:
    unreadable ones are skipped with a warning naming the file); None, with a warning, when the
    run has no readable one."""
    try:
        found = rundir.RunDir(run_dir).model_config(option="summary")
    except (FileNotFoundError, ValueError) as e:  # ValueError: CheckpointError of a bare checkpoint dir
        warnings.warn(f"{run_dir}: no readable model config ({e}); architecture columns left empty")
        return None
    return found[1] if found is not None else None


def count_params(model_config: Dict[str, Any]) -> Optional[int]:
    """Total parameters: moeut.compute.total_params, the exact count of the model built on the meta
    device (no memory, no initialisation)."""
    from ..registry import config_from_dict
    try:
        cfg = config_from_dict(model_config)
    except (ValueError, TypeError) as e:
        warnings.warn(f"model config not understood ({e}); parameter count left empty")
        return None
    try:
        from ..compute import total_params
        return int(total_params(cfg))
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"cannot count parameters for arch {model_config.get('arch')!r}: {e}")
        return None


# moeut.evaluate's paper-table tasks, in the table's order (moeut/analysis/table.py)
_EVAL_TASKS = ("lambada", "blimp", "cbt", "hellaswag", "piqa", "arc_easy", "arc_challenge")


def read_eval(run_dir: Path) -> Dict[str, Any]:
    """Evaluation numbers of a run from `<run>/eval/*.json`.

    - `python -m moeut.evaluate` results (`results_step_XXXXXXX[.k].json`): the run's evaluation
      by moeut.rundir's rule (`RunDir.latest_eval`: the newest evaluated step, its evaluations
      merged per task) gives `eval/<task>` = the task's table accuracy (a fraction), or "skipped"
      when the task was asked for but had no data; `eval/text_ppl` and `eval/bits_per_byte` for
      the perplexity task; `eval_step` and `eval_limit` (null = every item; "mixed" when the
      merged tasks were scored with different limits) say what was evaluated, and `eval_data`
      ("carried subset", or "mixed") appears when any task was scored on data/eval's subsets.
    - lm-evaluation-harness results: `lm_eval/<task>/<metric>` (metric without lm-eval's
      ",none" filter suffix; stderr entries dropped).
    - Any other JSON in eval/ is ignored with a warning naming the file.
    A file that does not parse raises CorruptRunFile naming file:line:col (moeut.rundir policy).
    """
    out: Dict[str, Any] = {}
    run = rundir.RunDir(run_dir)
    files = run.eval_files()
    for p, data in files:
        if results_files.is_moeut_eval(data):
            continue  # the newest one is read below
        elif results_files.is_lm_eval(data):
            for task, metrics in data["results"].items():
                for k, v in metrics.items():
                    name = str(k).split(",", 1)[0]
                    if _is_number(v) and not name.endswith("_stderr"):
                        out[f"lm_eval/{task}/{name}"] = v
        else:
            warnings.warn(f"{p}: not a moeut.evaluate or lm-eval results file; ignored by the summary")
    latest = run.latest_eval(files)
    if latest is not None:
        data = latest[1]
        out["eval_step"] = data.get("step")
        tasks = data["tasks"]
        scored = [t for t in tasks.values() if isinstance(t, dict) and "skipped" not in t]
        limits = {t.get("limit") for t in scored}
        out["eval_limit"] = limits.pop() if len(limits) == 1 else ("mixed" if limits else None)
        kinds = {t.get("data", "full") for t in scored}
        if kinds - {"full"}:
            out["eval_data"] = next(iter(kinds)) if len(kinds) == 1 else "mixed"
        for name in list(_EVAL_TASKS) + sorted(set(tasks) - set(_EVAL_TASKS) - {"perplexity"}):
            t = tasks.get(name)
            if not isinstance(t, dict):
                continue
            if "skipped" in t:
                out[f"eval/{name}"] = "skipped"
            elif _is_number(t.get("accuracy")):
                out[f"eval/{name}"] = t["accuracy"]
        ppl = tasks.get("perplexity")
        if isinstance(ppl, dict):
            if "skipped" in ppl:
                out["eval/text_ppl"] = out["eval/bits_per_byte"] = "skipped"
            else:
                out["eval/text_ppl"] = ppl.get("perplexity")
                out["eval/bits_per_byte"] = ppl.get("bits_per_byte")
    return out


def summarize_run(run_dir: os.PathLike, sweep_dir: os.PathLike, ppl_key: Optional[str] = None) -> RunSummary:
    """One table row for the run at `run_dir` (a directory under `sweep_dir`, or `sweep_dir`
    itself): its commit (provenance.jsonl), experiment, dataset, step, last/best validation
    perplexity (`moeut.rundir.val_ppl_curve`: key `ppl_key`, default the one rule), last value of every logged numeric key, architecture and parameter count
    from the newest checkpoint's model config, and evaluation results (`read_eval`). Missing
    files leave cells empty; a damaged run-dir file raises CorruptRunFile (moeut.rundir)."""
    run_dir, sweep_dir = Path(run_dir), Path(sweep_dir)
    rel = run_dir.relative_to(sweep_dir).as_posix() if run_dir != sweep_dir else run_dir.name
    row: Dict[str, Any] = {"run": rel}
    run = rundir.RunDir(run_dir)
    row["commit"] = run.commit() or None  # provenance.jsonl: short hash, -dirty

    overrides = run.overrides()
    choices = run.hydra_choices()
    experiment = next((o.split("=", 1)[1] for o in overrides
                       if o.split("=", 1)[0].lstrip("+~") == "experiment"), None)
    if experiment is None and isinstance(choices.get("experiment"), str):
        experiment = choices["experiment"]  # the config's default experiment
    row["experiment"] = experiment
    row["overrides"] = " ".join(o for o in overrides if not o.startswith("experiment="))
    row["dataset"] = _dataset_name(run, experiment, choices)

    records = run.metrics()
    last = last_values(records)
    steps = [r["step"] for r in records if _is_number(r.get("step"))]
    row["step"] = int(max(steps)) if steps else None
    key, curve = rundir.val_ppl_curve(records, ppl_key)
    row["val_ppl"] = last.get(key) if key else None
    if key:
        row["best_val_ppl"] = min((v for _, v in curve), default=None)
    row["train_loss"] = last.get("train/loss")
    for k, v in last.items():
        if k != "step" and k not in row:
            row[k] = v

    mc = read_model_config(run_dir)
    if mc is not None:
        row["arch"] = mc.get("arch", "moeut")
        row["d_model"] = mc.get("d_model")
        row["n_layers"] = mc.get("n_layers")
        row["G"] = mc.get("group_size")
        if row["arch"] != "dense":
            row["K"] = mc.get("ff_k")
            row["d_expert"] = mc.get("ff_expert_size")
        row["ln"] = mc.get("ln_placement")
        row["params"] = count_params(mc)
    row.update(read_eval(run_dir))
    return RunSummary(run_dir=run_dir, row=row)


# ------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------

def summarize_sweep(sweep_dir: os.PathLike, ppl_key: Optional[str] = None) -> List[Dict[str, Any]]:
    """Rows (summarize_run) of every run under `sweep_dir`, sorted by path. Raises
    FileNotFoundError when the dir does not exist or holds no run."""
    runs = find_runs(sweep_dir)
    if not runs:
        raise FileNotFoundError(f"no runs under {sweep_dir}: expected sub-directories with a "
                                "metrics.jsonl or a checkpoints/ folder")
    return [summarize_run(r, sweep_dir, ppl_key).row for r in runs]


def table_columns(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """Column order: LEAD_COLUMNS present in any row, other metrics sorted, evaluation columns,
    then "overrides"."""
    present = set().union(*(r.keys() for r in rows)) if rows else set()
    lead = [c for c in LEAD_COLUMNS if c in present]
    rest = sorted(present - set(lead) - {"overrides"})
    # evaluation numbers after the training metrics; overrides last (long)
    is_eval = lambda c: c.startswith(("eval/", "eval_", "lm_eval/"))  # noqa: E731
    rest = [c for c in rest if not is_eval(c)] + [c for c in rest if is_eval(c)]
    return lead + rest + (["overrides"] if "overrides" in present else [])


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _millions_columns(rows: Sequence[Dict[str, Any]], columns: Sequence[str]) -> set:
    """Columns printed in millions ("3.28M"): `params` always, and any other integer column with
    a value of 10^6 or more -- then every value of that column, so one column has one format
    (not "3.28M" in one row and "242816" in the next)."""
    return {c for c in columns
            if c == "params" or any(_is_count(r.get(c)) and abs(r.get(c)) >= 10**6 for r in rows)}


def _fmt(v: Any, millions: bool = False) -> str:
    if v is None:
        return ""
    if millions and _is_count(v):
        return f"{v / 1e6:.2f}M"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.4g}"
        return f"{v:.2f}" if abs(v) >= 1 else f"{v:.4f}"
    return str(v)


def to_markdown(rows: Sequence[Dict[str, Any]], columns: Optional[Sequence[str]] = None) -> str:
    """Markdown table of `rows` (moeut.analysis.tables); default columns: the lead columns and
    evaluation columns."""
    columns = list(columns or [c for c in table_columns(rows)
                               if c in LEAD_COLUMNS or c.startswith(("eval/", "eval_", "lm_eval/"))])
    millions = _millions_columns(rows, columns)
    return tables.to_markdown(columns, [[_fmt(r.get(c), c in millions) for c in columns] for r in rows])


def write_csv(rows: Sequence[Dict[str, Any]], path: os.PathLike) -> None:
    """Every column (table_columns) of `rows` to a CSV file at `path`; empty cells for None."""
    columns = table_columns(rows)
    tables.write_text(path, tables.to_csv(columns, [[r.get(c) for c in columns] for r in rows]))


# ------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------

def _family(row: Dict[str, Any]) -> str:
    """Line label for the perplexity-vs-parameters plot: MoEUT, σ-MoE (G = L), dense, or the arch."""
    arch = row.get("arch") or "?"
    if arch == "moeut" and row.get("G") is not None and row.get("G") == row.get("n_layers"):
        return "σ-MoE (no sharing)"
    return {"moeut": "MoEUT", "dense": "dense"}.get(arch, arch)


def plot_ppl_vs_params(rows: Sequence[Dict[str, Any]], path: os.PathLike) -> bool:
    """Perplexity vs total parameters (log x), one line per (family, dataset). Returns False when
    fewer than one plottable run exists."""
    pts = [r for r in rows if _is_number(r.get("val_ppl")) and _is_number(r.get("params"))]
    if not pts:
        return False
    fig, ax = style.figure(figsize=(5.5, 4))
    series: Dict[str, List[Dict[str, Any]]] = {}
    for r in pts:
        label = _family(r) + (f" ({r['dataset']})" if r.get("dataset") else "")
        series.setdefault(label, []).append(r)
    for label, rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["params"])
        ax.plot([r["params"] / 1e6 for r in rs], [r["val_ppl"] for r in rs], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Perplexity vs parameters")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    style.save(fig, Path(path).with_suffix(""), dpi=150)  # PNG at `path`
    return True


def g_ablation_groups(rows: Sequence[Dict[str, Any]]) -> Dict[tuple, List[Dict[str, Any]]]:
    """MoEUT runs grouped by everything the G ablation keeps fixed (dataset, d_model, n_layers,
    K, LayerNorm placement); only groups with at least two different G values are kept."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        if r.get("arch") != "moeut" or not _is_number(r.get("val_ppl")) or r.get("G") is None:
            continue
        key = (r.get("dataset"), r.get("d_model"), r.get("n_layers"), r.get("K"), r.get("ln"))
        groups.setdefault(key, []).append(r)
    return {k: sorted(v, key=lambda r: r["G"]) for k, v in groups.items()
            if len({r["G"] for r in v}) >= 2}


def plot_g_ablation(rows: Sequence[Dict[str, Any]], path: os.PathLike) -> bool:
    """Validation perplexity vs group size G (log2 x), one line per g_ablation_groups group
    (the paper's G ablation); PNG at `path`. Returns False (nothing written) without a group."""
    groups = g_ablation_groups(rows)
    if not groups:
        return False
    fig, ax = style.figure(figsize=(5.5, 4))
    for (dataset, d, L, K, ln), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        label = f"d={d}, L={L}" + (f", {dataset}" if dataset else "")
        ax.plot([r["G"] for r in rs], [r["val_ppl"] for r in rs], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("group size G (distinct layers)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Group-size ablation")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    style.save(fig, Path(path).with_suffix(""), dpi=150)  # PNG at `path`
    return True


def write_summary(sweep_dir: os.PathLike, out_dir: Optional[os.PathLike] = None,
                  ppl_key: Optional[str] = None, plots: bool = True) -> Dict[str, Any]:
    """Gather, write summary.csv/summary.md and the plots; returns rows and written paths."""
    rows = summarize_sweep(sweep_dir, ppl_key)
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"csv": out / "summary.csv", "markdown": out / "summary.md"}
    write_csv(rows, written["csv"])
    md = to_markdown(rows)
    tables.write_text(written["markdown"], f"# Sweep summary: {Path(sweep_dir).resolve().name}\n\n{md}")
    if plots:
        if plot_ppl_vs_params(rows, out / "ppl_vs_params.png"):
            written["ppl_vs_params"] = out / "ppl_vs_params.png"
        if plot_g_ablation(rows, out / "g_ablation.png"):
            written["g_ablation"] = out / "g_ablation.png"
    return {"rows": rows, "markdown": md, "files": written}


@dataclass
class SummaryOptions:
    """Options of `python -m moeut.analysis summary`."""
    dir: str = option(REQUIRED, help="a sweep directory (every run dir under it is summarised) or one run dir; a run "
                      "dir holds metrics.jsonl or checkpoints/")
    out: Optional[str] = option(None, help="folder for summary.{csv,md} and the plots; null = dir")
    metric: Optional[str] = option(None, help="metrics.jsonl key of the validation perplexity; null = moeut.rundir's "
                                   "rule (validation/val/perplexity, else another validation set's)")
    plots: bool = option(True, help="false: skip the PNG plots")


def work(opts: SummaryOptions) -> Dict[str, Any]:
    """The command's work: write the summary of `opts.dir` and print its table; returns
    `write_summary`'s result. A missing dir, a dir without runs or a damaged run-dir file is one
    line naming it, exit status 1."""
    with bad_input_exits("moeut.analysis summary"):
        check_out_dir(opts.out, "out")
        res = write_summary(opts.dir, opts.out, opts.metric, plots=opts.plots)
    print(res["markdown"], end="")
    print(f"\n{len(res['rows'])} run(s); wrote " + ", ".join(str(p) for p in res["files"].values()))
    return res


main = typed_tool("moeut.analysis summary", SummaryOptions,
                  summary="Gather a sweep's run directories into one table (summary.csv, summary.md) and draw the "
                          "paper's comparison plots (ppl_vs_params.png, g_ablation.png).",
                  usage="python -m moeut.analysis summary dir=<sweep or run dir> [option=value ...]",
                  notes="A cut last line of a metrics.jsonl (a run killed mid-write) is skipped with a warning "
                        "naming file:line; any other damaged line or file is an error naming file:line "
                        "(moeut/rundir.py).")(work)

