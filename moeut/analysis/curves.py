"""Learning curves of several runs on one figure: training loss and validation perplexity
against tokens seen, from each run's metrics.jsonl (read through moeut.rundir: a cut last line is
skipped with a warning naming file:line, any other damaged line is an error naming file:line).

    python -m moeut.analysis curves runs=[runs/results/moeut_s0,runs/results/dense_params_s0] \\
        'labels=[MoEUT,"dense (param-matched)"]' out=docs/figures/cpu_results_curves
    python -m moeut.analysis curves --help       # every option

Without `labels`, each curve is labelled by what differs between the runs (`legend_labels`): the
command-line overrides not shared by every run, or the run dir's name when the overrides are the
same; the command prints each label with its full run dir and the overrides every run shares.
The figure is made and written by moeut.analysis.style.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..cli import REQUIRED, bad_input_exits, check_out_file, option, path_list_option, typed_tool
from ..rundir import VAL_PPL_KEY, RunDir, read_metrics as _read_run_metrics
from . import style

EXTRA_VAL_KEY = "validation/c4/perplexity"  # the cpu_result sweep's second validation set (a C4 sample)
SHORT_PATH = 24  # a path-valued override longer than this shows its last component in a legend


def split_overrides(text: str) -> List[str]:
    """The `key=value` items of a sweep job's folder name `experiment=x,optim.lr=0.001` (commas
    inside brackets, braces or quotes belong to the value); [] when an item has no "=" (not such a name)."""
    items, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(cur)
            cur = ""
            continue
        cur += ch
    items.append(cur)
    return items if all("=" in it and not it.startswith("=") for it in items) else []


def run_overrides(run: str) -> List[str]:
    """The command-line overrides of a run, in order: its .hydra/overrides.yaml, else the items of
    a sweep-job folder name (`split_overrides`), else []."""
    rd = RunDir(run)
    return rd.overrides() or split_overrides(rd.name)


LABEL_WIDTH = 40  # legend labels wrap at this many characters


def _shorten(item: str) -> str:
    """`key=value` with a long path value cut to its last component: `data.path=.../books`."""
    key, _, value = item.partition("=")
    if "/" in value.strip("/") and len(value) > SHORT_PATH:
        return f"{key}=.../{value.rstrip('/').rsplit('/', 1)[-1]}"
    return item


def _unique(labels: List[str], fallback: List[str]) -> List[str]:
    """`labels` with the entries that occur more than once followed by their `fallback` in brackets."""
    return [f"{lab} ({fb})" if labels.count(lab) > 1 else lab for lab, fb in zip(labels, fallback)]


def legend_labels(runs: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(one legend label per run, the overrides every run shares). A label is what differs between
    the runs: the run's overrides that not every run has (in its own order; long path values cut to
    their last component), or, for a run with none of them, each differing key as `key=default`;
    when no override differs (or there is one run), the run dir's name (`RunDir.short_name`, the
    parent's too where names repeat). Labels that still repeat get the run dir's name in brackets."""
    runs = list(runs)
    names = [RunDir(r).short_name for r in runs]
    if len(set(names)) < len(names):
        names = [f"{RunDir(r).path.parent.name}/{RunDir(r).path.name}" for r in runs]
    items = [run_overrides(r) for r in runs]
    common = set(items[0]).intersection(*items[1:]) if items else set()
    shared = [o for o in (items[0] if items else []) if o in common]
    diffs = [[o for o in its if o not in common] for its in items]
    if len(runs) < 2 or not any(diffs):
        return _unique(names, [str(RunDir(r).path) for r in runs]), shared
    keys = list(dict.fromkeys(o.partition("=")[0] for d in diffs for o in d))
    full = [" ".join(d) if d else " ".join(f"{k}=default" for k in keys) for d in diffs]
    short = [" ".join(_shorten(o) for o in d) if d else full[i] for i, d in enumerate(diffs)]
    labels = short if len(set(short)) == len(set(full)) else full
    return _unique(labels, names), shared


def read_metrics(run_dir: str) -> List[Dict]:
    """Records of `<run_dir>/metrics.jsonl` (moeut.rundir.read_metrics). Raises FileNotFoundError,
    CorruptRunFile (a ValueError naming file:line)."""
    return _read_run_metrics(run_dir)


def curves(rows: List[Dict], val_key: str) -> Tuple[np.ndarray, np.ndarray]:
    """(train [n, 2], val [m, 2]): (tokens seen, training loss) of every record with "train/loss"
    and (tokens seen, value of `val_key`) of every record with it; tokens = step x tokens per step
    (from the first "train/tokens_seen"). Raises ValueError when no record has train/tokens_seen."""
    tokens_per_step = None
    train = [(r["step"], r["train/loss"], r.get("train/tokens_seen")) for r in rows if "train/loss" in r]
    for step, _, seen in train:
        if seen:
            tokens_per_step = seen / step
            break
    if tokens_per_step is None:
        raise ValueError("metrics.jsonl has no train/tokens_seen: cannot put tokens on the x axis")
    tr = np.array([[s * tokens_per_step, v] for s, v, _ in train])
    val = np.array([[r["step"] * tokens_per_step, r[val_key]] for r in rows if val_key in r])
    return tr, val


def smooth(y: np.ndarray, k: int) -> np.ndarray:
    """Moving average of `y` over `k` points ("valid" part: len(y) - k + 1 values); `y` itself
    when k <= 1 or y is shorter than k."""
    if len(y) < k or k <= 1:
        return y
    return np.convolve(y, np.ones(k) / k, mode="valid")


def plot_curves(runs: Sequence[str], out: str, *, labels: Optional[Sequence[str]] = None,
                val_keys: Sequence[str] = (VAL_PPL_KEY, EXTRA_VAL_KEY),
                val_names: Sequence[str] = ("held-out books", "C4 sample"), title: str = "",
                smooth_k: int = 5) -> List[str]:
    """One figure: training loss (moving average of `smooth_k` logs) and one validation-perplexity
    panel per `val_keys` entry (titled by `val_names`), x axis tokens seen (millions), one line per
    run. Writes `out`.png and `out`.pdf; returns the paths. Raises ValueError for mismatched
    labels/val_names (named) or a run without train/tokens_seen (named), before writing."""
    runs = list(runs)
    if not runs:
        raise ValueError("runs: required: runs=[RUN_DIR,...]")
    labels = list(labels) if labels else legend_labels(runs)[0]
    if len(labels) != len(runs):
        raise ValueError(f"labels: needs one label per run ({len(runs)}), got {len(labels)}")
    if len(val_names) != len(val_keys):
        raise ValueError(f"val_names: needs one name per val_keys entry ({len(val_keys)}), got {len(val_names)}")
    data = []
    for run in runs:
        rows = read_metrics(run)
        try:
            data.append((rows, curves(rows, val_keys[0])[0]))
        except ValueError as e:
            raise ValueError(f"{run}: {e}") from None
    n_val = len(val_keys)
    fig, axes = style.figure(figsize=(5.2 * (1 + n_val), 4.2), ncols=1 + n_val)
    axes = np.atleast_1d(axes)
    import textwrap
    for (rows, tr), label in zip(data, labels):
        label = textwrap.fill(label, LABEL_WIDTH)  # a long label wraps instead of squashing the panels
        y = smooth(tr[:, 1], smooth_k)
        axes[0].plot(tr[len(tr) - len(y):, 0] / 1e6, y, label=label)
        for ax, key in zip(axes[1:], val_keys):
            _, val = curves(rows, key)
            if len(val):
                ax.plot(val[:, 0] / 1e6, val[:, 1], marker="o", label=label)
    axes[0].set(title=f"training loss (moving average of {smooth_k} logs)", xlabel="tokens seen (M)",
                ylabel="CE + regulariser")
    for ax, name, key in zip(axes[1:], val_names, val_keys):
        ax.set(title=f"validation perplexity: {name}", xlabel="tokens seen (M)", ylabel="perplexity")
        if ax.lines:
            ax.set_yscale("log")
        else:  # no run logged this key: say so instead of an empty panel with an empty legend
            ax.text(0.5, 0.5, f"no run logged\n{key}", ha="center", va="center", transform=ax.transAxes)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return style.save(fig, out, formats=("png", "pdf"), dpi=130)


@dataclass
class CurvesOptions:
    """Options of `python -m moeut.analysis curves`."""
    runs: List[str] = option(REQUIRED, help="run dirs with metrics.jsonl (train/loss, train/tokens_seen); entries "
                             "with * ? [ are glob patterns")
    out: str = option(REQUIRED, help="output path without extension: OUT.png and OUT.pdf are written")
    labels: Optional[List[str]] = option(None, help="one legend label per run; null = what differs between the runs "
                                         "(their differing overrides, else the run dirs' names)")
    val_keys: List[str] = option(default_factory=lambda: [VAL_PPL_KEY, EXTRA_VAL_KEY],
                                 help="metrics.jsonl keys, one validation panel each")
    val_names: List[str] = option(default_factory=lambda: ["held-out books", "C4 sample"],
                                  help="panel title of each val_keys entry (same length)")
    title: str = option("", help="figure title; empty = none")
    smooth: int = option(5, help="moving-average window of the training loss, in log records (1 = none)", lo=1)


def work(opts: CurvesOptions) -> List[str]:
    """The command's work: draw the figure and print where it went; returns the written paths.
    Bad input is one line naming the option or run, exit status 1."""
    with bad_input_exits("moeut.analysis curves"):
        check_out_file(opts.out, "out", prefix=True)
        runs = path_list_option(opts.runs, "runs", "runs=[RUN_DIR,...]", keep=os.path.isdir, kept="run dirs")
        paths = plot_curves(runs, opts.out, labels=opts.labels or None, val_keys=opts.val_keys,
                            val_names=opts.val_names, title=opts.title, smooth_k=opts.smooth)
    if not opts.labels:
        labels, shared = legend_labels(runs)
        width = max(len(lab) for lab in labels)
        for lab, run in zip(labels, runs):
            print(f"{lab.ljust(width)}  {RunDir(run).path}")
        if shared:
            print(f"shared by every run: {' '.join(shared)}")
    print(f"wrote {paths[0]} and .pdf")
    return paths


main = typed_tool("moeut.analysis curves", CurvesOptions,
                  summary="Learning curves of several runs on one figure: training loss and validation perplexity "
                          "against tokens seen, from each run's metrics.jsonl.",
                  usage="python -m moeut.analysis curves runs=[RUN_DIR,...] out=STEM [option=value ...]",
                  notes="metrics.jsonl is read through moeut/rundir.py: a cut last line is skipped with a warning "
                        "naming file:line; any other damaged line is an error naming file:line.")(work)

