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
# # Attention experts, residual norms and training-time routing metrics (SPEC §7.2 F5–F6, §7.3)
#
# Reads `<run dir>/analysis/routing_stats.npz` (from `python -m moeut.analysis routing`) and the run's
# `metrics.jsonl`. Set `MOEUT_RUN_DIR` (and optionally `MOEUT_ANALYSIS_DIR`); a relative path is
# taken from the directory the command was started in (`$PWD`), not from `analysis/`.

# %%
# %matplotlib inline
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display

from moeut.analysis import stats as A
from moeut.analysis import figures as F

# relative paths are taken from where the command was started, not from this folder
run_dir, analysis_dir = map(Path, A.notebook_dirs())
stats = A.load_stats(str(analysis_dir))
meta = stats["meta"]
run = meta.get("run_name") or Path(run_dir).name
metrics_path = Path(run_dir) / "metrics.jsonl"
rows = A.read_metrics_jsonl(str(metrics_path)) if metrics_path.is_file() else []
print(f"run {run}: {len(rows)} rows in metrics.jsonl")

# %% [markdown]
# ## F5 — update magnitude and residual norm per layer
# Means over every validation token of ‖x_out − x_in‖ and ‖x_in‖ (from the routing records), with
# the last values logged during training when `metrics.jsonl` has `activation_norm/*` keys.

# %%
upd = A.layer_means(stats["update_norm_sum"], stats["norm_count"])
inn = A.layer_means(stats["in_norm_sum"], stats["norm_count"])
rel = A.layer_means(stats["rel_update_sum"], stats["norm_count"])
for l in range(meta["n_layers"]):
    print(f"layer {l + 1}: |update| {upd[l]:.3f}  |x_in| {inn[l]:.3f}  |update|/|x_in| {rel[l]:.3f}")
display(F.plot_f5(stats, run, "update", rows))
display(F.plot_f5(stats, run, "in_norm", rows))

# %% [markdown]
# ## F6 — attention expert usage per head (V and O gates)

# %%
if "att_v_counts" in stats:
    for g in range(meta["n_groups"]):
        for gate in ("v", "o"):
            c = stats[f"att_{gate}_counts"][g]
            print(f"g={g} {gate.upper()}: usage rel. perplexity {A.att_usage_rel_ppl(c):.3f}; "
                  f"sorted totals per head {A.att_sorted_totals(c).tolist()}")
            display(F.plot_f6(stats, run, g, gate))
else:
    print("this model has no attention experts")

# %% [markdown]
# ## Training-time routing metrics (`moe/*` keys of metrics.jsonl)

# %%
series = A.metric_series(rows, "moe/")
for k, (steps, vals) in series.items():
    print(f"{k}: {len(steps)} points, last {vals[-1]:.4f} at step {int(steps[-1])}")
fig = F.plot_training_metrics(rows, run) if rows else None
if fig is not None:
    display(fig)
plt.close("all")
