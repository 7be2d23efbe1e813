"""Learning curves of several runs on one figure: training loss and validation perplexity
against tokens seen, from each run's metrics.jsonl (read through moeut.rundir: a cut last line is
skipped with a warning naming file:line, any other damaged line is an error naming file:line).

    python analysis/plot_curves.py runs=[runs/results/moeut_s0,runs/results/dense_params_s0] \\
        'labels=[MoEUT,"dense (param-matched)"]' out=docs/figures/cpu_results_curves
    python analysis/plot_curves.py --help       # every option (conf/plot_curves.yaml)
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import hydra
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(_HERE) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, os.path.dirname(_HERE))

from moeut.cli import CONF_DIR, str_option, one_line_hydra_errors  # noqa: E402  (conf/plot_curves.yaml)
from moeut.rundir import RunDir, read_metrics as _read_run_metrics  # noqa: E402


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
                val_keys: Sequence[str] = ("validation/val/perplexity", "validation/c4/perplexity"),
                val_names: Sequence[str] = ("held-out books", "C4 sample"), title: str = "",
                smooth_k: int = 5) -> List[str]:
    """One figure: training loss (moving average of `smooth_k` logs) and one validation-perplexity
    panel per `val_keys` entry (titled by `val_names`), x axis tokens seen (millions), one line per
    run. Writes `out`.png and `out`.pdf; returns the paths. Raises ValueError for mismatched
    labels/val_names (named) or a run without train/tokens_seen (named), before writing."""
    runs = list(runs)
    if not runs:
        raise ValueError("runs: required: runs=[RUN_DIR,...]")
    labels = list(labels) if labels else [RunDir(r).label() for r in runs]
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
    fig, axes = plt.subplots(1, 1 + n_val, figsize=(5.2 * (1 + n_val), 4.2), dpi=130)
    axes = np.atleast_1d(axes)
    for (rows, tr), label in zip(data, labels):
        y = smooth(tr[:, 1], smooth_k)
        axes[0].plot(tr[len(tr) - len(y):, 0] / 1e6, y, label=label)
        for ax, key in zip(axes[1:], val_keys):
            _, val = curves(rows, key)
            if len(val):
                ax.plot(val[:, 0] / 1e6, val[:, 1], marker="o", label=label)
    axes[0].set(title=f"training loss (moving average of {smooth_k} logs)", xlabel="tokens seen (M)",
                ylabel="CE + regulariser")
    for ax, name in zip(axes[1:], val_names):
        ax.set(title=f"validation perplexity: {name}", xlabel="tokens seen (M)", ylabel="perplexity")
        ax.set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        fig.savefig(f"{out}.{ext}")
        paths.append(f"{out}.{ext}")
    plt.close(fig)
    return paths


@one_line_hydra_errors("plot_curves")
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="plot_curves")
def main(cfg: Any) -> None:
    """`python analysis/plot_curves.py runs=[RUN_DIR,...] out=STEM [option=value ...]` (options:
    conf/plot_curves.yaml, or `--help`). Bad input exits 1 with the message, no traceback."""
    from moeut.cli import setup_tool_output
    setup_tool_output("plot_curves")  # one-line warnings; no progress frames in a log file
    from omegaconf import OmegaConf
    c = OmegaConf.to_container(cfg, resolve=True)
    try:
        for key in ("runs", "out"):
            if OmegaConf.is_missing(cfg, key):
                raise ValueError(f"{key}: required (runs=[RUN_DIR,...] out=<path without extension>)")
        runs = [c["runs"]] if isinstance(c["runs"], str) else c["runs"]
        as_list = lambda v: [v] if isinstance(v, str) else list(v or [])  # noqa: E731
        if not isinstance(c["smooth"], int) or c["smooth"] < 1:
            raise ValueError(f"smooth: must be a positive integer, got {c['smooth']!r}")
        out = str_option(c, "out")  # typed options (moeut.cli): errors name the option
        title = str_option(c, "title", allow_none=True) or ""
        for key in ("labels", "val_keys", "val_names"):
            if not all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in as_list(c[key])):
                raise ValueError(f"{key}: expected a list of names, e.g. {key}=[a,b], got {c[key]!r}")
        paths = plot_curves([str(r) for r in runs], out, labels=as_list(c["labels"]) or None,
                            val_keys=as_list(c["val_keys"]), val_names=as_list(c["val_names"]),
                            title=title, smooth_k=c["smooth"])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"plot_curves: error: {e}")
    print(f"wrote {paths[0]} and .pdf")


if __name__ == "__main__":
    main()
