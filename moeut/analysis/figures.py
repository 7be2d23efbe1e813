"""The figures of the expert analysis (SPEC 7.2): F1-F6 and the training-time routing metrics,
drawn from the arrays of routing_stats.npz (`moeut.analysis.stats.load_stats`) and the rows of
metrics.jsonl, each made and written by the one style helper (`moeut.analysis.style`).

`draw_all(stats, fig_dir, run=..., fcfg=...)` writes every figure and `<fig_dir>/index.json`;
the `plot_*` functions each return one matplotlib Figure (no pyplot state).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import stats as A
from . import style

# Fixed figure sizes in inches (PNG pixels = size * dpi; no tight bbox so sizes are predictable).
FIGSIZES = {
    "f1": (9.0, 4.5), "f2": (7.0, 4.5), "f3": (10.0, 4.5), "f4": (5.5, 4.5),
    "f5": (7.0, 4.0), "f6": (11.0, 6.0), "metrics_panel": (4.0, 3.0),
}


@dataclass
class FigureInfo:
    """One written figure: file stem `name`, `title`, one-sentence `caption`, `figsize` in inches, and
    the written `files` (one per format)."""
    name: str
    title: str
    caption: str  # one sentence on how to read it
    figsize: Tuple[float, float]
    files: List[str] = field(default_factory=list)


def _fig(kind: str, figsize=None, axes: bool = True):
    """A Figure of FIGSIZES[kind] (or `figsize`) from the one style helper, with one Axes
    (`axes`) or none (the caller lays out its own grid)."""
    fig, ax = style.figure(figsize or FIGSIZES[kind])
    if not axes:
        fig.delaxes(ax)
        ax = None
    return fig, ax


def _layer_label(l: int) -> str:
    return f"layer {l + 1}"  # 1-based absolute layer, as the authors' plots (SPEC 7.1)


def plot_f1(stats: Dict[str, Any], g: int, run: str, quantile: float = 0.9, normalised: bool = False):
    """F1 (SPEC 7.2): expert x layer usage P[r, e] of member `g`, experts ordered by the
    `quantile` centre of mass (`normalised` ordering variant); returns the Figure."""
    meta = stats["meta"]
    c = stats["mlp_counts"][g]  # [R, N_E]
    p = A.expert_layer_usage(c)
    order, _ = A.com_order(p, quantile, normalised)
    fig, ax = _fig("f1")
    im = ax.imshow(p[:, order], aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    R = meta["n_repeats"]
    layers = _layers_of_member(stats, g)
    ax.set_yticks(range(R))
    ax.set_yticklabels([_layer_label(l) for l in layers])
    ax.set_xlabel(f"expert rank (sorted by {'normalised ' if normalised else ''}thresholded centre of mass)")
    ax.set_ylabel("layer (repetition of member g)")
    ax.set_title(f"{run}: MLP expert usage by layer, g={g}" + (" (normalised order)" if normalised else ""))
    fig.colorbar(im, ax=ax, label="share of the expert's selections P[r, e]")
    return fig


def _layers_of_member(stats, g: int) -> List[int]:
    lg, lr = stats["layer_g"], stats["layer_r"]
    R = stats["meta"]["n_repeats"]
    out = []
    for r in range(R):
        hit = np.nonzero((lg == g) & (lr == r))[0]
        out.append(int(hit[0]) if len(hit) else r * stats["meta"]["n_groups"] + g)
    return out


def f2_layers(stats, layers: Optional[Sequence[int]]) -> List[int]:
    """The absolute 0-based layers F2 draws: `layers`, or by default at most 5 layers spread over
    the depth, every ceil(n_layers / 5)-th from 0: the paper's 0, 4, 8, 12, 16 for its 18 (and
    16-20) layers, every layer of a model with up to 5 (e.g. 0, 1, 2, 3 for the 4-layer default
    models). Raises ValueError naming figures.f2_layers for a layer outside 0..n_layers-1."""
    L = stats["meta"]["n_layers"]
    if layers is None:
        return list(range(0, L, max(1, math.ceil(L / 5))))
    bad = [l for l in layers if not 0 <= l < L]
    if bad:
        raise ValueError(f"figures.f2_layers: {bad} outside 0..{L - 1}")
    return list(layers)


def plot_f2(stats, run: str, layers: Optional[Sequence[int]] = None, max_tokens: int = 1000):
    """F2 (SPEC 7.2): distinct experts per token id at each of `f2_layers`, token ids sorted by
    count, the first `max_tokens`; returns the Figure."""
    tec = A.token_counts_from_stats(stats)
    fig, ax = _fig("f2")
    for l in f2_layers(stats, layers):
        g, r = int(stats["layer_g"][l]), int(stats["layer_r"][l])
        curve = A.f2_curve(A.distinct_experts_per_token(tec, g, r), max_tokens)
        ax.plot(np.arange(len(curve)), curve, label=_layer_label(l).capitalize())
    ax.set_xlabel(f"token rank (ascending #experts; first {max_tokens} token ids)")
    ax.set_ylabel("# distinct experts used by the token id")
    ax.set_title(f"{run}: distinct MLP experts per token id")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def plot_f3(stats, run: str, member: int = 0, n_top: int = 6000):
    """F3 (SPEC 7.2): per-layer share [R, n_top] of each of the `n_top` most frequent tokens'
    expert set, for group member `member`; returns the Figure."""
    tec = A.token_counts_from_stats(stats)
    top = A.top_tokens(stats["token_freq"], n_top)
    img = A.layer_share_of_token_set(tec, member, top)  # [R, n]
    fig, ax = _fig("f3")
    im = ax.imshow(img, aspect="auto", interpolation="nearest", cmap="magma", vmin=0, vmax=1)
    ax.set_yticks(range(img.shape[0]))
    ax.set_yticklabels([_layer_label(l) for l in _layers_of_member(stats, member)])
    ax.set_xlabel(f"token id, by descending frequency ({len(top)} most frequent)")
    ax.set_ylabel(f"layer (member g={member})")
    ax.set_title(f"{run}: share of each token's expert set used per layer, g={member}")
    fig.colorbar(im, ax=ax, label="|experts at layer| / |experts over all layers|")
    return fig


def plot_f4(stats, run: str, g: int = 0):
    """F4 (SPEC 7.2): mean per-token Jaccard overlap [R, R] of expert sets between the layers of
    member `g`; returns the Figure."""
    j = A.jaccard_from_sums(stats["jaccard_sum"][g], int(stats["n_positions"]))
    fig, ax = _fig("f4")
    im = ax.imshow(j, interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    labels = [_layer_label(l) for l in _layers_of_member(stats, g)]
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels)
    ax.set_title(f"{run}: per-token expert-set Jaccard, g={g}")
    fig.colorbar(im, ax=ax, label="mean Jaccard |A∩B| / |A∪B|")
    return fig


def plot_f5(stats, run: str, which: str, metrics_rows: Optional[List[dict]] = None):
    """which = "update" (mean ||x_out - x_in||) or "in_norm" (mean ||x_in||)."""
    key, train_prefix, ylabel = {
        "update": ("update_norm_sum", "activation_norm/abs_update_layer_", "mean ‖x_out − x_in‖₂"),
        "in_norm": ("in_norm_sum", "activation_norm/in_layer_", "mean ‖x_in‖₂"),
    }[which]
    vals = A.layer_means(stats[key], stats["norm_count"])
    fig, ax = _fig("f5")
    L = len(vals)
    if np.isfinite(vals).any():
        ax.plot(np.arange(1, L + 1), vals, "o-", label="validation pass (this analysis)")
    if metrics_rows:
        logged = A.final_layer_values(metrics_rows, train_prefix)
        if logged:
            ls = sorted(logged)
            ax.plot([l + 1 for l in ls], [logged[l] for l in ls], "s--", label="training log (last value)")
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{run}: {'update magnitude' if which == 'update' else 'residual norm'} per layer")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no norms recorded (model returned no in_norm/update_norm)",
                ha="center", va="center", transform=ax.transAxes)
    return fig


def plot_f6(stats, run: str, g: int, gate: str):
    """F6 (SPEC 7.2): attention expert usage per head of member `g`'s `gate` ("v" or "o"),
    counts [R, H, E_att] as per-head layer x expert maps; returns the Figure."""
    from matplotlib.ticker import MaxNLocator
    counts = stats[f"att_{gate}_counts"][g]  # [R, H, E_att]
    R, H, E = counts.shape
    fig, _ = _fig("f6", axes=False)
    gs = fig.add_gridspec(2, H)
    layers = _layers_of_member(stats, g)
    vmax = max(int(counts.max()), 1)
    im = None
    for h in range(H):
        ax = fig.add_subplot(gs[0, h])
        im = ax.imshow(counts[:, h, :], aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(f"head {h}")
        ax.set_xlabel("expert")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_yticks(range(R))
        ax.set_yticklabels([_layer_label(l) for l in layers] if h == 0 else [])
    fig.colorbar(im, ax=fig.axes[:H], label="selections (raw counts)")
    tot = A.att_sorted_totals(counts)  # [H, E]
    ax = fig.add_subplot(gs[1, :])
    width = 0.8 / H
    for h in range(H):
        ax.bar(np.arange(E) + h * width, tot[h], width=width,
               label=f"head {h} (min {tot[h].min()}, max {tot[h].max()})")
    ax.set_xlabel("expert rank within head (most used first)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("selections over all layers")
    ax.legend(fontsize="small")
    ppl = A.att_usage_rel_ppl(counts)
    fig.suptitle(f"{run}: attention {gate.upper()}-gate expert usage, g={g} (usage rel. ppl {ppl:.3f})")
    return fig


def _metric_panels(series: Dict[str, Tuple[np.ndarray, np.ndarray]]) -> Dict[str, Dict[str, Tuple]]:
    """Group keys "moe/g{g}/{name}" (and "moe/{name}") into panels by name; lines by member."""
    panels: Dict[str, Dict[str, Tuple]] = {}
    for key, sv in series.items():
        parts = key.split("/")
        if len(parts) >= 3 and parts[1].startswith("g") and parts[1][1:].isdigit():
            name, line = "/".join(parts[2:]), parts[1]
            if name.startswith("sel_overlap_l"):
                name, line = "sel_overlap", f"{parts[1]} l{name[len('sel_overlap_l'):]}"
        else:
            name, line = "/".join(parts[1:]), "all"
        panels.setdefault(name, {})[line] = sv
    return panels


def plot_training_metrics(rows: List[dict], run: str, prefix: str = "moe/"):
    """Every `prefix` key of metrics.jsonl `rows` against the step (SPEC 7.3), grouped into panels;
    returns the Figure, or None when no such key was logged."""
    series = A.metric_series(rows, prefix)
    if not series:
        return None
    panels = _metric_panels(series)
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    pw, ph = FIGSIZES["metrics_panel"]
    fig, _ = _fig("metrics_panel", figsize=(pw * ncol, ph * nrow + 0.5), axes=False)
    for i, (name, lines) in enumerate(sorted(panels.items())):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        for line, (steps, vals) in sorted(lines.items()):
            ax.plot(steps, vals, label=line)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize="x-small")
    fig.suptitle(f"{run}: training-time routing metrics ({prefix}* in metrics.jsonl)")
    return fig


CAPTIONS = {
    "f1": "Each column is one expert's selections spread over the layers where member g is applied "
          "(columns sum to 1); experts are sorted by the authors' thresholded centre of mass, so a "
          "diagonal band means experts specialise to layers, while bright full columns are experts "
          "shared by many layers.",
    "f1n": "The same matrix sorted by the true centre of mass of each expert's above-threshold mass "
           "(our normalised variant); a cleaner diagonal means stronger layer specialisation.",
    "f2": "For each shown layer, token ids (those seen in the data, first 1000 in ascending order) "
          "against the number of distinct experts they selected there; higher curves mean the "
          "expert choice depends on context rather than on the token alone.",
    "f3": "For the most frequent tokens (columns, most frequent first), the fraction of the token's "
          "whole expert set (over all repetitions of the member) that each layer uses; values near "
          "1 mean the layer uses most of the token's experts, low values mean layer-specific subsets.",
    "f4": "Mean per-token Jaccard overlap between the expert sets chosen at two repetitions of the "
          "same member; the diagonal is 1, and bright off-diagonal cells mean a token reuses the same "
          "experts in those layers.",
    "f5u": "Mean norm of the residual update each layer writes (‖x_out − x_in‖); growth towards the "
           "output means later layers make larger changes.",
    "f5n": "Mean norm of the residual stream entering each layer (‖x_in‖); with peri-LN it grows "
           "with depth because the residual itself is never normalised.",
    "f6": "Top: selections of each attention expert per layer and head (raw counts); bottom: each "
          "head's experts sorted by total use, with min and max in the legend; a flat bar profile "
          "means balanced expert use.",
    "metrics": "Routing metrics logged during training against the step: usage relative perplexity "
               "(1 = uniform), dead-expert fraction, universal score (how similar the layers' expert "
               "usage is) and the overlap with the previous application of the same member.",
}


def draw_all(stats: Dict[str, Any], fig_dir: str, *, run: str, fcfg,
             metrics_rows: Optional[List[dict]] = None) -> List[FigureInfo]:
    """Draw every figure into `fig_dir` in each of `fcfg.formats` at `fcfg.dpi` (`fcfg`: the
    `figures` options, moeut.analysis.routing_command.FigureOptions) and write its index.json;
    returns what was written, in report order. Raises ValueError naming figures.f2_layers,
    figures.f3_member or figures.f4_members for a layer or member outside the model."""
    os.makedirs(fig_dir, exist_ok=True)
    meta = stats["meta"]
    G = meta["n_groups"]
    infos: List[FigureInfo] = []

    def save(fig, name, title, caption):
        if fig is None:
            return
        info = FigureInfo(name, title, caption, tuple(float(x) for x in fig.get_size_inches()))
        for path in style.save(fig, os.path.join(fig_dir, name), fcfg.formats, fcfg.dpi):
            info.files.append(os.path.relpath(path, os.path.dirname(fig_dir)))
        infos.append(info)

    for g in range(G):
        save(plot_f1(stats, g, run, fcfg.quantile, False), f"f1_expert_layer_g{g}",
             f"F1: MLP expert usage by layer (g={g})", CAPTIONS["f1"])
        save(plot_f1(stats, g, run, fcfg.quantile, True), f"f1_expert_layer_g{g}_normalised",
             f"F1 (normalised ordering, g={g})", CAPTIONS["f1n"])
    save(plot_f2(stats, run, fcfg.f2_layers, fcfg.f2_max_tokens), "f2_expert_count_per_token_per_layer",
         "F2: distinct experts per token id", CAPTIONS["f2"])
    if not 0 <= fcfg.f3_member < G:
        raise ValueError(f"figures.f3_member: {fcfg.f3_member} outside 0..{G - 1}")
    save(plot_f3(stats, run, fcfg.f3_member, fcfg.f3_top_tokens), "f3_experts_per_token_per_layer",
         "F3: per-layer share of a token's expert set", CAPTIONS["f3"])
    for g in (fcfg.f4_members if fcfg.f4_members is not None else range(G)):
        if not 0 <= g < G:
            raise ValueError(f"figures.f4_members: {g} outside 0..{G - 1}")
        save(plot_f4(stats, run, g), f"f4_layer_similarity_g{g}", f"F4: expert-set overlap between layers (g={g})",
             CAPTIONS["f4"])
    save(plot_f5(stats, run, "update", metrics_rows), "f5_update_magnitude", "F5: update magnitude", CAPTIONS["f5u"])
    save(plot_f5(stats, run, "in_norm", metrics_rows), "f5_in_norm", "F5: residual norm", CAPTIONS["f5n"])
    if "att_v_counts" in stats:
        for g in range(G):
            for gate in ("v", "o"):
                save(plot_f6(stats, run, g, gate), f"f6_att_{gate}_g{g}",
                     f"F6: attention {gate.upper()} expert usage (g={g})", CAPTIONS["f6"])
    if metrics_rows:
        save(plot_training_metrics(metrics_rows, run), "training_routing_metrics",
             "Training-time routing metrics", CAPTIONS["metrics"])
    with open(os.path.join(fig_dir, "index.json"), "w") as f:
        json.dump({"dpi": fcfg.dpi, "figures": [dataclasses.asdict(i) for i in infos]}, f, indent=1)
    return infos
