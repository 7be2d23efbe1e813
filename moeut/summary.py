"""Gather a sweep's run directories into one table and draw the paper's comparison plots.

    python -m moeut.summary outputs/sweeps/main_table            # table on stdout + files
    python -m moeut.summary outputs/sweeps/g_ablation --out /tmp/g --metric val/perplexity

A *run* is any directory under the sweep dir holding a `metrics.jsonl` or a `checkpoints/` folder
(Hydra multirun sub-directories, `sbatch` run dirs, or a single `python train.py` run dir). For each
run it reads, tolerating missing pieces:

- `metrics.jsonl`: JSON lines with "step" and keys such as "train/loss", "val/perplexity". The table
  keeps the last logged value of each key (and the best validation perplexity);
- `.hydra/overrides.yaml` and `.hydra/config.yaml`: the job's overrides (experiment name) and data;
- the newest checkpoint's `model_config.json` (`moeut.checkpoint.find_checkpoints`): architecture,
  G, K, d_expert, LayerNorm placement, and the parameter count (SPEC §2 closed form, or the model
  built on the meta device when no closed form exists);
- `eval/*.json`: the newest `python -m moeut.evaluate` results as `eval/<task>` accuracies
  (`eval/text_ppl`, `eval/bits_per_byte` for the perplexity task; "skipped" for a task without
  data), and lm-eval results files as `lm_eval/<task>/<metric>` (see `read_eval`).

Outputs (in `--out`, default the sweep dir): `summary.csv`, `summary.md` and the plots
`ppl_vs_params.png` (perplexity vs parameters, one line per architecture and dataset: the paper's
MoEUT-vs-dense figure) and `g_ablation.png` (perplexity vs group size G for runs that differ in G
only: the paper's G ablation). The analysis reads these files only, never the wandb API.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

PPL_DEFAULT = "validation/val/perplexity"  # train.py: validation/<set name>/perplexity

# columns shown first in the table, in this order; every other gathered key follows, sorted
LEAD_COLUMNS = ["run", "experiment", "dataset", "arch", "params", "d_model", "n_layers", "G", "K",
                "d_expert", "ln", "step", "val_ppl", "best_val_ppl", "train_loss"]


@dataclass
class RunSummary:
    run_dir: Path
    row: Dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# Reading one run
# ------------------------------------------------------------------------------------------

def find_runs(sweep_dir: os.PathLike) -> List[Path]:
    """Run directories under `sweep_dir` (itself included), sorted by path.

    A run dir holds `metrics.jsonl` or `checkpoints/`. Submitit's `.submitit/` folders, hidden
    folders and the inside of `checkpoints/` are never searched.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep dir {root} does not exist or is not a directory")
    runs = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        is_run = "metrics.jsonl" in filenames or "checkpoints" in dirnames
        # prune before descending: hidden dirs (.hydra, .submitit), checkpoints, eval outputs
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "checkpoints"
                             and not (is_run and d in ("eval", "routing", "wandb")))
        if is_run:
            runs.append(here)
    return sorted(runs)


def read_metrics(path: os.PathLike) -> List[Dict[str, Any]]:
    """Records of a metrics.jsonl; an unparsable line (e.g. cut by a kill) is skipped with a warning
    naming the file and line, so a run that died mid-write still summarises."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                warnings.warn(f"{path}:{lineno}: skipping unparsable metrics line ({e.msg})")
                continue
            if not isinstance(rec, dict):
                warnings.warn(f"{path}:{lineno}: skipping metrics line that is not a JSON object")
                continue
            records.append(rec)
    return records


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


def perplexity_key(keys: Iterable[str], preferred: str = PPL_DEFAULT) -> Optional[str]:
    """The validation-perplexity key: `preferred` if logged, else the first (sorted) key that
    looks like a validation perplexity ("val.../perplexity", e.g. "val/c4/perplexity")."""
    keys = set(keys)
    if preferred in keys:
        return preferred
    cands = sorted(k for k in keys if re.search(r"(^|/)val[^/]*(/.*)?/perplexity$", k)
                   or re.fullmatch(r"val[^/]*_perplexity", k))
    return cands[0] if cands else None


def _load_yaml(path: Path) -> Any:
    from omegaconf import OmegaConf
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def read_overrides(run_dir: Path) -> List[str]:
    p = run_dir / ".hydra" / "overrides.yaml"
    if not p.is_file():
        return []
    try:
        data = _load_yaml(p)
    except Exception as e:  # noqa: BLE001 - a broken file must not stop the summary
        warnings.warn(f"{p}: cannot read overrides ({e})")
        return []
    return [str(x) for x in data] if isinstance(data, list) else []


def _hydra_choices(run_dir: Path) -> Dict[str, Any]:
    """Config-group choices of the job (`.hydra/hydra.yaml` -> hydra.runtime.choices)."""
    p = run_dir / ".hydra" / "hydra.yaml"
    if not p.is_file():
        return {}
    try:
        hy = _load_yaml(p)
        choices = hy.get("hydra", {}).get("runtime", {}).get("choices", {})
        return choices if isinstance(choices, dict) else {}
    except Exception as e:  # noqa: BLE001 - a broken file must not stop the summary
        warnings.warn(f"{p}: cannot read hydra config ({e})")
        return {}


def _dataset_name(run_dir: Path, experiment: Optional[str], choices: Dict[str, Any]) -> Optional[str]:
    """Dataset label: the job's `data` group choice (c4, c4_sample, gutenberg, slimpajama, ...),
    else `data.source` from the saved job config, else the experiment name's prefix."""
    if isinstance(choices.get("data"), str):
        return choices["data"]
    p = run_dir / ".hydra" / "config.yaml"
    if p.is_file():
        try:
            cfg = _load_yaml(p)
            data = cfg.get("data") if isinstance(cfg, dict) else None
            if isinstance(data, dict) and isinstance(data.get("source"), str):
                return data["source"]
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"{p}: cannot read config ({e})")
    if experiment:
        m = re.match(r"(c4|slimpajama|pes2o|thestack)_", experiment)
        if m:
            return m.group(1)
    return None


def read_model_config(run_dir: Path) -> Optional[Dict[str, Any]]:
    """model_config.json of the newest checkpoint that has one."""
    from .checkpoint import find_checkpoints
    for ckpt in reversed(find_checkpoints(run_dir)):
        p = Path(ckpt) / "model_config.json"
        if p.is_file():
            try:
                with open(p, encoding="utf-8") as f:
                    return json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                warnings.warn(f"{p}: unreadable model config ({e}); trying an older checkpoint")
    return None


def count_params(model_config: Dict[str, Any]) -> Optional[int]:
    """Total parameters: moeut.compute.total_params, the exact count of the model built on the meta
    device (no memory, no initialisation)."""
    from .registry import config_from_dict
    try:
        cfg = config_from_dict(model_config)
    except (ValueError, TypeError) as e:
        warnings.warn(f"model config not understood ({e}); parameter count left empty")
        return None
    try:
        from .compute import total_params
        return int(total_params(cfg))
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"cannot count parameters for arch {model_config.get('arch')!r}: {e}")
        return None


# moeut.evaluate's paper-table tasks, in the table's order (moeut/eval/table.py)
_EVAL_TASKS = ("lambada", "blimp", "cbt", "hellaswag", "piqa", "arc_easy", "arc_challenge")


def _is_moeut_eval(data: Any) -> bool:
    """A results file written by `python -m moeut.evaluate` (moeut/eval/zeroshot.py)."""
    return isinstance(data, dict) and isinstance(data.get("tasks"), dict) and "table_row" in data


def _is_lm_eval(data: Any) -> bool:
    """An lm-evaluation-harness results file: {"results": {task: {"acc,none": v, ...}}, ...}."""
    return (isinstance(data, dict) and isinstance(data.get("results"), dict)
            and all(isinstance(v, dict) for v in data["results"].values()))


def read_eval(run_dir: Path) -> Dict[str, Any]:
    """Evaluation numbers of a run from `<run>/eval/*.json`.

    - `python -m moeut.evaluate` results (`results_step_XXXXXXX.json`): the newest step's file
      gives `eval/<task>` = the task's table accuracy (a fraction), or "skipped" when the task
      was asked for but had no data; `eval/text_ppl` and `eval/bits_per_byte` for the
      perplexity task; `eval_step` and `eval_limit` (null = every item) say what was evaluated.
    - lm-evaluation-harness results: `lm_eval/<task>/<metric>` (metric without lm-eval's
      ",none" filter suffix; stderr entries dropped).
    - Any other JSON in eval/ is ignored with a warning naming the file.
    """
    out: Dict[str, Any] = {}
    eval_dir = run_dir / "eval"
    if not eval_dir.is_dir():
        return out
    ours = []
    for p in sorted(eval_dir.glob("*.json")):
        try:
            with open(p, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            warnings.warn(f"{p}: skipping unreadable evaluation file ({e})")
            continue
        if _is_moeut_eval(data):
            step = data.get("step")
            ours.append((step if isinstance(step, int) else -1, p.stat().st_mtime, data))
        elif _is_lm_eval(data):
            for task, metrics in data["results"].items():
                for k, v in metrics.items():
                    name = str(k).split(",", 1)[0]
                    if _is_number(v) and not name.endswith("_stderr"):
                        out[f"lm_eval/{task}/{name}"] = v
        else:
            warnings.warn(f"{p}: not a moeut.evaluate or lm-eval results file; ignored by the summary")
    if ours:
        _, _, data = max(ours, key=lambda t: (t[0], t[1]))
        out["eval_step"] = data.get("step")
        out["eval_limit"] = (data.get("options") or {}).get("limit")
        tasks = data["tasks"]
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


def summarize_run(run_dir: os.PathLike, sweep_dir: os.PathLike, ppl_key: str = PPL_DEFAULT) -> RunSummary:
    run_dir, sweep_dir = Path(run_dir), Path(sweep_dir)
    rel = run_dir.relative_to(sweep_dir).as_posix() if run_dir != sweep_dir else run_dir.name
    row: Dict[str, Any] = {"run": rel}

    overrides = read_overrides(run_dir)
    choices = _hydra_choices(run_dir)
    experiment = next((o.split("=", 1)[1] for o in overrides
                       if o.split("=", 1)[0].lstrip("+~") == "experiment"), None)
    if experiment is None and isinstance(choices.get("experiment"), str):
        experiment = choices["experiment"]  # the config's default experiment
    row["experiment"] = experiment
    row["overrides"] = " ".join(o for o in overrides if not o.startswith("experiment="))
    row["dataset"] = _dataset_name(run_dir, experiment, choices)

    metrics_path = run_dir / "metrics.jsonl"
    records = read_metrics(metrics_path) if metrics_path.is_file() else []
    last = last_values(records)
    steps = [r["step"] for r in records if _is_number(r.get("step"))]
    row["step"] = int(max(steps)) if steps else None
    key = perplexity_key(last, ppl_key)
    row["val_ppl"] = last.get(key) if key else None
    if key:
        vals = [r[key] for r in records if _is_number(r.get(key))]
        row["best_val_ppl"] = min(vals) if vals else None
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

def summarize_sweep(sweep_dir: os.PathLike, ppl_key: str = PPL_DEFAULT) -> List[Dict[str, Any]]:
    runs = find_runs(sweep_dir)
    if not runs:
        raise FileNotFoundError(f"no runs under {sweep_dir}: expected sub-directories with a "
                                "metrics.jsonl or a checkpoints/ folder")
    return [summarize_run(r, sweep_dir, ppl_key).row for r in runs]


def table_columns(rows: Sequence[Dict[str, Any]]) -> List[str]:
    present = set().union(*(r.keys() for r in rows)) if rows else set()
    lead = [c for c in LEAD_COLUMNS if c in present]
    rest = sorted(present - set(lead) - {"overrides"})
    # evaluation numbers after the training metrics; overrides last (long)
    is_eval = lambda c: c.startswith(("eval/", "eval_", "lm_eval/"))  # noqa: E731
    rest = [c for c in rest if not is_eval(c)] + [c for c in rest if is_eval(c)]
    return lead + rest + (["overrides"] if "overrides" in present else [])


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.4g}"
        return f"{v:.2f}" if abs(v) >= 1 else f"{v:.4f}"
    if isinstance(v, int) and abs(v) >= 10**6:
        return f"{v / 1e6:.2f}M"
    return str(v)


def to_markdown(rows: Sequence[Dict[str, Any]], columns: Optional[Sequence[str]] = None) -> str:
    columns = list(columns or [c for c in table_columns(rows)
                               if c in LEAD_COLUMNS or c.startswith(("eval/", "eval_", "lm_eval/"))])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Dict[str, Any]], path: os.PathLike) -> None:
    columns = table_columns(rows)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})


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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
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
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
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
    groups = g_ablation_groups(rows)
    if not groups:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for (dataset, d, L, K, ln), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        label = f"d={d}, L={L}" + (f", {dataset}" if dataset else "")
        ax.plot([r["G"] for r in rs], [r["val_ppl"] for r in rs], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("group size G (distinct layers)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Group-size ablation")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return True


def write_summary(sweep_dir: os.PathLike, out_dir: Optional[os.PathLike] = None,
                  ppl_key: str = PPL_DEFAULT, plots: bool = True) -> Dict[str, Any]:
    """Gather, write summary.csv/summary.md and the plots; returns rows and written paths."""
    rows = summarize_sweep(sweep_dir, ppl_key)
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"csv": out / "summary.csv", "markdown": out / "summary.md"}
    write_csv(rows, written["csv"])
    md = to_markdown(rows)
    written["markdown"].write_text(f"# Sweep summary: {Path(sweep_dir).resolve().name}\n\n{md}",
                                   encoding="utf-8")
    if plots:
        if plot_ppl_vs_params(rows, out / "ppl_vs_params.png"):
            written["ppl_vs_params"] = out / "ppl_vs_params.png"
        if plot_g_ablation(rows, out / "g_ablation.png"):
            written["g_ablation"] = out / "g_ablation.png"
    return {"rows": rows, "markdown": md, "files": written}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moeut.summary", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", help="a sweep directory (or one run dir)")
    ap.add_argument("--out", default=None, help="where to write summary.{csv,md} and plots "
                                                "(default: the sweep dir)")
    ap.add_argument("--metric", default=PPL_DEFAULT,
                    help=f"validation perplexity key in metrics.jsonl (default {PPL_DEFAULT}; "
                         "falls back to the first val*/perplexity key)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = ap.parse_args(argv)
    try:
        res = write_summary(args.sweep_dir, args.out, args.metric, plots=not args.no_plots)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(res["markdown"], end="")
    print(f"\n{len(res['rows'])} run(s); wrote " + ", ".join(str(p) for p in res["files"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
