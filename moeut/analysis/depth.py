"""`python -m moeut.analysis depth`: what the shared layers do at each repetition (docs/analysis.md
"Recurrent depth").

(a) Depth extrapolation: evaluate the checkpoint with R' repetitions of its G shared layers
(R' = 1 ... 2R by default; R' = R is the model's own forward, bit for bit) and report perplexity
against R' per source.
(b) Logit lens: apply the final norm and the head to the residual stream after the embedding and
after every layer application (moeut.analysis.probe), and report per source the cross-entropy
of the target (nats/token), its rank among the V logits and the top-1 accuracy against depth, and
at which depth each token's prediction settles (the first depth from which the top-1 prediction
equals the final one and stays).
Writes <out_dir>/depth/{depth.npz, depth.json, depth.csv}, figures and the report section "depth".
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch

from ..cli import bad_input_exits, option, typed_tool
from .evalset import EvalOptions, EvalSet, batches, label, open_evalset, options_record, save_csv, save_json, save_npz
from .probe import run_layers, target_rank, token_ce


@dataclass
class DepthOptions(EvalOptions):
    """Options of `python -m moeut.analysis depth`."""

    repeats: List[int] = option(default_factory=list, help="repetition counts R' to evaluate; [] = 1 ... 2R", lo=1)
    max_tokens: int = option(4096, help="tokens per source (whole windows of T)", lo=1)


@torch.no_grad()
def lens_pass(model: torch.nn.Module, windows: np.ndarray, batch_size: int, device: torch.device) -> Dict[str, np.ndarray]:
    """Logit lens over `windows` [n, T+1]: "ce" [D, N] nats and "rank" [D, N] of every target and
    "top1" [D, N] top-1 predictions at depth d = 0 (embedding) .. L (after the last application;
    equal to the model's logits), N = n*T positions in window order."""
    ce, rank, top1 = [], [], []
    for x, y in batches(windows, batch_size, device):
        c_b, r_b, t_b = [], [], []

        def read(logits: torch.Tensor) -> None:
            c_b.append(token_ce(logits, y).reshape(-1).cpu())
            r_b.append(target_rank(logits, y).reshape(-1).cpu())
            t_b.append(logits.argmax(-1).reshape(-1).cpu())

        read(model.head(model.embed(x)))
        run_layers(model, x, after_layer=lambda l, g, r, h: read(model.head(h)))
        ce.append(torch.stack(c_b))
        rank.append(torch.stack(r_b))
        top1.append(torch.stack(t_b))
    return {"ce": torch.cat(ce, 1).numpy(), "rank": torch.cat(rank, 1).numpy(), "top1": torch.cat(top1, 1).numpy()}


def settle_depth(top1_DN: np.ndarray) -> np.ndarray:
    """Per position [N]: the first depth d from which the top-1 prediction equals the final depth's
    at every depth >= d (D - 1 when it changes at the last layer application)."""
    same = top1_DN == top1_DN[-1:]
    # the suffix of depths that all agree: last index where they disagree, plus one
    disagree = ~same
    last_bad = np.where(disagree.any(0), top1_DN.shape[0] - 1 - np.argmax(disagree[::-1], 0), -1)
    return last_bad + 1


@torch.no_grad()
def repeats_pass(model: torch.nn.Module, windows: np.ndarray, batch_size: int, device: torch.device,
                 n_repeats: int) -> float:
    """Mean cross-entropy (nats/token) over `windows` with `n_repeats` repetitions of the shared layers."""
    s, n = 0.0, 0
    for x, y in batches(windows, batch_size, device):
        s += float(token_ce(run_layers(model, x, n_repeats=n_repeats)[0], y).double().sum())
        n += y.numel()
    return s / n


def _figures(es: EvalSet, reps: List[int], ce_rep: np.ndarray, lens: Dict[str, Dict[str, np.ndarray]],
             fig_dir: str, formats) -> List[Tuple[str, str]]:
    from .style import figure, save

    cfg = es.loaded.config
    R, G = cfg.n_layers // cfg.group_size, cfg.group_size
    out = []
    fig, ax = figure((6.4, 3.8))
    for s, name in enumerate(es.names):
        ax.plot(reps, np.exp(ce_rep[s]), marker="o", label=name)
    ax.axvline(R, color="k", linestyle=":", label=f"trained R = {R}")
    ax.set_yscale("log")
    ax.set_xlabel("repetitions R' of the shared group at evaluation")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_xticks(reps)
    ax.set_title(f"{es.run}: perplexity against the number of repetitions")
    ax.legend()
    save(fig, os.path.join(fig_dir, "depth_repeats"), formats)
    out.append((f"figures/depth_repeats.{formats[0]}", "Validation perplexity when the G shared layers are applied R' times "
                "instead of the trained R (dotted line)."))

    order = sorted(es.model.execution_order())
    ticks = ["emb"] + [label(g, r) for _, g, r in order]
    D = len(ticks)
    fig, axes = figure((11.0, 3.8), ncols=3)
    for name in es.names:
        lz = lens[name]
        axes[0].plot(range(D), lz["ce"].mean(1), marker="o", label=name)
        axes[1].plot(range(D), np.median(lz["rank"], 1) + 1, marker="o", label=name)
        settled = settle_depth(lz["top1"])
        axes[2].plot(range(D), [(settled <= d).mean() for d in range(D)], marker="o", label=name)
    axes[0].set_ylabel("cross-entropy of the target (nats/token)")
    axes[1].set_ylabel("median rank of the target (1 = top, log)")
    axes[1].set_yscale("log")
    axes[2].set_ylabel("share of tokens whose top-1 has settled")
    axes[2].set_ylim(0, 1.02)
    for ax in axes:
        ax.set_xticks(range(D), ticks, rotation=60, fontsize=7)
        ax.set_xlabel("depth (after embedding / layer application)")
        for r in range(1, R):
            ax.axvline(r * G + 0.5, color="0.7", linewidth=0.8)
    axes[0].legend()
    fig.suptitle(f"{es.run}: logit lens (final norm + head after every layer application; grey: repetition boundary)")
    save(fig, os.path.join(fig_dir, "depth_lens"), formats)
    out.append((f"figures/depth_lens.{formats[0]}", "Logit lens: the target's loss, its median rank and the share of tokens "
                "whose top-1 prediction no longer changes, against depth, per source."))
    return out


def analyse(es: EvalSet, opts: DepthOptions) -> Dict[str, object]:
    """Run (a) and (b) on every source and write numbers, figures and the report section;
    returns the JSON summary."""
    from .sections import write_section

    t0 = time.time()
    cfg = es.loaded.config
    R = cfg.n_layers // cfg.group_size
    reps = sorted(set(opts.repeats)) or list(range(1, 2 * R + 1))
    ce_rep = np.array([[repeats_pass(es.model, w, opts.batch_size, es.device, rr) for rr in reps]
                       for w in es.windows.values()])  # [S, len(reps)]
    per_source = "; ".join(f"{name} {np.round(np.exp(row), 1).tolist()}" for name, row in zip(es.windows, ce_rep))
    print(f"[depth] R' = {reps}: perplexity per source: {per_source} ({time.time() - t0:.1f}s)",
          file=sys.stderr, flush=True)
    lens = {n: lens_pass(es.model, w, opts.batch_size, es.device) for n, w in es.windows.items()}
    order = sorted(es.model.execution_order())
    ticks = ["embedding"] + [label(g, r) for _, g, r in order]
    out = os.path.join(es.out_dir, "depth")
    save_npz(os.path.join(out, "depth.npz"), sources=np.array(es.names), repeats=np.array(reps), ce_repeats=ce_rep,
             depth_labels=np.array(ticks),
             **{f"lens_ce_{n}": lens[n]["ce"].astype(np.float32) for n in es.names},
             **{f"lens_rank_{n}": lens[n]["rank"].astype(np.int32) for n in es.names},
             **{f"settle_{n}": settle_depth(lens[n]["top1"]).astype(np.int16) for n in es.names})
    rows = [["repeats", rr, n, f"{ce_rep[s, i]:.5f}", f"{math.exp(ce_rep[s, i]):.3f}", "", ""]
            for s, n in enumerate(es.names) for i, rr in enumerate(reps)]
    rows += [["lens", d, n, f"{lens[n]['ce'][d].mean():.5f}", f"{math.exp(lens[n]['ce'][d].mean()):.3f}",
              f"{np.median(lens[n]['rank'][d]) + 1:.0f}", f"{(lens[n]['rank'][d] == 0).mean():.4f}"]
             for n in es.names for d in range(len(ticks))]
    save_csv(os.path.join(out, "depth.csv"), ["what", "repeats_or_depth", "source", "ce", "ppl", "median_rank", "top1"],
             rows)
    summary = {"checkpoint": es.loaded.path, "step": es.loaded.meta.get("step"), "seq_len": es.seq_len,
               "trained_repeats": R, "ppl_by_repeats": {n: {str(rr): float(np.exp(ce_rep[s, i]))
                                                           for i, rr in enumerate(reps)} for s, n in enumerate(es.names)},
               "lens_ce": {n: dict(zip(ticks, lens[n]["ce"].mean(1).round(5).tolist())) for n in es.names},
               "mean_settle_depth": {n: float(settle_depth(lens[n]["top1"]).mean()) for n in es.names},
               "options": options_record(opts), "seconds": round(time.time() - t0, 1)}
    save_json(os.path.join(out, "depth.json"), summary)
    figs = _figures(es, reps, ce_rep, lens, os.path.join(es.out_dir, "figures"), opts.formats)
    table = (["R'"] + [f"ppl {n}" for n in es.names],
             [[str(rr) + (" (trained)" if rr == R else "")] + [f"{np.exp(ce_rep[s, i]):.2f}" for s in
                                                                range(len(es.names))] for i, rr in enumerate(reps)])
    write_section(es.out_dir, "depth", "Recurrent depth: repetitions and logit lens",
                  [f"Checkpoint {es.loaded.path} (step {summary['step']}), trained with R = {R}. Mean depth at which "
                   "the top-1 prediction settles (0 = embedding, " + f"{len(ticks) - 1} = last layer): " +
                   ", ".join(f"{n} {v:.2f}" for n, v in summary["mean_settle_depth"].items()) +
                   ". Numbers: depth/depth.npz, depth.json, depth.csv."], table, figs, run=es.run)
    print(f"[depth] done in {time.time() - t0:.1f}s; wrote {out}", file=sys.stderr)
    return summary


APP = "moeut.analysis depth"


@typed_tool(APP, DepthOptions, summary="Recurrent depth: perplexity with R' repetitions of the shared layers, and "
            "the logit lens after every layer application (docs/analysis.md).",
            usage="python -m moeut.analysis depth checkpoint=<run dir> [repeats=[1,2,3]] [key=value ...]")
def main(opts: DepthOptions) -> Dict[str, object]:
    """Check the inputs (one-line errors, exit 1), then run `analyse`."""
    with bad_input_exits(APP):
        es = open_evalset(opts)
    return analyse(es, opts)
