"""`python -m moeut.analysis sources`: which experts serve which kind of text (docs/analysis.md
"Expert specialisation by source").

Routes several named evaluation texts (moeut.analysis.evalset) through a checkpoint in one pass and
reports, per layer application (unique layer g, repetition r) and expert kind (σ-MoE MLP experts;
SwitchHead value and output experts, one bank per head): the routing slots per source and expert,
the normalised mutual information between expert choice and source per layer, each source's usage
of each expert relative to uniform (OLMoE-style), and each expert's specialisation (its top source's
share, relative to uniform). Writes <out_dir>/sources/{sources.npz, sources.json, experts.csv},
figures, and the report section "sources".
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch

from ..cli import bad_input_exits, typed_tool
from . import expert_stats as X
from .evalset import EvalOptions, EvalSet, batches, label, open_evalset, options_record, save_csv, save_json, save_npz
from .probe import run_layers, token_ce

KINDS = ("mlp", "att_v", "att_o")
KIND_NAMES = {"mlp": "MLP experts", "att_v": "attention value experts", "att_o": "attention output experts"}


def route_counts(model: torch.nn.Module, windows: np.ndarray, batch_size: int, device: torch.device,
                 keep_idx: bool = False) -> Dict[str, object]:
    """Eval-mode pass of `model` over `windows` [n, T+1]: "mlp" [L, E], "att_v" / "att_o" [L, H*E_att]
    routing slots per layer application and expert (attention expert (h, e) at h*E_att + e), "ce_sum"
    (nats) and "tokens"; with keep_idx also "idx": kind -> [L, N, (H,) k] int16 selected experts of
    every position (for router saturation)."""
    cfg = model.config
    L, E, H, Ea = cfg.n_layers, cfg.ff_n_experts, cfg.n_heads, cfg.att_n_experts
    out: Dict[str, object] = {"mlp": np.zeros((L, E), np.int64), "att_v": np.zeros((L, H * Ea), np.int64),
                              "att_o": np.zeros((L, H * Ea), np.int64), "ce_sum": 0.0, "tokens": 0}
    idx: Dict[str, List[List[torch.Tensor]]] = {k: [[] for _ in range(L)] for k in KINDS}
    for x, y in batches(windows, batch_size, device):
        logits, records = run_layers(model, x, collect_routing=True)
        out["ce_sum"] += float(token_ce(logits, y).double().sum())
        out["tokens"] += y.numel()
        for rec in records:
            for kind, t in (("mlp", rec.mlp_idx), ("att_v", rec.att_v_idx), ("att_o", rec.att_o_idx)):
                if kind == "mlp":
                    out[kind][rec.l] += X.counts_of(t, E)
                    flat = t.reshape(-1, t.shape[-1])
                else:
                    flat = t.reshape(-1, H, t.shape[-1])
                    out[kind][rec.l] += X.head_counts(flat, Ea).reshape(-1)
                if keep_idx:
                    idx[kind][rec.l].append(flat.to(torch.int16).cpu())
    if keep_idx:
        out["idx"] = {k: torch.stack([torch.cat(v) for v in idx[k]]) for k in KINDS}
    return out


def expert_labels(kind: str, model_cfg) -> List[str]:
    """Names of the experts of `kind`: "e7" (MLP) or "h1e3" (attention head 1, expert 3)."""
    if kind == "mlp":
        return [f"e{e}" for e in range(model_cfg.ff_n_experts)]
    return [f"h{h}e{e}" for h in range(model_cfg.n_heads) for e in range(model_cfg.att_n_experts)]


def source_statistics(counts: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """From counts kind -> [S, L, X]: "nmi_<kind>" [L], "share_<kind>" [S, L, X] (usage relative to
    uniform), "spec_<kind>" [L, X] (expert specialisation), "dead_<kind>" [S, L] (share of experts a
    source never selects); see moeut.analysis.expert_stats."""
    out: Dict[str, np.ndarray] = {}
    for kind, c in counts.items():
        S, L, _ = c.shape
        out[f"nmi_{kind}"] = np.array([X.source_nmi(c[:, l]) for l in range(L)])
        out[f"share_{kind}"] = np.stack([X.relative_share(c[:, l]) for l in range(L)], 1)
        out[f"spec_{kind}"] = np.stack([X.expert_specialisation(c[:, l]) for l in range(L)])
        out[f"dead_{kind}"] = X.dead_share(c)
    return out


@dataclass
class SourcesOptions(EvalOptions):
    """Options of `python -m moeut.analysis sources` (those of every expert analysis)."""


def _figures(es: EvalSet, st: Dict[str, np.ndarray], fig_dir: str, formats) -> List[Tuple[str, str]]:
    from .style import figure, save

    labels = [label(g, r) for _, g, r in sorted(es.model.execution_order())]
    L = len(labels)
    written = []
    fig, ax = figure((6.4, 3.8))
    for kind in KINDS:
        ax.plot(range(L), st[f"nmi_{kind}"], marker="o", label=KIND_NAMES[kind])
    ax.set_xticks(range(L), labels, rotation=45)
    ax.set_xlabel("layer application (unique layer g, repetition r), in execution order")
    ax.set_ylabel("NMI(expert; source) = I / H(source)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{es.run}: how much the expert choice tells about the source")
    ax.legend()
    save(fig, os.path.join(fig_dir, "sources_nmi"), formats)
    written.append((f"figures/sources_nmi.{formats[0]}", "Normalised mutual information between expert choice and source per "
                    "layer application (0: every source uses the experts alike; 1: no expert is shared)."))

    names = es.names
    fig, axes = figure((3.2 * len(names) + 1.0, 3.4), ncols=len(names))
    axes = np.atleast_1d(axes)
    share = st["share_mlp"]
    with np.errstate(divide="ignore"):
        lg = np.log2(np.clip(share, 1 / 64, 64))
    for s, ax in enumerate(axes):
        im = ax.imshow(lg[s], aspect="auto", cmap="RdBu_r", vmin=-3, vmax=3, interpolation="nearest")
        ax.set_title(names[s])
        ax.set_xlabel("MLP expert")
        ax.set_yticks(range(L), labels)
    axes[0].set_ylabel("layer application")
    fig.colorbar(im, ax=list(axes), label="log2(usage / uniform)")
    save(fig, os.path.join(fig_dir, "sources_share_mlp"), formats)
    written.append((f"figures/sources_share_mlp.{formats[0]}", "Each source's use of each MLP expert relative to uniform "
                    "(log2; red = used more than 1/E of the source's slots, blue = less, -3 = never)."))

    fig, ax = figure((6.4, 3.8))
    S = len(names)
    for kind in KINDS:
        v = st[f"spec_{kind}"].ravel()
        v = v[np.isfinite(v)]
        ax.hist(v, bins=np.linspace(1, S, 21), histtype="step", linewidth=1.5, density=True, label=KIND_NAMES[kind])
    ax.set_xlabel(f"expert specialisation: S x top source's share of its slots (1 = even, {S} = one source)")
    ax.set_ylabel("density (experts x layer applications)")
    ax.set_title(f"{es.run}: specialisation of single experts")
    ax.legend()
    save(fig, os.path.join(fig_dir, "sources_specialisation"), formats)
    written.append((f"figures/sources_specialisation.{formats[0]}", "Distribution of per-expert specialisation over every "
                    "expert and layer application, per expert kind."))
    return written


def analyse(es: EvalSet, opts: SourcesOptions) -> Dict[str, object]:
    """Route every source, compute the statistics and write numbers, figures and the report
    section; returns the JSON summary."""
    from .sections import write_section

    t0 = time.time()
    cfg = es.loaded.config
    per: Dict[str, Dict[str, object]] = {}
    for name, w in es.windows.items():
        per[name] = route_counts(es.model, w, opts.batch_size, es.device)
        print(f"[sources] {name}: {len(w)} windows routed ({time.time() - t0:.1f}s)", file=sys.stderr, flush=True)
    counts = {k: np.stack([per[n][k] for n in es.names]) for k in KINDS}
    st = source_statistics(counts)
    order = es.model.execution_order()
    out = os.path.join(es.out_dir, "sources")
    save_npz(os.path.join(out, "sources.npz"), sources=np.array(es.names),
             layer_g=np.array([g for _, g, _ in order]), layer_r=np.array([r for _, _, r in order]),
             **{f"counts_{k}": v for k, v in counts.items()}, **st)
    rows = []
    for kind in KINDS:
        labs = expert_labels(kind, cfg)
        for l, g, r in order:
            for x, lab in enumerate(labs):
                top = int(np.nanargmax(st[f"share_{kind}"][:, l, x])) if counts[kind][:, l, x].sum() else -1
                rows.append([kind, l, g, r, lab, f"{st[f'spec_{kind}'][l, x]:.4f}",
                             es.names[top] if top >= 0 else ""] +
                            [f"{st[f'share_{kind}'][s, l, x]:.4f}" for s in range(len(es.names))])
    save_csv(os.path.join(out, "experts.csv"), ["kind", "l", "g", "r", "expert", "specialisation", "top_source"] +
             [f"share_{n}" for n in es.names], rows)
    summary = {
        "checkpoint": es.loaded.path, "step": es.loaded.meta.get("step"), "seq_len": es.seq_len,
        "sources": {n: {"windows": len(es.windows[n]), "tokens": per[n]["tokens"],
                        "ce": per[n]["ce_sum"] / per[n]["tokens"],
                        "ppl": float(np.exp(per[n]["ce_sum"] / per[n]["tokens"]))} for n in es.names},
        "nmi": {k: {label(g, r): float(st[f"nmi_{k}"][l]) for l, g, r in order} for k in KINDS},
        "most_specialised_mlp": [], "options": options_record(opts), "seconds": round(time.time() - t0, 1)}
    by_l = {l: (g, r) for l, g, r in order}
    spec = st["spec_mlp"]
    flat = [(spec[l, e], l, e) for l in range(spec.shape[0]) for e in range(spec.shape[1]) if np.isfinite(spec[l, e])]
    for v, l, e in sorted(flat, reverse=True)[:10]:
        g, r = by_l[l]
        top = es.names[int(np.nanargmax(st["share_mlp"][:, l, e]))]
        summary["most_specialised_mlp"].append({"layer": label(g, r), "expert": int(e), "specialisation": float(v),
                                                "source": top})
    save_json(os.path.join(out, "sources.json"), summary)
    figs = _figures(es, st, os.path.join(es.out_dir, "figures"), opts.formats)
    table = (["layer", "NMI mlp", "NMI att_v", "NMI att_o"] + [f"dead mlp ({n})" for n in es.names],
             [[label(*by_l[l])] + [f"{st[f'nmi_{k}'][l]:.3f}" for k in KINDS] +
              [f"{st['dead_mlp'][s, l]:.2f}" for s in range(len(es.names))] for l in sorted(by_l)])
    ppl = ", ".join(f"{n} {summary['sources'][n]['ppl']:.1f}" for n in es.names)
    write_section(es.out_dir, "sources", "Expert specialisation by source",
                  [f"Checkpoint {es.loaded.path} (step {summary['step']}), {es.seq_len}-token windows; sources and "
                   f"perplexities: {ppl}. Numbers: sources/sources.npz, sources/sources.json, sources/experts.csv.",
                   "NMI = I(expert; source) / H(source) with sources equally weighted: 0 when all sources use the "
                   "experts alike, 1 when no expert serves two sources."], table, figs, run=es.run)
    print(f"[sources] wrote {out} and the report section in {time.time() - t0:.1f}s", file=sys.stderr)
    return summary


APP = "moeut.analysis sources"


@typed_tool(APP, SourcesOptions, summary="Expert specialisation by data source: routing over several named "
            "evaluation texts, per layer application and expert (docs/analysis.md).",
            usage="python -m moeut.analysis sources checkpoint=<run dir> [sources=[name:path,...]] [key=value ...]")
def main(opts: SourcesOptions) -> Dict[str, object]:
    """Check the inputs (one-line errors, exit 1), then run `analyse`."""
    with bad_input_exits(APP):
        es = open_evalset(opts)
    return analyse(es, opts)
