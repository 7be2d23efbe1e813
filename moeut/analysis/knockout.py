"""`python -m moeut.analysis knockout`: which experts matter causally (docs/analysis.md "Causal
knock-out").

An expert is knocked out exactly: its selection logit is set to -inf before the top-k (moeut.model.
knock_out), so the router picks the token's k experts from the others, and the expert contributes
nothing. A knock-out is one expert of one kind (σ-MoE MLP expert; SwitchHead value or output expert
(h, e) of head h) at one layer application (`scope=application`: unique layer g at repetition r) or
at every repetition of its unique layer (`scope=unique`: the shared weights removed), a whole block
(`blocks=true`: every expert of a kind at one application, i.e. the layer without that branch), or a
group given by hand (`groups`). Reports the change in validation loss (nats per token) per source.

Several knock-outs run in one forward: the batch of windows is repeated once per knock-out and each
copy gets its own mask (`knockouts_per_forward` copies; memory grows with batch_size x that).
Writes <out_dir>/knockout/{knockout.npz, knockout.json, knockout.csv}, figures and the report
section "knockout".
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..cli import bad_input_exits, option, typed_tool
from .evalset import EvalOptions, EvalSet, batches, label, open_evalset, options_record, save_csv, save_json, save_npz
from .probe import run_layers, token_ce
from .sources import KIND_NAMES, KINDS, expert_labels, route_counts


WHAT = ("expert", "branch", "group")  # a single expert, every expert of a kind (`blocks`), a hand-given group


@dataclass
class Target:
    """One knock-out: `name`, expert `kind`, and the experts removed per layer application
    (`experts`: l -> list of expert ids; attention expert (h, e) is h*E_att + e). `what` is one of
    WHAT; `l`, `g`, `r` say where (layer application, unique layer, repetition; -1 = every
    repetition, for scope=unique) and `expert` which single expert (-1 for a branch or a group)."""

    name: str
    kind: str
    experts: Dict[int, List[int]]
    l: int = -1
    g: int = -1
    r: int = -1
    expert: int = -1
    what: str = "expert"

    def columns(self) -> List[str]:
        """The CSV cells l, g, r, expert, the same for every kind of knock-out: "all" for every
        repetition (l and r of scope=unique) and for a whole branch (expert), "e+e+..." for a group."""
        experts = sorted({e for es in self.experts.values() for e in es})
        which = {"expert": str(self.expert), "branch": "all", "group": "+".join(map(str, experts))}[self.what]
        return ["all" if self.l < 0 else str(self.l), str(self.g), "all" if self.r < 0 else str(self.r), which]

    def where(self) -> str:
        """Where it is knocked out: "g0 r1" (a layer application) or "g0 (all r)" (scope=unique)."""
        return label(self.g, self.r) if self.r >= 0 else f"g{self.g} (all r)"


@dataclass
class KnockoutOptions(EvalOptions):
    """Options of `python -m moeut.analysis knockout`."""

    kinds: List[str] = option(default_factory=lambda: list(KINDS), help="expert kinds to knock out",
                              choices=list(KINDS))
    scope: str = option("application", help="a single knock-out removes the expert at one layer application, or "
                        "at every repetition of its unique layer", choices=["application", "unique"])
    blocks: bool = option(True, help="also knock out every expert of a kind at each layer application (the branch)")
    groups: List[str] = option(default_factory=list, help="extra group knock-outs kind/l/e+e+... (l: layer "
                               "application; attention expert (h, e) = h*E_att + e), e.g. mlp/0/3+17")
    max_experts: Optional[int] = option(None, help="at most this many single-expert knock-outs, sampled uniformly "
                                        "(seed); null = every expert", lo=1)
    seed: int = option(0, help="seed of the max_experts sample", lo=0)
    knockouts_per_forward: int = option(4, help="knock-outs evaluated in one forward (batch copies)", lo=1)
    max_tokens: int = option(2048, help="tokens per source (whole windows of T)", lo=1)
    batch_size: int = option(4, help="windows per forward and knock-out", lo=1)


def parse_group(spec: str, model_cfg, order: List[Tuple[int, int, int]]) -> Target:
    """Target of a `groups` entry kind/l/e+e+..., at layer application l of the model's execution
    `order` [(l, g, r)]. Raises ValueError naming `groups` when malformed or out of range."""
    parts = str(spec).split("/")
    if len(parts) != 3 or parts[0] not in KINDS:
        raise ValueError(f"groups: {spec!r} is not kind/l/e+e+... with kind one of {', '.join(KINDS)}")
    kind = parts[0]
    n_exp = model_cfg.ff_n_experts if kind == "mlp" else model_cfg.n_heads * model_cfg.att_n_experts
    try:
        l = int(parts[1])
        experts = sorted({int(e) for e in parts[2].split("+")})
    except ValueError:
        raise ValueError(f"groups: {spec!r}: layer and experts must be integers") from None
    if not 0 <= l < len(order):
        raise ValueError(f"groups: {spec!r}: layer application {l} is not in 0..{len(order) - 1}")
    if not experts or experts[0] < 0 or experts[-1] >= n_exp:
        raise ValueError(f"groups: {spec!r}: experts must be in 0..{n_exp - 1}")
    _, g, r = next(x for x in order if x[0] == l)
    return Target(name=f"group {spec}", kind=kind, experts={l: experts}, l=l, g=g, r=r, what="group")


def build_targets(opts: KnockoutOptions, model: torch.nn.Module) -> Tuple[List[Target], int]:
    """(knock-outs, number of single-expert candidates before `max_experts`) for the options.
    Raises ValueError naming the option for a malformed group or an empty selection."""
    cfg = model.config
    order = list(model.execution_order())
    n_exp = {"mlp": cfg.ff_n_experts, "att_v": cfg.n_heads * cfg.att_n_experts,
             "att_o": cfg.n_heads * cfg.att_n_experts}
    singles: List[Target] = []
    for kind in opts.kinds:
        labs = expert_labels(kind, cfg)
        if opts.scope == "application":
            for l, g, r in order:
                singles += [Target(f"{kind} {label(g, r)} {labs[e]}", kind, {l: [e]}, l, g, r, e)
                            for e in range(n_exp[kind])]
        else:
            for g in range(cfg.group_size):
                ls = [l for l, gg, _ in order if gg == g]
                singles += [Target(f"{kind} g{g} (all r) {labs[e]}", kind, {l: [e] for l in ls}, -1, g, -1, e)
                            for e in range(n_exp[kind])]
    n_candidates = len(singles)
    if opts.max_experts is not None and opts.max_experts < n_candidates:
        rng = np.random.default_rng(opts.seed)
        keep = np.sort(rng.choice(n_candidates, opts.max_experts, replace=False))
        singles = [singles[i] for i in keep]
    targets = list(singles)
    if opts.blocks:
        for kind in opts.kinds:
            targets += [Target(f"{kind} {label(g, r)} all experts", kind, {l: list(range(n_exp[kind]))}, l, g, r,
                               what="branch") for l, g, r in order]
    targets += [parse_group(s, cfg, order) for s in opts.groups]
    if not targets:
        raise ValueError("kinds: nothing to knock out (kinds=[] and no groups)")
    return targets, n_candidates


def masks_for(targets: List[Target], model_cfg, copies: int, device: torch.device) -> Dict[int, Dict[str, torch.Tensor]]:
    """moeut.analysis.probe.Knockouts for a forward whose batch is `copies` windows per target,
    target j's copies at rows j*copies .. (j+1)*copies - 1: l -> kind -> bool mask [B, 1, E] (MLP)
    or [B, 1, H, E_att] (attention)."""
    H, Ea, E = model_cfg.n_heads, model_cfg.att_n_experts, model_cfg.ff_n_experts
    B = copies * len(targets)
    out: Dict[int, Dict[str, torch.Tensor]] = {}
    for j, t in enumerate(targets):
        for l, experts in t.experts.items():
            kinds = out.setdefault(l, {})
            if t.kind not in kinds:
                kinds[t.kind] = torch.zeros((B, 1, E) if t.kind == "mlp" else (B, 1, H * Ea), dtype=torch.bool)
            kinds[t.kind][j * copies:(j + 1) * copies, 0, experts] = True
    for l in out:
        for kind in out[l]:
            m = out[l][kind]
            out[l][kind] = (m if kind == "mlp" else m.view(B, 1, H, Ea)).to(device)
    return out


@torch.no_grad()
def knockout_losses(model: torch.nn.Module, windows: np.ndarray, targets: List[Target], *, batch_size: int,
                    per_forward: int, device: torch.device, progress: Optional[str] = None) -> Tuple[float, np.ndarray]:
    """(baseline loss, loss per target [len(targets)]): mean cross-entropy in nats per token over
    `windows` [n, T+1], without and with each knock-out."""
    base_sum, n_tok = 0.0, 0
    sums = np.zeros(len(targets))
    t0 = time.time()
    for x, y in batches(windows, batch_size, device):
        base_sum += float(token_ce(run_layers(model, x)[0], y).double().sum())
        n_tok += y.numel()
        b = x.shape[0]
        for i in range(0, len(targets), per_forward):
            chunk = targets[i:i + per_forward]
            m = len(chunk)
            logits, _ = run_layers(model, x.repeat(m, 1), knockouts=masks_for(chunk, model.config, b, device))
            ce = token_ce(logits, y.repeat(m, 1)).double().view(m, -1).sum(1)
            sums[i:i + m] += ce.cpu().numpy()
        if progress:
            print(f"[knockout] {progress}: {n_tok} tokens x {len(targets)} knock-outs ({time.time() - t0:.1f}s)",
                  file=sys.stderr, flush=True)
    return base_sum / n_tok, sums / n_tok


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two 1-D arrays (average ranks for ties; NaN when constant)."""
    def ranks(v: np.ndarray) -> np.ndarray:
        _, inv, cnt = np.unique(v, return_inverse=True, return_counts=True)
        first = np.concatenate([[0], np.cumsum(cnt)[:-1]])
        return (first + (cnt - 1) / 2.0)[inv]

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def _figures(es: EvalSet, targets: List[Target], delta: np.ndarray, usage: np.ndarray, fig_dir: str,
             formats, scope: str) -> List[Tuple[str, str]]:
    from .style import figure, save

    out = []
    mean = delta.mean(0)
    single = np.array([t.expert >= 0 for t in targets])
    fig, ax = figure((6.4, 3.8))
    for kind in KINDS:
        sel = single & np.array([t.kind == kind for t in targets])
        if sel.any():
            ax.hist(mean[sel], bins=30, histtype="step", linewidth=1.5, label=f"{KIND_NAMES[kind]} ({sel.sum()})")
    ax.axvline(0, color="k", linewidth=0.8)
    ax.set_xlabel("change in validation loss when knocked out (nats/token, mean over sources)")
    ax.set_ylabel("knock-outs (single experts)")
    ax.set_title(f"{es.run}: distribution of knock-out effects ({scope})")
    ax.legend()
    save(fig, os.path.join(fig_dir, "knockout_effects"), formats)
    out.append((f"figures/knockout_effects.{formats[0]}", "Histogram of the loss change of every single-expert knock-out, per "
                "expert kind (right of 0: the expert helped)."))

    fig, ax = figure((6.4, 3.8))
    for kind in KINDS:
        sel = single & np.array([t.kind == kind for t in targets])
        if sel.any():
            ax.scatter(usage[sel] * 100, mean[sel], s=10, alpha=0.7, label=KIND_NAMES[kind])
    ax.set_xlabel("usage: share of the layer's routing slots (%, all sources)")
    ax.set_ylabel("loss change when knocked out (nats/token)")
    ax.set_title(f"{es.run}: importance against usage")
    ax.legend()
    save(fig, os.path.join(fig_dir, "knockout_vs_usage"), formats)
    out.append((f"figures/knockout_vs_usage.{formats[0]}", "Each expert's knock-out effect against how often it is selected."))

    blocks = [(j, t) for j, t in enumerate(targets) if t.what == "branch"]
    if blocks:
        order = sorted(es.model.execution_order())
        fig, ax = figure((6.4, 3.8))
        combos = [(kind, s) for kind in KINDS for s in range(len(es.names)) if any(t.kind == kind for _, t in blocks)]
        width = 0.8 / len(combos)
        for k, (kind, s) in enumerate(combos):
            xs = np.array([t.l for _, t in blocks if t.kind == kind])
            ys = [delta[s, j] for j, t in blocks if t.kind == kind]
            ax.bar(xs + (k - (len(combos) - 1) / 2) * width, ys, width, label=f"{KIND_NAMES[kind]}, {es.names[s]}")
        ax.set_xticks(range(len(order)), [label(g, r) for _, g, r in order])
        ax.set_xlabel("layer application (unique layer g, repetition r)")
        ax.set_ylabel("loss change without the branch (nats/token)")
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_title(f"{es.run}: knocking out every expert of a branch")
        ax.legend(fontsize=6, ncols=2)
        save(fig, os.path.join(fig_dir, "knockout_blocks"), formats)
        out.append((f"figures/knockout_blocks.{formats[0]}", "Loss change when all experts of one kind are knocked out at one "
                    "layer application (the MLP / attention branch removed there), per source."))
    return out


def analyse(es: EvalSet, opts: KnockoutOptions) -> Dict[str, object]:
    """Run every knock-out on every source and write numbers, figures and the report section;
    returns the JSON summary."""
    from .sections import write_section

    t0 = time.time()
    targets, n_candidates = build_targets(opts, es.model)
    if opts.max_experts is not None and opts.max_experts < n_candidates:
        warnings.warn(f"max_experts={opts.max_experts}: {opts.max_experts} of {n_candidates} single-expert "
                      f"knock-outs, sampled with seed={opts.seed}", stacklevel=2)
    base, delta, usage_c = {}, [], {k: 0 for k in KINDS}
    for name, w in es.windows.items():
        b, losses = knockout_losses(es.model, w, targets, batch_size=opts.batch_size,
                                    per_forward=opts.knockouts_per_forward, device=es.device, progress=name)
        base[name] = b
        delta.append(losses - b)
        rc = route_counts(es.model, w, opts.batch_size, es.device)
        for k in KINDS:
            usage_c[k] = usage_c[k] + rc[k]
    delta = np.stack(delta)  # [S, n_targets]
    # usage of a target: its experts' share of the layer's slots (mean over its applications; 1 for a branch)
    usage = np.array([np.mean([usage_c[t.kind][l, ids].sum() / usage_c[t.kind][l].sum() for l, ids in t.experts.items()])
                      for t in targets])
    out = os.path.join(es.out_dir, "knockout")
    names = es.names
    save_npz(os.path.join(out, "knockout.npz"), sources=np.array(names), target=np.array([t.name for t in targets]),
             kind=np.array([t.kind for t in targets]), l=np.array([t.l for t in targets]),
             g=np.array([t.g for t in targets]), r=np.array([t.r for t in targets]),
             expert=np.array([t.expert for t in targets]), what=np.array([t.what for t in targets]), delta=delta,
             usage=usage, base=np.array([base[n] for n in names]))
    save_csv(os.path.join(out, "knockout.csv"), ["target", "what", "kind", "l", "g", "r", "expert", "usage"] +
             [f"delta_{n}" for n in names] + ["delta_mean"],
             [[t.name, t.what, t.kind, *t.columns(), f"{usage[j]:.5f}"] + [f"{delta[s, j]:.6f}" for s in
              range(len(names))] + [f"{delta[:, j].mean():.6f}"] for j, t in enumerate(targets)])
    mean = delta.mean(0)
    single = [j for j, t in enumerate(targets) if t.expert >= 0]
    top = sorted(single, key=lambda j: -mean[j])[:10]
    corr = {k: _spearman(usage[[j for j in single if targets[j].kind == k]], mean[[j for j in single
                                                                                  if targets[j].kind == k]])
            for k in opts.kinds}
    summary = {"checkpoint": es.loaded.path, "step": es.loaded.meta.get("step"), "seq_len": es.seq_len,
               "scope": opts.scope, "base_loss": base, "n_knockouts": len(targets),
               "n_single_candidates": n_candidates,
               "most_important": [{"target": targets[j].name, "delta": {n: float(delta[s, j]) for s, n in
                                                                        enumerate(names)}, "usage": float(usage[j])}
                                  for j in top],
               "spearman_usage_importance": corr,
               "share_harmful": float(np.mean(mean[single] < 0)) if single else None,
               "options": options_record(opts), "seconds": round(time.time() - t0, 1)}
    save_json(os.path.join(out, "knockout.json"), summary)
    figs = _figures(es, targets, delta, usage, os.path.join(es.out_dir, "figures"), opts.formats, opts.scope)
    groups = [j for j, t in enumerate(targets) if t.what == "group"]
    branches = [j for j, t in enumerate(targets) if t.what == "branch"]
    table = (["knock-out", "what", "layer application", "usage %"] + [f"Δ loss {n}" for n in names],
             [[targets[j].name, targets[j].what, targets[j].where(), f"{usage[j] * 100:.2f}"]
              + [f"{delta[s, j]:+.4f}" for s in range(len(names))] for j in top + groups + branches])
    write_section(es.out_dir, "knockout", "Causal knock-out of experts",
                  [f"Checkpoint {es.loaded.path} (step {summary['step']}), {len(targets)} knock-outs ({opts.scope} "
                   f"scope), base loss " + ", ".join(f"{n} {base[n]:.4f}" for n in names) + " nats/token. Numbers: "
                   "knockout/knockout.npz, knockout.json, knockout.csv.",
                   "Spearman correlation of usage and importance: " +
                   ", ".join(f"{k} {v:.2f}" if v == v else f"{k} n/a (too few knock-outs)" for k, v in corr.items())
                   + f". The table lists the {len(top)} most important single experts, then every group ({len(groups)}) "
                   f"and branch ({len(branches)}) knock-out; usage = the knocked-out experts' share of the layer's "
                   "routing slots:"],
                  table, figs, run=es.run)
    print(f"[knockout] {len(targets)} knock-outs on {len(names)} sources in {time.time() - t0:.1f}s; wrote {out}",
          file=sys.stderr)
    return summary


APP = "moeut.analysis knockout"


@typed_tool(APP, KnockoutOptions, summary="Causal knock-out: the change in validation loss per source when one "
            "expert, a group or a whole branch is removed exactly (docs/analysis.md).",
            usage="python -m moeut.analysis knockout checkpoint=<run dir> [scope=application|unique] [key=value ...]")
def main(opts: KnockoutOptions) -> Dict[str, object]:
    """Check the inputs (one-line errors, exit 1), then run `analyse`."""
    with bad_input_exits(APP):
        es = open_evalset(opts)
        build_targets(opts, es.model)  # malformed groups fail here, before any work
    return analyse(es, opts)
