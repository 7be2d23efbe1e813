# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # MLP expert specialisation across the shared layers (SPEC §7.2, F1–F4)
#
# Reads the statistics that `python -m moeut.analysis routing checkpoint=<run dir>` stored in
# `<run dir>/analysis/routing_stats.npz` (no model is run here) and the run's Hydra config.
# Set the run directory with the environment variable `MOEUT_RUN_DIR` (and optionally
# `MOEUT_ANALYSIS_DIR` if the statistics were written elsewhere); a relative path is taken from
# the directory the command was started in (`$PWD`), not from `analysis/`.

# %%
# %matplotlib inline
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display
from omegaconf import OmegaConf

from moeut.analysis import stats as A
from moeut.analysis import figures as F

# relative paths are taken from where the command was started, not from this folder
run_dir, analysis_dir = map(Path, A.notebook_dirs())
stats = A.load_stats(str(analysis_dir))
meta = stats["meta"]
run = meta.get("run_name") or Path(run_dir).name
G, R, NE, K = meta["n_groups"], meta["n_repeats"], meta["n_experts"], meta["k"]
print(f"run {run}: G={G}, R={R}, N_E={NE}, K={K}; {meta['n_tokens']} validation tokens, "
      f"perplexity {meta['val_ppl']:.2f}")

# %% [markdown]
# The run's resolved Hydra config (training `.hydra/config.yaml` or the checkpoint's `config.yaml`)
# and the analysis config.

# %%
run_cfg_path = meta.get("run_config")
if run_cfg_path and os.path.isfile(run_cfg_path):
    print(OmegaConf.to_yaml(OmegaConf.load(run_cfg_path)))
else:
    print("no Hydra config stored with the run; model config from the checkpoint:")
    print(OmegaConf.to_yaml(OmegaConf.create(meta["model_config"])))
if (analysis_dir / "analyze_config.yaml").is_file():
    print(OmegaConf.to_yaml(OmegaConf.load(analysis_dir / "analyze_config.yaml")))

# %% [markdown]
# ## F1 — expert usage by layer
# `P[r, e]` is the share of expert e's selections that happen at repetition r. Experts are ordered
# by the authors' thresholded "centre of mass" (0.9-quantile per expert, unnormalised score).

# %%
for g in range(G):
    p = A.expert_layer_usage(stats["mlp_counts"][g])
    order, score = A.com_order(p, 0.9)
    top_layer = p.argmax(0)
    print(f"g={g}: experts whose selections peak at each repetition:",
          np.bincount(top_layer[p.sum(0) > 0], minlength=R).tolist())
    display(F.plot_f1(stats, g, run))
    display(F.plot_f1(stats, g, run, normalised=True))

# %% [markdown]
# ## F2 — distinct experts per token id
# A token that always used the same K experts would sit at K; larger values mean the choice of
# expert depends on the context.

# %%
tec = A.token_counts_from_stats(stats)
for l in F.f2_layers(stats, None):
    n_used = A.distinct_experts_per_token(tec, int(stats["layer_g"][l]), int(stats["layer_r"][l]))
    seen = n_used[n_used > 0]
    print(f"layer {l + 1}: {len(seen)} token ids seen, median #experts {np.median(seen):.1f} (K = {K})")
display(F.plot_f2(stats, run))

# %% [markdown]
# ## F3 — per-layer share of each token's expert set (member g = 0)

# %%
top = A.top_tokens(stats["token_freq"], 6000)
img = A.layer_share_of_token_set(tec, 0, top)
print("mean share per layer (most frequent 100 tokens):", np.round(np.nanmean(img[:, :100], 1), 3).tolist())
display(F.plot_f3(stats, run, 0, 6000))

# %% [markdown]
# ## F4 — per-token Jaccard overlap between repetitions
# From the streamed sums over every validation position; the stored per-position expert sets
# (first `store_positions` positions) give the same matrix on their subset.

# %%
for g in range(G):
    j = A.jaccard_from_sums(stats["jaccard_sum"][g], int(stats["n_positions"]))
    print(f"g={g}: Jaccard between repetitions\n", np.round(j, 3))
    layers = [l for l in range(meta["n_layers"]) if stats["layer_g"][l] == g]
    layers.sort(key=lambda l: stats["layer_r"][l])
    subset = stats["sets"][:, layers, :]
    if len(subset):
        print("  same, from the first", len(subset), "stored positions:\n", np.round(A.jaccard_matrix(subset), 3))
    display(F.plot_f4(stats, run, g))
plt.close("all")

# %% [markdown]
# ## Beyond the paper: specialisation by source
# From `python -m moeut.analysis sources checkpoint=<run dir>` (`<analysis dir>/sources/sources.npz`):
# NMI between expert choice and source per layer application (0 = every source uses the experts
# alike, 1 = no expert serves two sources), and the MLP experts most specific to one source.

# %%
def beyond(name):
    """The npz of one of the expert analyses, or None (with the command that writes it)."""
    path = analysis_dir / name / f"{name}.npz"
    if not path.is_file():
        print(f"{path} not found: run python -m moeut.analysis {name} checkpoint={run_dir}")
        return None
    return np.load(path)


src = beyond("sources")
if src is not None:
    lab = [f"g{g} r{r}" for g, r in zip(src["layer_g"], src["layer_r"])]
    for kind in ("mlp", "att_v", "att_o"):
        print(f"NMI {kind:6s}", dict(zip(lab, np.round(src[f"nmi_{kind}"], 4).tolist())))
    spec = src["spec_mlp"]
    for l, e in np.argwhere(spec >= np.nanpercentile(spec, 99))[:10]:
        top = str(src["sources"][int(np.nanargmax(src["share_mlp"][:, l, e]))])
        print(f"{lab[l]} expert {e}: specialisation {spec[l, e]:.2f}, mostly {top}")

# %% [markdown]
# ## Beyond the paper: routing over training
# From `python -m moeut.analysis dynamics checkpoint=<run dir>` (train with `train.keep_every=N`):
# router saturation against the final checkpoint, per layer application.

# %%
dyn = beyond("dynamics")
if dyn is not None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for l in range(dyn["saturation_mlp"].shape[1]):
        ax.plot(dyn["steps"], dyn["saturation_mlp"][:, l], marker="o", label=f"g{dyn['layer_g'][l]} r{dyn['layer_r'][l]}")
    ax.set_xlabel("training step")
    ax.set_ylabel("MLP router saturation vs final")
    ax.legend(fontsize=7)
    display(fig)

# %% [markdown]
# ## Beyond the paper: causal knock-out
# From `python -m moeut.analysis knockout checkpoint=<run dir>`: the loss change (nats/token) when
# an expert is removed exactly; the ten most important single experts.

# %%
ko = beyond("knockout")
if ko is not None:
    mean = ko["delta"].mean(0)
    single = np.nonzero(ko["expert"] >= 0)[0]
    for j in single[np.argsort(-mean[single])][:10]:
        print(f"{ko['target'][j]:28s} delta {mean[j]:+.4f}  usage {ko['usage'][j] * 100:.2f} %")

# %% [markdown]
# ## Beyond the paper: recurrent depth
# From `python -m moeut.analysis depth checkpoint=<run dir>`: perplexity with R' repetitions, and
# the logit lens (mean loss after every layer application).

# %%
dep = beyond("depth")
if dep is not None:
    for s, name in enumerate(dep["sources"]):
        print(name, "perplexity by R':", dict(zip(dep["repeats"].tolist(), np.round(np.exp(dep["ce_repeats"][s]), 2).tolist())))
        print("  logit-lens loss by depth:", dict(zip(dep["depth_labels"].tolist(),
                                                      np.round(dep[f"lens_ce_{name}"].mean(1), 3).tolist())))
plt.close("all")
