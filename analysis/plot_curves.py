"""Learning curves of several runs on one figure: training loss and validation perplexity
against tokens seen, from each run's metrics.jsonl.

    python analysis/plot_curves.py runs/results/moeut_s0 runs/results/dense_params_s0 \
        --labels "MoEUT" "dense (param-matched)" --out docs/figures/cpu_results_curves
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_metrics(run_dir: str) -> List[Dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return rows


def curves(rows: List[Dict], val_key: str):
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
    if len(y) < k or k <= 1:
        return y
    return np.convolve(y, np.ones(k) / k, mode="valid")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--labels", nargs="+", default=None)
    p.add_argument("--val-keys", nargs="+", default=["validation/val/perplexity", "validation/c4/perplexity"])
    p.add_argument("--val-names", nargs="+", default=["held-out books", "C4 sample"])
    p.add_argument("--title", default="")
    p.add_argument("--out", required=True, help="output path without extension (.png and .pdf written)")
    p.add_argument("--smooth", type=int, default=5)
    args = p.parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.normpath(r)) for r in args.runs]
    if len(labels) != len(args.runs):
        p.error("--labels needs one label per run")
    n_val = len(args.val_keys)
    fig, axes = plt.subplots(1, 1 + n_val, figsize=(5.2 * (1 + n_val), 4.2), dpi=130)
    for run, label in zip(args.runs, labels):
        rows = read_metrics(run)
        tr, _ = curves(rows, args.val_keys[0])
        y = smooth(tr[:, 1], args.smooth)
        axes[0].plot(tr[len(tr) - len(y):, 0] / 1e6, y, label=label)
        for ax, key in zip(axes[1:], args.val_keys):
            _, val = curves(rows, key)
            if len(val):
                ax.plot(val[:, 0] / 1e6, val[:, 1], marker="o", label=label)
    axes[0].set(title=f"training loss (moving average of {args.smooth} logs)", xlabel="tokens seen (M)",
                ylabel="CE + regulariser")
    for ax, name in zip(axes[1:], args.val_names):
        ax.set(title=f"validation perplexity: {name}", xlabel="tokens seen (M)", ylabel="perplexity")
        ax.set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for ext in ("png", "pdf"):
        fig.savefig(f"{args.out}.{ext}")
    print(f"wrote {args.out}.png and .pdf")


if __name__ == "__main__":
    main()
