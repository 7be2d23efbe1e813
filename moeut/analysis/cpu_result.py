"""Tables and figures of docs/results.md from the runs of `sweeps/cpu_result.yaml`.

    python -m moeut.sweep ... cpu_result (see the sweep file) ; then
    python -m moeut.analysis cpu-result root=outputs/sweeps/cpu_result out=docs/figures/cpu_result \
        doc=docs/results.md     # optional: also rewrite the page's report:start/end block

Reads each run's metrics.jsonl (through `moeut.rundir`) and prints, as markdown:
  * one row per run: model, steps, lr, seed, warm-up, final held-out-books / C4 perplexity (or the
    last step reached when the run has not finished: such rows are marked and never used in a ratio),
  * the budget curve (final perplexity of each complete schedule vs training tokens) with the
    MoEUT / dense ratio at each budget, and each model's best learning rate at 610 steps,
  * the seed spread at 610 steps, and every 610-step run's validation perplexity at each
    validation step (unfinished runs included: the only place they appear with numbers).
Writes <out>_budget.png (budget curve: final points of each schedule, plus the intermediate
validation points of the 610-step runs), <out>_stall.png (the first 200 steps of the MoEUT runs by
learning rate, seed and warm-up: training CE, expert-usage perplexity, dead experts, selected gate
values, the entropy regulariser and the gradient norm; routing metrics are logged every 10 steps by
the sweep) and <out>_runs.png (every 610-step run's training CE and validation perplexity).
Tables are laid out by moeut.analysis.tables, figures by moeut.analysis.style; the held-out-books
perplexity is the run's validation perplexity by moeut.rundir's rule (`val_ppl_curve`).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from ..cli import bad_input_exits, check_out_file, option, typed_tool
from ..rundir import RunDir, val_ppl_curve
from . import style, tables

C4_KEY = "validation/c4/perplexity"  # the sweep's second validation set (a C4 sample)

TOKENS_PER_STEP = 16 * 256
ROWS = {"cpu_result_moeut": "MoEUT", "cpu_result_dense_params": "dense (param-matched)",
        "cpu_result_dense_macs": "dense (MAC-matched)"}
DEFAULTS = {"train.steps": "610", "optim.lr": "0.002", "train.seed": "0", "optim.warmup": "30"}


def job_overrides(name: str) -> Dict[str, str]:
    """The overrides a sweep job directory is named by (Hydra's override_dirname), with the
    experiment defaults filled in. Raises ValueError for a directory not named like a sweep job."""
    if not name.startswith("experiment="):
        raise ValueError(f"{name}: not a sweep job directory (expected experiment=...)")
    out = dict(DEFAULTS)
    for part in re.split(r",(?=[a-z_.]+=)", name):
        k, v = part.split("=", 1)
        out[k] = v
    out["optim.lr"] = f"{float(out['optim.lr']):g}"
    return out


def collect(root: str) -> List[Dict]:
    """One dict per job directory under `root`: overrides, final/last validation, curve points,
    the training records (step -> record) and whether the schedule completed."""
    runs = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not os.path.isfile(os.path.join(path, "metrics.jsonl")):
            continue
        ov = job_overrides(name)
        records = RunDir(path).metrics()
        steps = int(ov["train.steps"])
        key = val_ppl_curve(records)[0]  # moeut.rundir's rule: validation/val/perplexity, the held-out books
        val = [(r["step"], r[key], r.get(C4_KEY)) for r in records if key in r] if key else []
        train = {}
        for r in records:
            train.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k not in ("step", "time")})
        last_step = max(train) if train else 0
        done = bool(val) and val[-1][0] == steps
        runs.append({"name": name, "path": path, "row": ROWS.get(ov["experiment"], ov["experiment"]),
                     "experiment": ov["experiment"], "steps": steps, "lr": ov["optim.lr"],
                     "seed": ov["train.seed"], "warmup": ov["optim.warmup"], "val": val,
                     "train": train, "last_step": last_step, "done": done})
    return runs


def _md(header: Sequence[str], rows: List[List[str]]) -> str:
    """A markdown table (moeut.analysis.tables) without its final newline."""
    return tables.to_markdown(header, rows).rstrip("\n")


def fmt(x: Optional[float]) -> str:
    """A perplexity cell: one decimal; "–" for None or NaN."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def final(run) -> Optional[float]:
    """The run's last validation perplexity when its schedule completed, else None."""
    return run["val"][-1][1] if run["done"] else None


def table(runs: List[Dict]) -> str:
    """Markdown: one row per run (model, steps, tokens, lr, warm-up, seed, final books/C4 perplexity, status)."""
    rows = []
    for r in sorted(runs, key=lambda r: (r["row"], r["steps"], float(r["lr"]), r["warmup"], r["seed"])):
        c4 = r["val"][-1][2] if r["done"] else None
        status = "complete" if r["done"] else f"not finished (stopped at step {r['last_step']})"
        rows.append([r["row"], str(r["steps"]), f"{r['steps'] * TOKENS_PER_STEP / 1e6:.2f}M", r["lr"], r["warmup"],
                     r["seed"], fmt(final(r)), fmt(c4), status])
    return _md(["model", "steps", "tokens", "lr", "warm-up", "seed", "val PPL (books)", "val PPL (C4)", "status"], rows)


def pick(runs, experiment, steps=610, lr="0.002", seed="0", warmup="30"):
    """The run of `experiment` with these settings (lr, seed, warm-up as the job names spell them), or None."""
    for r in runs:
        if (r["experiment"], r["steps"], r["lr"], r["seed"], r["warmup"]) == (experiment, steps, lr, seed, warmup):
            return r
    return None


def budget_table(runs) -> str:
    """Markdown: final perplexity of MoEUT and param-matched dense at 150/300/610 steps (lr 2e-3, seed 0),
    their ratio, and the crossover sentence."""
    rows = []
    for steps in (150, 300, 610):
        m, d = pick(runs, "cpu_result_moeut", steps), pick(runs, "cpu_result_dense_params", steps)
        pm, pd = final(m) if m else None, final(d) if d else None
        ratio = f"{pm / pd:.3f}" if pm and pd else "–"
        rows.append([str(steps), f"{steps * TOKENS_PER_STEP / 1e6:.2f}M", fmt(pm), fmt(pd), ratio])
    return (_md(["steps", "tokens", "MoEUT", "dense (param-matched)", "MoEUT / dense"], rows) + "\n\n"
            + crossover(runs))


def crossover(runs) -> str:
    """Where MoEUT's final perplexity drops below dense's along the budget curve (lr 2e-3, seed 0),
    said in one sentence from the finished budgets only."""
    pts = []
    for steps in (150, 300, 610):
        m, d = pick(runs, "cpu_result_moeut", steps), pick(runs, "cpu_result_dense_params", steps)
        if m and d and final(m) and final(d):
            pts.append((steps, final(m) / final(d)))
    if not pts:
        return "Crossover: no budget has both rows finished."
    budgets = ", ".join(str(s) for s, _ in pts)
    if all(r >= 1 for _, r in pts):
        return f"Crossover: none at the budgets measured ({budgets} steps): MoEUT is behind at every one."
    if all(r < 1 for _, r in pts):
        return f"Crossover: before {pts[0][0]} steps: MoEUT is ahead at every budget measured ({budgets} steps)."
    changes = [(s0, r0, s1, r1) for (s0, r0), (s1, r1) in zip(pts, pts[1:]) if (r0 >= 1) != (r1 >= 1)]
    if len(changes) > 1:
        ratios = ", ".join(f"{r:.3f} at {s}" for s, r in pts)
        return (f"Crossover: none that holds: the ratio changes side {len(changes)} times ({ratios} steps), "
                "so the budget is not what decides it.")
    s0, r0, s1, r1 = changes[0]
    who = "MoEUT overtakes dense" if r1 < 1 else "dense overtakes MoEUT"
    return f"Crossover: between {s0} and {s1} steps ({who}: ratio {r0:.3f} -> {r1:.3f})."


LRS = ("0.001", "0.002", "0.004")  # the learning-rate grid of the sweep's lr jobs


def finished_at_610(runs, experiment) -> Dict[str, Dict]:
    """lr -> the finished seed-0, warm-up-30, 610-step run of `experiment` at that lr (LRS only)."""
    return {lr: r for lr in LRS for r in [pick(runs, experiment, 610, lr)] if r and final(r)}


def best_at_610(runs, experiment):
    """The finished seed-0 610-step run of `experiment` with the lowest final perplexity over lr
    1e-3 / 2e-3 / 4e-3 (warm-up 30), or None."""
    done = finished_at_610(runs, experiment)
    return min(done.values(), key=final) if done else None


def best_lr_table(runs) -> str:
    """Markdown: each model's final perplexity at lr 1e-3/2e-3/4e-3 (610 steps, seed 0), its best, and the
    ratio of the two bests."""
    rows = []
    for exp in ("cpu_result_moeut", "cpu_result_dense_params"):
        done, best = finished_at_610(runs, exp), best_at_610(runs, exp)
        rows.append([ROWS[exp]] + [fmt(final(done[lr]) if lr in done else None) for lr in LRS]
                    + [f"{final(best):.1f} (lr {best['lr']})" if best else "–"])
    lines = [_md(["model", "lr 1e-3", "lr 2e-3", "lr 4e-3", "best"], rows)]
    m, d = best_at_610(runs, "cpu_result_moeut"), best_at_610(runs, "cpu_result_dense_params")
    ratio = f"{final(m) / final(d):.3f}" if m and d else "–"
    lines.append(f"\nMoEUT / dense, each at its best learning rate: **{ratio}** (best of "
                 f"{len(finished_at_610(runs, 'cpu_result_moeut'))} MoEUT and "
                 f"{len(finished_at_610(runs, 'cpu_result_dense_params'))} dense learning rates that finished; seed 0).")
    return "\n".join(lines)


def seed_table(runs) -> str:
    """Markdown: each model's final perplexity for seeds 0 and 1 (610 steps, lr 2e-3), mean and spread,
    and the MoEUT / dense ratio per seed."""
    rows = []
    for exp in ("cpu_result_moeut", "cpu_result_dense_params"):
        v = [final(r) for r in (pick(runs, exp, seed="0"), pick(runs, exp, seed="1")) if r and final(r)]
        mean = sum(v) / len(v) if v else None
        spread = f"{(max(v) - min(v)) / mean:.1%}" if len(v) == 2 else "–"
        rows.append([ROWS[exp]] + [fmt(x) for x in (v + [None, None])[:2]] + [fmt(mean), spread])
    lines = [_md(["model", "seed 0", "seed 1", "mean", "spread (max-min)/mean"], rows)]
    cells = []
    for seed in ("0", "1"):
        m, d = pick(runs, "cpu_result_moeut", seed=seed), pick(runs, "cpu_result_dense_params", seed=seed)
        cells.append(f"{final(m) / final(d):.3f}" if m and d and final(m) and final(d) else "–")
    lines.append(f"| MoEUT / dense | {cells[0]} | {cells[1]} | | |")  # the ratio line: no mean or spread
    return "\n".join(lines)


def curve_table(runs) -> str:
    """Held-out-books perplexity at every validation step of every 610-step run, finished or not
    (validation every 200 steps and at the end)."""
    steps = (200, 400, 600, 610)
    rows = []
    for r in sorted(runs, key=lambda r: (r["row"], float(r["lr"]), r["seed"])):
        if r["steps"] != 610:
            continue
        at = {s: p for s, p, _ in r["val"]}
        rows.append([r["row"], r["lr"], r["seed"]] + [fmt(at.get(s)) for s in steps])
    return _md(["model", "lr", "seed"] + [f"step {s}" for s in steps], rows)


def plot_budget(runs, out: str) -> None:
    """<out>_budget.png: the budget curve (each complete schedule's final perplexity vs tokens) and the
    610-step runs' intermediate validation points."""
    fig, ax = style.figure(figsize=(6.4, 4.2))
    for exp, color in (("cpu_result_moeut", "C0"), ("cpu_result_dense_params", "C1")):
        pts = [(s * TOKENS_PER_STEP, final(pick(runs, exp, s))) for s in (150, 300, 610)
               if pick(runs, exp, s) and final(pick(runs, exp, s))]
        if pts:
            ax.plot(*zip(*pts), "o-", color=color, label=f"{ROWS[exp]}: end of a complete schedule")
        full = pick(runs, exp, 610)
        if full and full["val"]:
            ax.plot([s * TOKENS_PER_STEP for s, _, _ in full["val"]], [p for _, p, _ in full["val"]], "x--",
                    color=color, alpha=0.6, label=f"{ROWS[exp]}: inside the 610-step schedule")
    for exp, color in (("cpu_result_moeut", "C2"), ("cpu_result_dense_params", "C3")):
        low = pick(runs, exp, 610, "0.001")
        if low and low["val"]:  # both rows at lr 1e-3 (each one's best here), for contrast with 2e-3
            ax.plot([s * TOKENS_PER_STEP for s, _, _ in low["val"]], [p for _, p, _ in low["val"]], "^:",
                    color=color, alpha=0.8, label=f"{ROWS[exp]} lr 1e-3: inside the 610-step schedule")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out books perplexity")
    ax.set_yscale("log")
    ax.set_title("Budget curve at lr 2e-3 (solid: each point its own schedule); dotted: lr 1e-3", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    style.save(fig, out + "_budget", dpi=130)


STALL_PANELS = (("train/ce", "training CE"), ("moe/usage_rel_ppl_all", "expert-usage perplexity / N_E"),
                ("moe/dead_frac_all", "dead-expert fraction"), ("moe/g0/min_sel_score", "min selected gate (g0)"),
                ("train/reg", "entropy regulariser"), ("train/grad_norm", "gradient norm (pre-clip)"))


def run_label(r) -> str:
    """'610 steps, lr 0.002' plus the seed and warm-up where they differ from the defaults."""
    return (f"{r['steps']} steps, lr {r['lr']}" + (f", seed {r['seed']}" if r["seed"] != "0" else "")
            + (f", warm-up {r['warmup']}" if r["warmup"] != "30" else ""))


def stall_runs(runs) -> List[Dict]:
    """The MoEUT runs the stall figure compares: every one (the 610-step runs' learning rates and
    seeds, the 150/300-step budgets, the warm-up variant), ordered by steps, lr, seed, warm-up."""
    keep = [r for r in runs if r["experiment"] == "cpu_result_moeut"]
    return sorted(keep, key=lambda r: (r["steps"], float(r["lr"]), r["seed"], r["warmup"]))


def plot_stall(runs, out: str, max_step: int = 200) -> None:
    """<out>_stall.png: the STALL_PANELS metrics of every MoEUT run over its first `max_step` steps."""
    fig, axes = style.figure(figsize=(12, 6.5), nrows=2, ncols=3)
    for ax, (key, title) in zip(axes.ravel(), STALL_PANELS):
        for i, r in enumerate(stall_runs(runs)):
            pts = sorted((s, rec[key]) for s, rec in r["train"].items() if s <= max_step and key in rec)
            if pts:  # shorter schedules dashed: their lr decays sooner than the 610-step ones'
                ax.plot(*zip(*pts), {150: "--", 300: "-."}.get(r["steps"], "-"), color=f"C{i % 10}", label=run_label(r))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(f"MoEUT, the first {max_step} steps, by learning rate, seed and warm-up")
    style.save(fig, out + "_stall", dpi=110)


def plot_runs(runs, out: str) -> None:
    """<out>_runs.png: every 610-step run's training CE (mean over 50-step bins of the records
    logged every 10 steps) and held-out-books perplexity at each validation step, against tokens."""
    fig, (ax_ce, ax_val) = style.figure(figsize=(12, 4.5), ncols=2)
    styles = {"0.001": ":", "0.002": "-", "0.004": "--"}
    for r in sorted(runs, key=lambda r: (r["row"], float(r["lr"]), r["seed"], r["warmup"])):
        if r["steps"] != 610 or r["warmup"] != "30":
            continue
        color = "C0" if r["experiment"] == "cpu_result_moeut" else "C1"
        label = f"{r['row']}, lr {r['lr']}" + (f", seed {r['seed']}" if r["seed"] != "0" else "")
        alpha = 1.0 if r["seed"] == "0" else 0.5
        bins: Dict[int, List[float]] = {}
        for step, rec in r["train"].items():
            if "train/ce" in rec:
                bins.setdefault((step - 1) // 50, []).append(rec["train/ce"])
        ce = [((b + 1) * 50 * TOKENS_PER_STEP, sum(v) / len(v)) for b, v in sorted(bins.items())]
        if ce:
            ax_ce.plot(*zip(*ce), styles.get(r["lr"], "-"), color=color, alpha=alpha, label=label)
        if r["val"]:
            ax_val.plot([s * TOKENS_PER_STEP for s, _, _ in r["val"]], [p for _, p, _ in r["val"]],
                        styles.get(r["lr"], "-"), marker="o", color=color, alpha=alpha, label=label)
    ax_ce.set_title("training CE (50-step means)", fontsize=10)
    ax_val.set_title("held-out books perplexity", fontsize=10)
    ax_val.set_yscale("log")
    for ax in (ax_ce, ax_val):
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
    ax_val.legend(fontsize=7)
    fig.suptitle("The 610-step runs: MoEUT (blue) vs parameter-matched dense (orange); line style = lr, faint = seed 1",
                 fontsize=10)
    style.save(fig, out + "_runs", dpi=120)


def first_step_below(r, key: str, level: float) -> Optional[int]:
    """The first logged step whose `key` is below `level` (None: never)."""
    return next((s for s in sorted(r["train"]) if r["train"][s].get(key, math.inf) < level), None)


def stall_numbers(runs) -> str:
    """Per MoEUT run: the mean of each stall metric over steps 20-60 (where the 2e-3 run stalls) and
    the first step whose training CE is below 6.5 (how long the stall lasts)."""
    rows = []
    for r in sorted(runs, key=lambda r: (r["steps"], float(r["lr"]), r["seed"], r["warmup"])):
        if r["experiment"] != "cpu_result_moeut":
            continue
        cells = []
        for key, _ in STALL_PANELS:
            v = [rec[key] for s, rec in r["train"].items() if 20 <= s <= 60 and key in rec]
            cells.append(f"{sum(v) / len(v):.3g}" if v else "–")
        below = first_step_below(r, "train/ce", 6.5)
        cells.append(str(below) if below is not None else f"not by step {r['last_step']}")
        rows.append([run_label(r)] + cells)
    return _md(["run"] + [t for _, t in STALL_PANELS] + ["first step with CE < 6.5"], rows)


def report(root: str, out: str) -> str:
    """The markdown report of the runs under `root` (returned), with the two figures written to
    `out`_budget.png and `out`_stall.png. Raises FileNotFoundError for a missing root and
    ValueError when it holds no run with a metrics.jsonl."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"root: {root} is not a directory")
    runs = collect(root)
    if not runs:
        raise ValueError(f"root: {root} holds no run directory with a metrics.jsonl")
    text = "\n".join(["## All runs\n\n" + table(runs),
                      "\n## Learning curves of the 610-step runs (val PPL, books)\n\n" + curve_table(runs),
                      "\n## Budget curve (lr 2e-3)\n\n" + budget_table(runs),
                      "\n## Learning rates at 610 steps\n\n" + best_lr_table(runs),
                      "\n## Seeds at 610 steps (lr 2e-3)\n\n" + seed_table(runs),
                      "\n## Routing metrics, mean over steps 20-60\n\n" + stall_numbers(runs)])
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    plot_budget(runs, out)
    plot_stall(runs, out)
    plot_runs(runs, out)
    return text + f"\n\nfigures: {out}_budget.png {out}_stall.png {out}_runs.png"


START, END = "<!-- report:start -->", "<!-- report:end -->"


def splice(doc: str, text: str, when: str) -> None:
    """Replace what lies between the START and END markers of the markdown file `doc` with `text`
    (its '## ' headings demoted to '### ', the figure line dropped), headed by the time `when`.
    Raises FileNotFoundError for a missing file and ValueError naming the file when a marker is
    missing or out of order (the file is then left untouched)."""
    if not os.path.isfile(doc):
        raise FileNotFoundError(f"doc: {doc} is not a file")
    with open(doc, encoding="utf-8") as f:
        page = f.read()
    a, b = page.find(START), page.find(END)
    if a < 0 or b < a:
        raise ValueError(f"doc: {doc} has no '{START}' ... '{END}' block to replace")
    body = text.split("\n\nfigures:")[0].strip().replace("\n## ", "\n### ")
    body = "#" + body if body.startswith("## ") else body
    block = (f"{START}\nState of the runs at {when} (output of the command above; \"not finished\" = still "
             f"running or stopped when this page was written).\n\n{body}\n{END}")
    with open(doc, "w", encoding="utf-8") as f:
        f.write(page[:a] + block + page[b + len(END):])


@dataclass
class CpuResultOptions:
    """Options of `python -m moeut.analysis cpu-result`."""
    root: str = option("outputs/sweeps/cpu_result", help="the sweep directory: one job dir (experiment=...,...) per run")
    out: Optional[str] = option(None, help="figure path prefix: OUT_budget.png, OUT_stall.png and OUT_runs.png; "
                                "null = <root>/figures/cpu_result (docs/figures/ is regenerated only when named: "
                                "out=docs/figures/cpu_result)")
    doc: Optional[str] = option(None, help="also replace the block between <!-- report:start --> and "
                                "<!-- report:end --> in this markdown file (docs/results.md) with the tables; "
                                "null = print only")


def work(opts: CpuResultOptions) -> str:
    """The command's work: print the report (and splice it into `opts.doc`); returns its text.
    A missing root, a root without runs or a doc without the markers is one line, exit status 1."""
    import datetime
    with bad_input_exits("moeut.analysis cpu-result"):
        if opts.doc is not None and not os.path.isfile(opts.doc):
            raise FileNotFoundError(f"doc: {opts.doc} is not a file")
        if not os.path.isdir(opts.root):
            raise FileNotFoundError(f"root: {opts.root} is not a directory")
        out = opts.out if opts.out else os.path.join(opts.root, "figures", "cpu_result")
        check_out_file(out, "out", prefix=True)
        text = report(opts.root, out)
        print(text)
        if opts.doc is not None:
            splice(opts.doc, text, datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    return text


main = typed_tool("moeut.analysis cpu-result", CpuResultOptions,
                  summary="Tables (markdown, to stdout) and figures of docs/results.md from the cpu_result sweep's "
                          "runs: every run, the budget curve (150/300/610 steps), learning rates and seeds at 610 "
                          "steps, and MoEUT's routing metrics over the first 200 steps (by lr, seed and warm-up).",
                  usage="python -m moeut.analysis cpu-result [root=DIR] [out=PREFIX] [doc=FILE]",
                  notes="Unfinished runs are listed with the last step reached and never enter a ratio. metrics.jsonl "
                        "is read through moeut/rundir.py (a cut last line is skipped with a warning; any other "
                        "damaged line is an error naming file:line).")(work)

