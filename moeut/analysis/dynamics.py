"""`python -m moeut.analysis dynamics`: when routing settles during training (docs/analysis.md
"Routing over training").

Routes the same evaluation windows (moeut.analysis.evalset, tokenised with the newest checkpoint's
tokenizer) through every saved checkpoint of a run, oldest first, and reports against the step, per
layer application and expert kind: router saturation (OLMoE: the share of each token's k selected
experts at checkpoint t that the final checkpoint also selects), the normalised usage entropy, the
share of dead experts (selected by no token of any source) and the source NMI (moeut.analysis.sources).
Training keeps the checkpoints this needs with `train.keep_every=N` (docs/training.md).
Writes <out_dir>/dynamics/{dynamics.npz, dynamics.json, dynamics.csv}, figures and the report
section "dynamics".
"""
from __future__ import annotations

import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch

from ..cli import bad_input_exits, option, typed_tool
from . import expert_stats as X
from .evalset import EvalOptions, EvalSet, label, open_evalset, options_record, save_csv, save_json, save_npz
from .sources import KIND_NAMES, KINDS, route_counts


@dataclass
class DynamicsOptions(EvalOptions):
    """Options of `python -m moeut.analysis dynamics`; `checkpoint` is the run dir (every checkpoint
    of it is read)."""

    max_tokens: int = option(4096, help="tokens per source (whole windows of T)", lo=1)


def _step(path: str) -> int:
    m = re.search(r"step_(\d+)$", os.path.normpath(path))
    return int(m.group(1)) if m else -1


def run_checkpoints(run_dir: str) -> List[str]:
    """Every complete checkpoint of `run_dir`, oldest first (moeut.checkpoint.find_checkpoints).
    Raises ValueError naming `checkpoint` when there are fewer than one."""
    from ..checkpoint import find_checkpoints
    found = find_checkpoints(run_dir)
    if not found:
        raise ValueError(f"checkpoint: {run_dir} holds no checkpoints/step_* dir")
    return found


def route_all(model: torch.nn.Module, es: EvalSet, batch_size: int) -> Tuple[Dict[str, np.ndarray], Dict[str, torch.Tensor]]:
    """(counts kind -> [S, L, X], idx kind -> [L, N, (H,) k] over every source's tokens in order)."""
    per = [route_counts(model, w, batch_size, es.device, keep_idx=True) for w in es.windows.values()]
    counts = {k: np.stack([p[k] for p in per]) for k in KINDS}
    idx = {k: torch.cat([p["idx"][k] for p in per], 1) for k in KINDS}
    return counts, idx


def step_statistics(counts: Dict[str, np.ndarray], idx: Dict[str, torch.Tensor],
                    final_idx: Dict[str, torch.Tensor]) -> Dict[str, np.ndarray]:
    """Per kind, [L] arrays: "saturation_<kind>" (mean over positions of `expert_stats.saturation`
    against the final checkpoint's choices), "entropy_<kind>" (normalised usage entropy over all
    sources), "dead_<kind>" (share of experts no source selects), "nmi_<kind>" (source NMI)."""
    out: Dict[str, np.ndarray] = {}
    for k in KINDS:
        c = counts[k]  # [S, L, X]
        out[f"saturation_{k}"] = X.saturation(idx[k].long(), final_idx[k].long()).flatten(1).mean(1).numpy()
        if k != "mlp":  # attention experts are per head: entropy and dead share within each head's bank
            L, Hx = c.shape[1], c.shape[2]
            H = idx[k].shape[2]
            per_head = c.sum(0).reshape(L, H, Hx // H)
            out[f"entropy_{k}"] = X.usage_entropy(per_head).mean(1)
            out[f"dead_{k}"] = X.dead_share(per_head).mean(1)
        else:
            out[f"entropy_{k}"] = X.usage_entropy(c.sum(0))
            out[f"dead_{k}"] = X.dead_share(c.sum(0))
        out[f"nmi_{k}"] = np.array([X.source_nmi(c[:, l]) for l in range(c.shape[1])])
    return out


def _figures(es: EvalSet, steps: np.ndarray, st: Dict[str, np.ndarray], fig_dir: str, formats) -> List[Tuple[str, str]]:
    from .style import figure, save

    order = sorted(es.model.execution_order())
    out = []
    fig, axes = figure((9.6, 6.4), nrows=2, ncols=2)
    panels = [("saturation", "router saturation vs final checkpoint"), ("entropy", "usage entropy / log E"),
              ("dead", "share of dead experts"), ("nmi", "NMI(expert; source)")]
    for ax, (key, ylab) in zip(axes.ravel(), panels):
        for l, g, r in order:
            ax.plot(steps, st[f"{key}_mlp"][:, l], marker="o", markersize=3, label=label(g, r))
        ax.set_xlabel("training step")
        ax.set_ylabel(ylab)
    axes[0, 0].set_ylim(0, 1.02)
    axes[0, 0].legend(title="layer application", fontsize=7)
    fig.suptitle(f"{es.run}: MLP expert routing over training")
    save(fig, os.path.join(fig_dir, "dynamics_mlp"), formats)
    out.append((f"figures/dynamics_mlp.{formats[0]}", "MLP experts against the training step, one line per layer application: "
                "router saturation (1 = the final checkpoint's choices), usage entropy, dead experts, source NMI."))
    fig, axes = figure((9.6, 3.4), ncols=2)
    for ax, k in zip(axes, ("att_v", "att_o")):
        for l, g, r in order:
            ax.plot(steps, st[f"saturation_{k}"][:, l], marker="o", markersize=3, label=label(g, r))
        ax.set_xlabel("training step")
        ax.set_ylabel("router saturation vs final checkpoint")
        ax.set_title(KIND_NAMES[k])
        ax.set_ylim(0, 1.02)
    axes[0].legend(title="layer application", fontsize=7)
    save(fig, os.path.join(fig_dir, "dynamics_attention"), formats)
    out.append((f"figures/dynamics_attention.{formats[0]}", "Router saturation of the attention value and output experts "
                "(per head bank) against the training step."))
    return out


def analyse(es: EvalSet, opts: DynamicsOptions, ckpts: List[str]) -> Dict[str, object]:
    """Route every checkpoint of the run and write numbers, figures and the report section;
    returns the JSON summary."""
    from ..checkpoint import CheckpointError, load_model
    from .sections import write_section

    t0 = time.time()
    final_counts, final_idx = route_all(es.model, es, opts.batch_size)
    rows, steps, used = {}, [], []
    for c in ckpts:
        if os.path.normpath(c) == os.path.normpath(es.loaded.path):
            counts, idx = final_counts, final_idx
        else:
            try:
                model = load_model(c).model.to(es.device).eval()
            except (CheckpointError, ValueError) as e:
                warnings.warn(f"checkpoint: skipping {c}: {e}", stacklevel=2)
                continue
            counts, idx = route_all(model, es, opts.batch_size)
        st = step_statistics(counts, idx, final_idx)
        st["counts_mlp"] = counts["mlp"]
        for key, v in st.items():
            rows.setdefault(key, []).append(v)
        steps.append(_step(c))
        used.append(c)
        print(f"[dynamics] step {steps[-1]}: saturation (MLP) {np.round(np.asarray(st['saturation_mlp'], dtype=np.float64), 3).tolist()} "
              f"({time.time() - t0:.1f}s)", file=sys.stderr, flush=True)
    st = {k: np.stack(v) for k, v in rows.items()}
    steps = np.array(steps)
    order = list(es.model.execution_order())
    out = os.path.join(es.out_dir, "dynamics")
    save_npz(os.path.join(out, "dynamics.npz"), steps=steps, sources=np.array(es.names),
             layer_g=np.array([g for _, g, _ in order]), layer_r=np.array([r for _, _, r in order]), **st)
    csv_rows = [[int(steps[i]), kind, l, g, r] + [f"{st[f'{m}_{kind}'][i, l]:.5f}" for m in
                                                  ("saturation", "entropy", "dead", "nmi")]
                for i in range(len(steps)) for kind in KINDS for l, g, r in order]
    save_csv(os.path.join(out, "dynamics.csv"), ["step", "kind", "l", "g", "r", "saturation", "entropy", "dead", "nmi"],
             csv_rows)

    def settle(kind: str, l: int, level: float = 0.9):
        hit = np.nonzero(st[f"saturation_{kind}"][:, l] >= level)[0]
        return int(steps[hit[0]]) if len(hit) else None

    summary = {"run_dir": es.run_dir, "checkpoints": used, "steps": steps.tolist(), "seq_len": es.seq_len,
               "sources": es.names,
               "first_step_saturation_0.9": {k: {label(g, r): settle(k, l) for l, g, r in order} for k in KINDS},
               "options": options_record(opts), "seconds": round(time.time() - t0, 1)}
    save_json(os.path.join(out, "dynamics.json"), summary)
    figs = _figures(es, steps, st, os.path.join(es.out_dir, "figures"), opts.formats)
    table = (["layer"] + [f"{KIND_NAMES[k]}: saturation >= 0.9 from step" for k in KINDS],
             [[label(g, r)] + [str(summary["first_step_saturation_0.9"][k][label(g, r)]) for k in KINDS]
              for l, g, r in sorted(order)])
    write_section(es.out_dir, "dynamics", "Routing over training",
                  [f"{len(used)} checkpoints of {es.run_dir} (steps {steps.min()}-{steps.max()}), the same "
                   f"{es.seq_len}-token windows of {', '.join(es.names)}. Numbers: dynamics/dynamics.npz, "
                   "dynamics.json, dynamics.csv."], table, figs, run=es.run)
    print(f"[dynamics] {len(used)} checkpoints in {time.time() - t0:.1f}s; wrote {out}", file=sys.stderr)
    return summary


APP = "moeut.analysis dynamics"


@typed_tool(APP, DynamicsOptions, summary="Routing over training: router saturation, usage entropy, dead experts "
            "and source NMI at every saved checkpoint of a run (docs/analysis.md).",
            usage="python -m moeut.analysis dynamics checkpoint=<run dir> [key=value ...]",
            notes="Keep the checkpoints while training: python train.py train.keep_every=N (docs/training.md).")
def main(opts: DynamicsOptions) -> Dict[str, object]:
    """Check the inputs (one-line errors, exit 1), then run `analyse` over the run's checkpoints."""
    with bad_input_exits(APP):
        es = open_evalset(opts)
        ckpts = run_checkpoints(es.run_dir)
        if len(ckpts) < 2:
            warnings.warn(f"checkpoint: {es.run_dir} holds one checkpoint; train with train.keep_every=N to keep "
                          f"more (docs/training.md)", stacklevel=1)
    return analyse(es, opts, ckpts)
