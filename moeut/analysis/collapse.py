"""`python -m moeut.analysis collapse`: what moves first when MoEUT's routing collapses at a high lr.

Trains the real run (the config train.py composes from `experiment` + overrides, its data, seed,
schedule and one torch thread, through moeut.train_lib: `validated_start` and `train_step`, the
steps run_loop takes) for `steps` steps with read-only probes, and records per step:

- the selection-gate logits z of every σ-MoE gate (kind mlp / att_v / att_o, unique layer g, over
  all R applications; recomputed from each module's inputs by a forward pre-hook): mean, std, max, and the selected gates sigmoid(z) at the top-k (mean, min);
  expert-usage perplexity / E of the step's selections (SPEC 1.5, 1.3);
- the norm of every W_S (`expert_sel`, `sel_v`, `sel_o`) and of the expert weights, and each
  step's update size ||W_after - W_before|| (absolute and relative to ||W_before||);
- every `split_every` steps, before the step and on its batch, the gradients of the CE and of the
  entropy regulariser (SPEC 1.7) on each W_S separately (a side forward/backward with torch's RNG
  restored): their norms and cosine; the real step's own W_S gradient (a read-only tensor hook)
  is recorded too, so grad_ce + grad_reg can be checked against it;
- the step's loss and gradient norm (StepResult) -- identical to an unprobed run's (tests).

Results: <out>/collapse_lr<lr>_s<seed>.npz (+ .json with the losses compared to a recorded
metrics.jsonl when `compare=` is given). With `runs=[a.npz,b.npz]` nothing is trained: the runs
are compared (figure <out>/collapse.png via moeut.analysis.style, and a table of the first step at
which each quantity of the higher-lr run leaves the lower-lr run's by more than `threshold`).
docs/results.md, "Diagnosis: what moves first".
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from moeut.cli import check_out_dir, option, typed_tool

from .collapse_probes import GATE_PARAMS, GateProbe, cosine, gate_params, probe_gates, split_gradients

APP = "moeut.analysis collapse"


# ------------------------------------------------------------------------------------------
# The run's config, as train.py composes it
# ------------------------------------------------------------------------------------------

def compose_train_config(overrides: Sequence[str]):
    """The typed TrainConfig train.py would build from `overrides` (Hydra compose against the
    package's conf/, `${hydra:...}` resolved as in a run). Raises ValueError naming the key on a
    bad value (moeut.train_lib.config.to_typed)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from moeut.paths import conf_dir
    from moeut.train_lib.config import register_configs, to_typed

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
            with open_dict(cfg):
                cfg.hydra.runtime.output_dir = tempfile.gettempdir()
            HydraConfig.instance().set_config(cfg)
            with open_dict(cfg):
                del cfg["hydra"]
            return to_typed(cfg, 1)
    finally:
        GlobalHydra.instance().clear()


# ------------------------------------------------------------------------------------------
# The probed run
# ------------------------------------------------------------------------------------------

def _arrays(rows: List[Dict[str, float]]) -> Dict[str, np.ndarray]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: np.array([r.get(k, np.nan) for r in rows], dtype=np.float64) for k in keys}


def probed_run(tc, steps: int, split_every: int = 5, probes: bool = True,
               log: Callable[[str], None] = print,
               on_progress: Optional[Callable[[Dict[str, np.ndarray]], None]] = None) -> Dict[str, np.ndarray]:
    """Train `steps` steps of the run `tc` (a TrainConfig) exactly as train.py's loop does (same
    start, data order, schedule over train.steps, clipping; no run dir is written: the start reads
    an empty temporary folder) and return per-step arrays: "step", "loss", "grad_norm", "lr", and
    with `probes` the gate statistics ("<kind>_g<g>/<stat>"), W_S and expert-weight norms and
    update sizes ("<param>/norm", "/update", "/rel_update"), and every `split_every` steps (0: never)
    the gradient split ("<param>/g_ce", "/g_reg", "/g_total", "/cos_ce_reg", "/g_step" the real
    step's gradient norm, "/split_err" = ||g_ce + g_reg - g_step|| / ||g_step||; NaN elsewhere).
    `on_progress` gets the arrays so far every 10 steps (to save a partial result).
    Raises ValueError when `steps` exceeds train.steps."""
    import torch
    from moeut.train_lib.config import micro_batch_size
    from moeut.train_lib.distributed import DistInfo, pick_device
    from moeut.train_lib.schedule import lr_at
    from moeut.train_lib.start import validated_start
    from moeut.train_lib.step import train_step

    t, o = tc.train, tc.optim
    if steps > t.steps:
        raise ValueError(f"steps: {steps} is more than the run's train.steps={t.steps}")
    if t.threads:
        torch.set_num_threads(t.threads)
    dist = DistInfo(device=pick_device(t.device, 0))
    with tempfile.TemporaryDirectory(prefix="moeut_collapse_") as run_dir:
        setup = validated_start(tc, run_dir, dist, lambda msg: log(msg))
    state, data, device = setup.state, setup.data, dist.device
    model = state.model
    mb = micro_batch_size(tc, 1)
    cfg = tc.model
    probe = GateProbe({"mlp": getattr(cfg, "ff_k", 1) or 1, "att_v": getattr(cfg, "att_k", 1) or 1,
                       "att_o": getattr(cfg, "att_k", 1) or 1})
    tracked = {n: p for n, p in model.named_parameters()
               if n.rsplit(".", 1)[-1] in GATE_PARAMS + ("keys", "values", "v", "o")}
    gates = gate_params(model)
    rows: List[Dict[str, float]] = []
    model.train()
    for _ in range(steps):
        step = state.step
        lr = lr_at(step, o.lr, o.warmup, t.steps, o.min_lr_ratio, o.schedule)
        collect = state.routing is not None and step % t.routing_every == 0
        window = data.train.batch(state.sampler.next()).to(device)
        row: Dict[str, float] = {"step": step + 1, "lr": lr}
        split, hooks, step_grad = None, [], {}
        if probes:
            before = {n: p.detach().clone() for n, p in tracked.items()}
            if split_every and step % split_every == 0:
                split = split_gradients(model, window, setup.autocast_dtype, device)

                def keep(name):
                    def hook(grad):
                        step_grad[name] = step_grad.get(name, 0) + grad.detach().clone()
                    return hook
                hooks = [p.register_hook(keep(n)) for n, p in gates.items()]
        ctx = probe_gates(model, probe) if probes else contextlib.nullcontext()
        try:
            with ctx:
                res = train_step(state, model, window, lr, micro_batch_size=mb, autocast_dtype=setup.autocast_dtype,
                                 grad_clip=o.grad_clip, collect_routing=collect, aux_loss_scope=t.aux_loss_scope)
        finally:
            for h in hooks:
                h.remove()
        if state.routing is not None and collect and (step + 1) % t.routing_interval == 0:
            state.routing.reset()  # the loop logs and resets them; nothing else reads them
        row.update(loss=res.loss, grad_norm=res.grad_norm)
        if probes:
            row.update(probe.summary())
            with torch.no_grad():
                for n, p in tracked.items():
                    d = float((p.detach() - before[n]).norm())
                    nb = float(before[n].norm())
                    row[f"{n}/norm"] = float(p.detach().norm())
                    row[f"{n}/update"] = d
                    row[f"{n}/rel_update"] = d / nb if nb > 0 else float("nan")
            if split is not None:
                for n, gr in split.items():
                    total = gr["ce"] + gr["reg"]
                    row[f"{n}/g_ce"] = float(gr["ce"].norm())
                    row[f"{n}/g_reg"] = float(gr["reg"].norm())
                    row[f"{n}/g_total"] = float(total.norm())
                    row[f"{n}/cos_ce_reg"] = cosine(gr["ce"], gr["reg"])
                    if n in step_grad:
                        gs = step_grad[n]
                        row[f"{n}/g_step"] = float(gs.norm())
                        row[f"{n}/split_err"] = float((total - gs).norm()) / max(float(gs.norm()), 1e-30)
        rows.append(row)
        if (step + 1) % 10 == 0:
            log(f"[collapse] step {step + 1}: loss {res.loss:.4f}, grad norm {res.grad_norm:.3f}")
            if on_progress is not None:
                on_progress(_arrays(rows))
    return _arrays(rows)


def compare_with_recorded(arrays: Dict[str, np.ndarray], metrics_path: Path, interval: int) -> Dict[str, Any]:
    """The probed run's train/loss over each logging window of `interval` steps (the mean the
    loop logs, summed in the same order) against the recorded metrics.jsonl's `train/loss` at the
    same steps: {"steps": [...], "probed": [...], "recorded": [...], "max_abs_diff": x}."""
    from moeut.rundir import read_metrics
    recorded = {int(r["step"]): float(r["train/loss"]) for r in read_metrics(metrics_path) if "train/loss" in r}
    steps, mine, theirs = [], [], []
    loss = arrays["loss"]
    for end in range(interval, len(loss) + 1, interval):
        if end not in recorded:
            continue
        s = 0.0
        for v in loss[end - interval:end]:
            s += float(v)
        steps.append(end)
        mine.append(s / interval)
        theirs.append(recorded[end])
    diff = max((abs(a - b) for a, b in zip(mine, theirs)), default=float("nan"))
    return {"steps": steps, "probed": mine, "recorded": theirs, "max_abs_diff": diff}


# ------------------------------------------------------------------------------------------
# Comparing runs: figure and "what moves first"
# ------------------------------------------------------------------------------------------

def _series(arr: Dict[str, np.ndarray], name: str) -> np.ndarray:
    """A quantity over steps; "<kind>/..." with kind mlp/att_v/att_o averages its unique layers, and
    "<param kind>/..." (expert_sel, sel_v, sel_o) averages every parameter of that kind."""
    if name in arr:
        return arr[name]
    if "/" not in name:
        raise KeyError(name)
    head, stat = name.split("/", 1)
    cols = [k for k in arr if k.endswith("/" + stat) and (k.split("/")[0].startswith(head + "_g")
                                                          or k.split("/")[0].rsplit(".", 1)[-1] == head)]
    if not cols:
        raise KeyError(name)
    return np.nanmean(np.stack([arr[c] for c in cols]), axis=0) if len(cols) > 1 else arr[cols[0]]


QUANTITIES = [  # (series, label, lr_scaled: update sizes scale with the lr alone, denominator series or None)
    ("mlp/z_std", "MLP gate logit std", False, None), ("att_v/z_std", "att V gate logit std", False, None),
    ("att_o/z_std", "att O gate logit std", False, None),
    ("mlp/z_mean", "MLP gate logit mean (difference / std)", False, "mlp/z_std"),
    ("att_v/z_mean", "att V gate logit mean (difference / std)", False, "att_v/z_std"),
    ("mlp/z_max", "MLP gate logit max", False, None), ("att_v/z_max", "att V gate logit max", False, None),
    ("att_o/z_max", "att O gate logit max", False, None),
    ("mlp/gate_mean", "MLP selected gate mean", False, None), ("att_v/gate_mean", "att V selected gate mean", False, None),
    ("att_o/gate_mean", "att O selected gate mean", False, None),
    ("mlp/usage", "MLP expert usage ppl / E", False, None), ("mlp_g0/usage", "MLP usage ppl / E, group 0", False, None),
    ("mlp_g1/usage", "MLP usage ppl / E, group 1", False, None),
    ("att_v/usage", "att V usage ppl / E", False, None), ("att_o/usage", "att O usage ppl / E", False, None),
    ("expert_sel/norm", "MLP W_S norm", False, None), ("sel_v/norm", "att W_S(V) norm", False, None),
    ("sel_o/norm", "att W_S(O) norm", False, None), ("keys/norm", "MLP W1 norm", False, None),
    ("values/norm", "MLP W2 norm", False, None),
    ("expert_sel/rel_update", "MLP W_S relative update (/ lr ratio)", True, None),
    ("sel_v/rel_update", "att W_S(V) relative update (/ lr ratio)", True, None),
    ("keys/rel_update", "MLP W1 relative update (/ lr ratio)", True, None),
    ("expert_sel/g_ce", "MLP W_S CE gradient norm", False, None),
    ("expert_sel/g_reg", "MLP W_S reg gradient norm", False, None),
    ("sel_v/g_reg", "att W_S(V) reg gradient norm", False, None),
    ("expert_sel/cos_ce_reg", "MLP W_S cos(CE grad, reg grad) (absolute difference)", False, None),
    ("loss", "training loss", False, None), ("grad_norm", "gradient norm (pre-clip)", False, None),
]


def _at(series: np.ndarray, steps: np.ndarray, s: int) -> float:
    """The last measured (non-NaN) value at or before step `s`; NaN if none."""
    m = (steps <= s) & ~np.isnan(series)
    return float(series[m][-1]) if m.any() else float("nan")


def first_departure(lo: Dict[str, np.ndarray], hi: Dict[str, np.ndarray], threshold: float,
                    lr_ratio: float, window: int = 3, at: Sequence[int] = (5, 10, 20, 30, 60, 100, 150)
                    ) -> List[Dict[str, Any]]:
    """For each of QUANTITIES: the first step from which the high-lr run's value differs from the
    low-lr run's by more than `threshold` at `window` consecutive measured steps; None if never.
    The difference is relative to the low run's |value| (or to its denominator series, e.g. the
    logit std for the logit mean; absolute for a cosine), after dividing the high run's update
    sizes by `lr_ratio` (what the lr alone explains). Each entry also has both runs' values at the
    steps `at` (the last measured value at or before each). Sorted by that step (never last)."""
    import warnings
    out = []
    steps = lo["step"]
    for name, label, lr_scaled, denom in QUANTITIES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (steps without a split)
                a, b = _series(lo, name), _series(hi, name)
                d = _series(lo, denom) if denom else None
        except KeyError:
            continue
        n = min(len(a), len(b))
        a, b = a[:n], b[:n]
        if lr_scaled:
            b = b / lr_ratio
        if name.endswith("cos_ce_reg"):
            rel = np.abs(b - a)
        else:
            rel = np.abs(b - a) / np.maximum(np.abs(d[:n] if d is not None else a), 1e-12)
        hit, run = None, 0
        measured = np.flatnonzero(~np.isnan(rel))
        for j, i in enumerate(measured):
            run = run + 1 if rel[i] > threshold else 0
            if run >= window:
                hit = int(steps[measured[j - window + 1]])
                break
        last = int(steps[n - 1]) if n else 0
        out.append({"quantity": name, "label": label, "first_step": hit,
                    "low": {s: _at(a, steps[:n], s) for s in at if s <= last},
                    "high": {s: _at(b * (lr_ratio if lr_scaled else 1), steps[:n], s) for s in at if s <= last}})
    return sorted(out, key=lambda r: (r["first_step"] is None, r["first_step"] or 0))


def plot_runs(runs: List[Tuple[str, Dict[str, np.ndarray]]], stem: Path) -> List[str]:
    """The comparison figure: 3 x 3 panels (loss; gate logit std and max; selected gate mean;
    expert usage; W_S norm; W_S relative update; reg vs CE gradient on W_S; their cosine), one
    colour per run, one line style per gate kind. Returns the written paths."""
    import warnings
    from .style import figure, save
    warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
    fig, axes = figure((13, 10), 3, 3)
    kinds = [("mlp", "-", "MLP"), ("att_v", "--", "att V"), ("att_o", ":", "att O")]
    pkinds = [("expert_sel", "-", "MLP"), ("sel_v", "--", "att V"), ("sel_o", ":", "att O")]
    panels = [("loss", None, "training loss (CE + reg)"), ("z_std", kinds, "gate logit std of z"),
              ("z_max", kinds, "gate logit max of z"), ("gate_mean", kinds, "selected gate sigmoid(z), mean"),
              ("usage", kinds, "expert-usage perplexity / E"), ("norm", pkinds, "||W_S|| (mean over layers)"),
              ("rel_update", pkinds, "||dW_S|| / ||W_S|| per step"), ("g_reg_over_ce", pkinds, "||g_reg|| / ||g_CE|| on W_S"),
              ("cos_ce_reg", pkinds, "cos(g_CE, g_reg) on W_S")]
    colours = ["tab:blue", "tab:red", "tab:green", "tab:orange"]
    for ax, (stat, ks, title) in zip(axes.flat, panels):
        for ci, (label, arr) in enumerate(runs):
            x = arr["step"]
            if ks is None:
                ax.plot(x, arr[stat], color=colours[ci % 4], label=label, lw=1)
                continue
            for kind, ls, kl in ks:
                try:
                    if stat == "g_reg_over_ce":
                        y = _series(arr, f"{kind}/g_reg") / _series(arr, f"{kind}/g_ce")
                    else:
                        y = _series(arr, f"{kind}/{stat}")
                except KeyError:
                    continue
                m = ~np.isnan(y)
                sparse = m.sum() < 0.5 * len(m)  # the gradient split: every split_every steps
                ax.plot(x[m], y[m], color=colours[ci % 4], ls=ls, lw=1, label=f"{label} {kl}",
                        marker="o" if sparse else None, ms=2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if stat in ("rel_update", "g_reg_over_ce"):
            ax.set_yscale("log")
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7)
    axes.flat[1].legend(fontsize=6, ncol=2)
    return save(fig, stem)


# ------------------------------------------------------------------------------------------
# The tool
# ------------------------------------------------------------------------------------------

@dataclass
class CollapseOptions:
    """Options of `python -m moeut.analysis collapse`."""
    out: str = option("outputs/collapse", help="folder for the npz (rewritten every 10 steps) and json of a run, "
                                               "or for the figure and table of runs=")
    experiment: str = option("cpu_result_moeut", help="the run's experiment (conf/experiment/)")
    lr: float = option(2e-3, lo=0, lo_open=True, help="optim.lr of the run")
    seed: int = option(0, help="train.seed of the run")
    steps: int = option(150, lo=1, help="steps to train (of the run's schedule over train.steps)")
    split_every: int = option(5, lo=0, help="gradient split (CE vs regulariser) every N steps; 0 = never")
    overrides: List[str] = option(default_factory=lambda: ["train.threads=1", "train.routing_interval=10",
                                                           "train.routing_every=1"],
                                  help="more train.py overrides (default: the recorded runs' common ones)")
    compare: Optional[str] = option(None, help="a recorded run's metrics.jsonl to compare the losses with")
    runs: List[str] = option(default_factory=list, help="npz files of probed runs to compare (no training)")
    threshold: float = option(0.2, lo=0, lo_open=True, help="relative difference that counts as 'moved'")


def _label(arr_path: str) -> str:
    return Path(arr_path).stem.replace("collapse_", "")


def work(o: CollapseOptions) -> Dict[str, Any]:
    """Train and probe one run, or (runs=...) compare probed runs; writes under `out`."""
    from moeut.cli import bad_input_exits
    out = Path(o.out)
    if o.runs:
        with bad_input_exits(APP):  # bad input: one line, exit 1, nothing written
            check_out_dir(o.out, "out")
            for r in o.runs:
                if not Path(r).is_file():
                    raise FileNotFoundError(f"runs: {r}: no such file")
            if o.compare:
                raise ValueError("compare: only for a training run, not with runs=")
        loaded = [(_label(r), dict(np.load(r))) for r in o.runs]
        lrs = [float(a["lr_peak"][0]) if "lr_peak" in a else float("nan") for _, a in loaded]
        written = plot_runs(loaded, out / "collapse")
        result: Dict[str, Any] = {"figure": written}
        if len(loaded) == 2:
            (lo_lab, lo), (hi_lab, hi) = sorted(zip(lrs, loaded), key=lambda t: t[0])
            lo_lab, lo, hi_lab, hi = lo[0], lo[1], hi[0], hi[1]
            ratio = max(lrs) / min(lrs)
            table = first_departure(lo, hi, o.threshold, ratio)
            at = sorted({s for r in table for s in r["low"]})
            lines = [f"What moves first: {hi_lab} against {lo_lab} (first of 3 consecutive measured steps with a "
                     f"relative difference > {o.threshold:g}; update sizes divided by the lr ratio {ratio:g} first). "
                     f"Values: low lr / high lr at each step (the last measured at or before it).", "",
                     "| quantity | first step | " + " | ".join(f"step {s}" for s in at) + " |",
                     "|---|---|" + "---|" * len(at)]
            for r in table:
                cells = [f"{r['low'][s]:.4g} / {r['high'][s]:.4g}" if s in r["low"] else "–" for s in at]
                lines.append(f"| {r['label']} | {r['first_step'] if r['first_step'] is not None else 'never'} | "
                             + " | ".join(cells) + " |")
            text = "\n".join(lines) + "\n"
            print(text, end="")
            out.mkdir(parents=True, exist_ok=True)
            (out / "collapse.md").write_text(text)
            (out / "collapse.json").write_text(json.dumps(table, indent=1))
            result["table"] = table
        print("figure: " + ", ".join(written))
        return result
    overrides = [f"experiment={o.experiment}", f"optim.lr={o.lr}", f"train.seed={o.seed}", *o.overrides]
    with bad_input_exits(APP):
        check_out_dir(o.out, "out")
        if o.compare and not Path(o.compare).is_file():
            raise FileNotFoundError(f"compare={o.compare}: no such file")
        tc = compose_train_config(overrides)
    stem = out / f"collapse_lr{o.lr:g}_s{o.seed}"
    out.mkdir(parents=True, exist_ok=True)

    def save(arrays: Dict[str, np.ndarray]) -> None:  # also every 10 steps: a stopped run leaves its steps so far
        np.savez_compressed(f"{stem}.npz", **arrays, lr_peak=np.array([o.lr]))

    arrays = probed_run(tc, o.steps, o.split_every, on_progress=save)
    save(arrays)
    info: Dict[str, Any] = {"overrides": overrides, "steps": o.steps}
    if o.compare:
        info["compare"] = compare_with_recorded(arrays, Path(o.compare), tc.train.log_interval)
        info["compare"]["file"] = o.compare
        print(f"losses against {o.compare}: max |difference| {info['compare']['max_abs_diff']:.3g} over "
              f"{len(info['compare']['steps'])} logged windows")
    errs = [float(np.nanmax(v)) for k, v in arrays.items() if k.endswith("/split_err") and np.any(~np.isnan(v))]
    if errs:
        info["split_err_max"] = max(errs)
    Path(f"{stem}.json").write_text(json.dumps(info, indent=1))
    print(f"wrote {stem}.npz, {stem}.json")
    return info


main = typed_tool(APP, CollapseOptions,
                  summary="Train the real run with read-only probes on the routing (gate logits, selected gates, W_S "
                          "norms and updates, CE vs regulariser gradient) and compare runs at two learning rates.",
                  usage="python -m moeut.analysis collapse lr=2e-3 steps=150 out=DIR [compare=METRICS]  |  "
                        "python -m moeut.analysis collapse runs=[A.npz,B.npz] out=DIR",
                  notes="A probed run's losses equal an unprobed run's bit for bit (tests/unit/analysis/test_collapse.py).")(work)
