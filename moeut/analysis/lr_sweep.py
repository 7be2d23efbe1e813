"""`python -m moeut.analysis lr-sweep`: the learning-rate stability table of sweeps/lr_stability.yaml.

Reads every run dir under `dir` (and any `extra_dirs`), each identified by its composed config
(.hydra/config.yaml: optim.lr, train.seed, train.steps) and its `experiment=` override, and prints
validation perplexity per model x lr x seed, each model's best lr and whether it lies inside the
grid, the MoEUT / dense ratios per lr and at each model's best, and whether its targets are met
(docs/results.md, "Learning-rate stability sweep"). A run that has not
reached train.steps is listed with the last step it reached and never enters a best or a ratio;
a configuration with no run reads "not yet measured".

`adopt=<dir>` first copies recorded runs (e.g. docs/results_runs/) into the sweep dir: a recorded
run is copied into a job's run dir only when its composed training config equals the job's
(logger.group aside) and the job's run dir has no metrics.jsonl yet; the copy gets ADOPTED.txt
naming its source. A local launch of the sweep then skips it as finished (moeut.sweep).
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from moeut.cli import check_out_file, option, typed_tool

PAPER, OPTIONS, DENSE = "cpu_result_moeut", "cpu_result_moeut_options", "cpu_result_dense_params"
LABELS = {PAPER: "MoEUT (paper)", OPTIONS: "MoEUT + best options", DENSE: "dense (param-matched)"}
APP = "moeut.analysis lr-sweep"
DENSE_TRAINS = 2.0  # dense "trains" at an lr when its val PPL is at most this factor above its best
TARGET_RATIO = 0.85  # the sweep's target (docs/results.md): MoEUT+options best <= 0.85 x dense best, both seeds


@dataclass
class Run:
    """One run dir: its experiment, lr, seed, schedule length, last step reached and final
    validation perplexity (None until the run has validated at train.steps)."""
    path: Path
    experiment: str
    lr: float
    seed: int
    steps: int
    last_step: int
    ppl: Optional[float]


def _overrides(run_dir: Path) -> List[str]:
    import yaml
    p = run_dir / ".hydra" / "overrides.yaml"
    return list(yaml.safe_load(p.read_text()) or []) if p.is_file() else []


def read_run(run_dir: Path) -> Optional[Run]:
    """The Run of `run_dir`, or None when it is no training run dir (no .hydra/config.yaml or no
    `experiment=` override). The final perplexity is `validation/val/perplexity` at train.steps.
    Raises ValueError naming the file when config.yaml lacks optim.lr / train.seed / train.steps."""
    import yaml
    from moeut.rundir import TruncatedLineWarning, read_jsonl

    cfg_path = run_dir / ".hydra" / "config.yaml"
    exp = next((o.split("=", 1)[1] for o in _overrides(run_dir) if o.split("=", 1)[0].lstrip("+") == "experiment"), None)
    if not cfg_path.is_file() or exp is None:
        return None
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    try:
        lr, seed, steps = float(cfg["optim"]["lr"]), int(cfg["train"]["seed"]), int(cfg["train"]["steps"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: no optim.lr / train.seed / train.steps ({e})") from e
    last, ppl = 0, None
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncatedLineWarning)
            for rec in read_jsonl(metrics).records:
                s = int(rec.get("step", 0))
                last = max(last, s)
                if s == steps and "validation/val/perplexity" in rec:
                    ppl = float(rec["validation/val/perplexity"])
    return Run(run_dir, exp, lr, seed, steps, last, ppl)


# Overrides that identify a run in the table (experiment, lr, seed, schedule length) or change
# nothing it measures (threads, logging cadence, wandb grouping, an early stop, Hydra's own).
KEY_OVERRIDES = {"experiment", "optim.lr", "train.seed", "train.steps"}
NEUTRAL_OVERRIDES = {"train.threads", "train.routing_interval", "train.routing_every", "train.log_interval",
                     "logger.group", "logger.name", "train.stop_at", "train.resume"}


def other_overrides(run_dir: Path) -> List[str]:
    """The overrides of `run_dir` beyond those that identify it in the table or change nothing it
    measures (KEY_OVERRIDES, NEUTRAL_OVERRIDES, hydra.*): e.g. `model.router_zloss=0.01`. A run
    with any is another configuration than its experiment's and is left out of the table."""
    out = []
    for o in _overrides(run_dir):
        key = o.split("=", 1)[0].lstrip("+~")
        if key in KEY_OVERRIDES or key in NEUTRAL_OVERRIDES or key.startswith("hydra") or "=" not in o:
            continue
        out.append(o)
    return out


def collect(dirs: List[Path], say=print) -> List[Run]:
    """Every run directly under each of `dirs` (sorted). A run with overrides beyond its
    experiment's (`other_overrides`) is left out with a line naming them. Raises FileNotFoundError
    naming a missing dir or a dir with no run in it, and ValueError naming both run dirs when two
    runs share (experiment, lr, seed, steps)."""
    runs: List[Run] = []
    seen: Dict[Tuple, Path] = {}
    for d in dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"dir={d}: no such directory")
        found = 0
        for sub in sorted(p for p in d.iterdir() if p.is_dir()):
            run = read_run(sub)
            if run is None:
                continue
            found += 1
            extra = other_overrides(sub)
            if extra:
                say(f"left out {sub}: overrides beyond experiment={run.experiment}: {' '.join(extra)} "
                    "(another configuration than the table's rows)")
                continue
            key = (run.experiment, run.lr, run.seed, run.steps)
            if key in seen:
                raise ValueError(f"{sub} and {seen[key]}: the same configuration twice (experiment={run.experiment}, "
                                 f"optim.lr={run.lr:g}, train.seed={run.seed}, train.steps={run.steps})")
            seen[key] = sub
            runs.append(run)
        if not found:
            raise FileNotFoundError(f"dir={d}: no training run dirs in it (sub-folders with .hydra/config.yaml and an "
                                    f"experiment= override); is it the sweep dir <root>/<sweep name>?")
    return runs


def _fmt(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.1f}"


def best_lr(ppl_by_lr: Dict[float, Optional[float]], grid: List[float]) -> Tuple[Optional[float], str]:
    """(best lr, verdict) of one model and seed over `grid`: the lr of the lowest finite
    perplexity, and "inside" / "at the low edge" / "at the high edge" of the grid, or
    "not yet measured" (best None) while any grid lr has no finished run."""
    if any(ppl_by_lr.get(lr) is None for lr in grid):
        return None, "not yet measured"
    finite = {lr: p for lr, p in ppl_by_lr.items() if lr in grid and math.isfinite(p)}
    if not finite:
        return None, "no finite perplexity"
    lr = min(finite, key=finite.get)
    return lr, ("at the low edge" if lr == min(grid) else "at the high edge" if lr == max(grid) else "inside")


def report(runs: List[Run], grid: List[float], seeds: List[int], steps: int) -> Tuple[str, Dict[str, Any]]:
    """The markdown report and its numbers ({"ppl": {(exp, lr, seed): ppl}, "best": {(exp, seed):
    (lr, verdict)}, "targets": {name: verdict}}) for the runs of `steps` steps over `grid` x `seeds`."""
    ppl: Dict[Tuple[str, float, int], Optional[float]] = {}
    status: Dict[Tuple[str, float, int], str] = {}
    for r in runs:
        if r.steps != steps:
            continue
        key = (r.experiment, r.lr, r.seed)
        ppl[key] = r.ppl
        status[key] = "" if r.ppl is not None else f"running/stopped at step {r.last_step}"
    models = [m for m in (PAPER, OPTIONS, DENSE) if m in {k[0] for k in ppl}]
    models += sorted({k[0] for k in ppl} - set(models))
    lines = [f"### Validation perplexity (books) after {steps} steps", "",
             "| model | seed | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | best lr | best |",
             "|---|---|" + "---|" * len(grid) + "---|---|"]
    best: Dict[Tuple[str, int], Tuple[Optional[float], str]] = {}
    for m in list(dict.fromkeys([PAPER, OPTIONS, DENSE] + models)):
        for s in seeds:
            row = {lr: ppl.get((m, lr, s)) for lr in grid}
            best[(m, s)] = best_lr(row, grid)
            cells = []
            for lr in grid:
                key = (m, lr, s)
                cells.append(_fmt(ppl[key]) if ppl.get(key) is not None else
                             (status[key] if key in status else "not yet measured"))
            b_lr, verdict = best[(m, s)]
            lines.append(f"| {LABELS.get(m, m)} | {s} | " + " | ".join(cells) + " | "
                         + (f"{b_lr:g} ({verdict})" if b_lr is not None else verdict) + " | "
                         + (_fmt(row[b_lr]) if b_lr is not None else "–") + " |")
    lines += ["", "### MoEUT / dense", "", "| model | seed | " + " | ".join(f"lr {lr:g}" for lr in grid)
              + " | best / best |", "|---|---|" + "---|" * len(grid) + "---|"]
    ratio_best: Dict[Tuple[str, int], Optional[float]] = {}
    for m in (PAPER, OPTIONS):
        for s in seeds:
            cells = []
            for lr in grid:
                a, d = ppl.get((m, lr, s)), ppl.get((DENSE, lr, s))
                cells.append(f"{a / d:.3f}" if a is not None and d is not None else "not yet measured")
            bm, bd = best[(m, s)][0], best[(DENSE, s)][0]
            rb = ppl[(m, bm, s)] / ppl[(DENSE, bd, s)] if bm is not None and bd is not None else None
            ratio_best[(m, s)] = rb
            lines.append(f"| {LABELS[m]} | {s} | " + " | ".join(cells) + " | "
                         + (f"{rb:.3f}" if rb is not None else "not yet measured") + " |")
    # --- the targets -----------------------------------------------------------------------
    targets: Dict[str, str] = {}
    verdicts = [best[(m, s)][1] for m in (PAPER, OPTIONS, DENSE) for s in seeds]
    if all(v == "inside" for v in verdicts):
        targets["every best lr inside the grid"] = "met"
    elif any(v in ("at the low edge", "at the high edge", "no finite perplexity") for v in verdicts):
        bad = [f"{LABELS[m]} seed {s}: {best[(m, s)][1]}" for m in (PAPER, OPTIONS, DENSE) for s in seeds
               if best[(m, s)][1] in ("at the low edge", "at the high edge", "no finite perplexity")]
        targets["every best lr inside the grid"] = "NOT met (" + "; ".join(bad) + ")"
    else:
        targets["every best lr inside the grid"] = "not yet measured"
    worse, pending = [], False
    for s in seeds:
        bd = best[(DENSE, s)][0]
        for lr in grid:
            a, d = ppl.get((OPTIONS, lr, s)), ppl.get((DENSE, lr, s))
            if d is not None and bd is not None and d > DENSE_TRAINS * ppl[(DENSE, bd, s)]:
                continue  # dense does not train at this lr
            if a is None or d is None or bd is None:
                pending = True
            elif a > d:
                worse.append(f"lr {lr:g} seed {s}: {a:.1f} > {d:.1f}")
    targets["MoEUT + options no worse than dense wherever dense trains"] = (
        "NOT met (" + "; ".join(worse) + ")" if worse else "not yet measured" if pending else "met")
    rbs = [ratio_best[(OPTIONS, s)] for s in seeds]
    targets[f"MoEUT + options best <= {TARGET_RATIO} x dense best, every seed"] = (
        "not yet measured" if any(r is None for r in rbs) else
        "met" if all(r <= TARGET_RATIO for r in rbs) else
        "NOT met (" + ", ".join(f"{r:.3f}" for r in rbs) + ")")
    lines += ["", "### Targets", ""] + [f"- {name}: **{v}**" for name, v in targets.items()]
    return "\n".join(lines) + "\n", {"ppl": ppl, "best": best, "ratio_best": ratio_best, "targets": targets}


# ------------------------------------------------------------------------------------------
# Early routing: the first steps of any runs (screens stopped early included)
# ------------------------------------------------------------------------------------------

EARLY_WINDOW = 30  # training CE is averaged over the logged steps in (s - 30, s]


def early_run_dirs(paths: List[Path]) -> List[Path]:
    """The run dirs `paths` name: a path holding metrics.jsonl is one; any other folder gives each of
    its sub-folders that holds one (sorted). Raises FileNotFoundError naming a missing path or a
    folder with no run in it."""
    out: List[Path] = []
    for p in paths:
        if not p.is_dir():
            raise FileNotFoundError(f"early: {p}: no such directory")
        if (p / "metrics.jsonl").is_file():
            out.append(p)
            continue
        subs = sorted(d for d in p.iterdir() if (d / "metrics.jsonl").is_file())
        if not subs:
            raise FileNotFoundError(f"early: {p}: no metrics.jsonl in it or in its sub-folders")
        out += subs
    return out


def early_rows(run_dir: Path, steps: List[int]) -> Dict[int, Dict[str, Optional[float]]]:
    """Per step s of `steps`: "ce" = mean train/ce over the records in (s - EARLY_WINDOW, s] (None
    unless every 10-step record of that window is there), and at step s itself the MLP expert-usage
    perplexity / E of each unique layer ("g0", "g1", ...: moe/g<i>/usage_rel_ppl) and the dead-expert
    fraction over all layers (moe/dead_frac_all); None where the run has no such record."""
    from moeut.rundir import TruncatedLineWarning, read_jsonl
    by_step: Dict[int, Dict[str, Any]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncatedLineWarning)
        for rec in read_jsonl(run_dir / "metrics.jsonl").records:
            by_step.setdefault(int(rec.get("step", 0)), {}).update(rec)
    out = {}
    for s in steps:
        window = [by_step[t]["train/ce"] for t in range(s - EARLY_WINDOW + 10, s + 1, 10)
                  if "train/ce" in by_step.get(t, {})]
        rec = by_step.get(s, {})
        row: Dict[str, Optional[float]] = {"ce": sum(window) / len(window) if len(window) == EARLY_WINDOW // 10 else None,
                                            "dead": rec.get("moe/dead_frac_all")}
        for k, v in rec.items():
            if k.startswith("moe/g") and k.endswith("/usage_rel_ppl"):
                row[k.split("/")[1]] = v
        out[s] = row
    return out


def early_report(run_dirs: List[Path], steps: List[int]) -> str:
    """The markdown table of `early_rows` for every run dir (one row each, labelled by its folder
    name), one column group per step: CE (30-step mean), MLP usage ppl / E per unique layer, dead %."""
    rows = {d: early_rows(d, steps) for d in run_dirs}
    groups = sorted({k for r in rows.values() for row in r.values() for k in row if k.startswith("g")},
                    key=lambda g: int(g[1:]))
    f = lambda x, spec: "–" if x is None else format(x, spec)  # noqa: E731
    head = "| run | " + " | ".join(f"step {s}: CE, usage/E {' '.join(groups)}, dead" for s in steps) + " |"
    lines = [f"### Early routing (CE: mean over the {EARLY_WINDOW} steps up to each step; MLP expert-usage "
             "perplexity / E per unique layer; dead-expert fraction)", "", head, "|---|" + "---|" * len(steps)]
    for d, r in rows.items():
        cells = [f"{f(r[s]['ce'], '.3f')}, {' '.join(f(r[s].get(g), '.2f') for g in groups) or '–'}, "
                 f"{f(r[s]['dead'], '.2f')}" for s in steps]
        lines.append(f"| {d.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------
# Adopting recorded runs whose configuration is the job's
# ------------------------------------------------------------------------------------------

def _training_config(overrides: List[str]) -> Dict[str, Any]:
    """The composed training config (unresolved, as a plain dict) of train.py `overrides`, without
    logger.group (wandb grouping only)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from moeut.cli import CONF_DIR
    from moeut.train_lib.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        composed = compose(config_name="config",
                           overrides=[o for o in overrides if not o.startswith("logger.group=")])
    cfg = OmegaConf.to_container(composed, resolve=False)
    cfg.get("logger", {}).pop("group", None)
    return cfg


def adopt(sweep_file: Path, sweep_dir: Path, recorded: Path, say=print) -> List[Tuple[Path, Path]]:
    """Copy every run of `recorded` whose composed config equals a job's of `sweep_file` into that
    job's run dir under `sweep_dir` (metrics.jsonl, train.log, .hydra/, plus ADOPTED.txt naming the
    source), unless the job's run dir already has a metrics.jsonl. Returns [(source, destination)].
    Raises FileNotFoundError naming a missing `recorded` dir."""
    from moeut import sweep as sw

    if not recorded.is_dir():
        raise FileNotFoundError(f"adopt={recorded}: no such directory")
    sweep = sw.load_sweep(sweep_file)
    jobs = sw.compose_jobs(sweep, root=str(sweep_dir.parent), local=True)
    if sweep_dir.name != sweep.name:
        raise ValueError(f"dir={sweep_dir}: the sweep dir of {sweep_file} must be named {sweep.name}")
    job_cfgs = [(job, _training_config(job.overrides)) for job in jobs]
    done = []
    for src in sorted(p for p in recorded.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()):
        cfg = _training_config(_overrides(src))
        for job, jcfg in job_cfgs:
            if cfg != jcfg:
                continue
            dst = Path(job.run_dir)
            if (dst / "metrics.jsonl").exists():
                say(f"adopt: {dst.name} already has a metrics.jsonl; {src} not copied")
                break
            dst.mkdir(parents=True, exist_ok=True)
            for name in ("metrics.jsonl", "train.log"):
                if (src / name).is_file():
                    shutil.copy2(src / name, dst / name)
            shutil.copytree(src / ".hydra", dst / ".hydra", dirs_exist_ok=True)
            (dst / "ADOPTED.txt").write_text(
                f"Copied from {src.resolve()} by `python -m moeut.analysis lr-sweep adopt=...`: its composed "
                f"training config equals this job's ({' '.join(job.overrides)}), logger.group aside.\n")
            say(f"adopt: {src.name} -> {dst}")
            done.append((src, dst))
            break
    return done


# ------------------------------------------------------------------------------------------
# The tool
# ------------------------------------------------------------------------------------------

@dataclass
class LrSweepOptions:
    """Options of `python -m moeut.analysis lr-sweep`."""
    dir: Optional[str] = option(None, help="the sweep dir (e.g. outputs/sweeps/lr_stability); needed "
                                "unless `early` is given")
    extra_dirs: List[str] = option(default_factory=list, help="more folders of run dirs to read")
    lrs: List[float] = option(default_factory=lambda: [5e-4, 1e-3, 2e-3, 4e-3], lo=0, lo_open=True,
                              help="the learning-rate grid")
    seeds: List[int] = option(default_factory=lambda: [0, 1], help="the seeds of the grid")
    steps: int = option(610, lo=1, help="train.steps of the runs the table compares")
    adopt: Optional[str] = option(None, help="first copy recorded runs with the same config from this folder")
    sweep: str = option("lr_stability", help="the sweep file (name in sweeps/ or path) adopt matches against")
    out: Optional[str] = option(None, help="also write the report (markdown) and numbers (json) to <out>.md/.json")
    early: List[str] = option(default_factory=list, help="also tabulate the first steps of these runs (run dirs, or "
                              "folders of run dirs; runs stopped early with train.stop_at included): CE, MLP "
                              "expert usage per unique layer, dead experts")
    early_steps: List[int] = option(default_factory=lambda: [40, 60, 100, 150], lo=30,
                                    help="the steps of the early table (multiples of 10, the logging interval; from 30, the CE window)")


def work(o: LrSweepOptions) -> Dict[str, Any]:
    """Adopt (when asked), then print the report; returns its numbers."""
    from moeut import sweep as sw
    from moeut.cli import bad_input_exits
    with bad_input_exits(APP):  # bad input: one line, exit 1, nothing written
        check_out_file(o.out, "out", prefix=True)
        if o.dir is None and not o.early:
            raise ValueError("dir: required (the sweep dir), unless early=[...] names runs to tabulate")
        bad = [s for s in o.early_steps if s % 10]
        if bad:
            raise ValueError(f"early_steps: {bad} not multiples of 10 (metrics are logged every 10 steps)")
        if o.early and not o.early_steps:
            raise ValueError("early_steps: empty; give at least one step, e.g. early_steps=[40,60,100]")
        early_dirs = early_run_dirs([Path(x) for x in o.early])
    if o.dir is None:
        text = early_report(early_dirs, list(o.early_steps))
        print(text, end="")
        if o.out:
            Path(o.out).parent.mkdir(parents=True, exist_ok=True)
            Path(f"{o.out}.md").write_text(text)
            Path(f"{o.out}.json").write_text(json.dumps(
                {d.name: {str(k): v for k, v in early_rows(d, list(o.early_steps)).items()} for d in early_dirs}, indent=1))
        return {"early": text}
    sweep_dir = Path(o.dir)
    with bad_input_exits(APP):
        for opt, d in [("dir", sweep_dir), ("adopt", Path(o.adopt) if o.adopt else None),
                       *[("extra_dirs", Path(x)) for x in o.extra_dirs]]:
            if d is not None and not d.is_dir():
                raise FileNotFoundError(f"{opt}={d}: no such directory")
        sweep_file = sw.resolve_sweep_path(o.sweep) if o.adopt else None
    with bad_input_exits(APP):
        if o.adopt:
            adopt(sweep_file, sweep_dir.resolve(), Path(o.adopt))
        runs = collect([sweep_dir, *map(Path, o.extra_dirs)], say=lambda m: print(m, file=sys.stderr))
    text, numbers = report(runs, list(o.lrs), list(o.seeds), o.steps)
    if early_dirs:
        text += "\n" + early_report(early_dirs, list(o.early_steps))
    print(text, end="")
    if o.out:
        Path(o.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{o.out}.md").write_text(text)
        Path(f"{o.out}.json").write_text(json.dumps(
            {"ppl": [[k[0], k[1], k[2], v] for k, v in numbers["ppl"].items()], "targets": numbers["targets"]},
            indent=1))
    return numbers


main = typed_tool(APP, LrSweepOptions,
                  summary="The learning-rate stability table (sweeps/lr_stability.yaml): val PPL per model x lr x seed, "
                          "best lr and whether it is inside the grid, MoEUT/dense ratios, whether the targets are met.",
                  usage="python -m moeut.analysis lr-sweep dir=SWEEP_DIR [adopt=docs/results_runs] [out=STEM] [early=[RUN_DIR,...]]",
                  notes="A run that has not reached train.steps never enters a best or a ratio.")(work)
