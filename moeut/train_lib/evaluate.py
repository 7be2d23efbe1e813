"""Validation during training (SPEC §5.7): perplexity of the model on held-out token windows.

Owns `evaluate` (one validation set, windows split across DDP ranks, sums all-reduced) and
`validate` (every validation set of the run, as the `validation/<name>/...` keys the loop logs
to metrics.jsonl). Zero-shot evaluation after training lives in moeut.evaluate, not here.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .distributed import DistInfo, all_reduce_sum_
from .fsdp import is_sharded
from .precision import autocast


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, batch_size: int, device: torch.device,
             autocast_dtype: Optional[torch.dtype], dist: DistInfo) -> Dict[str, float]:
    """Perplexity of `model` on `dataset` (a WindowDataset of [T+1]-token windows) (SPEC 5.7).

    perplexity = exp(sum of token cross-entropies / number of predicted tokens), in nats per
    token before the exp. Windows are dealt round-robin to the ranks of `dist` and the
    [CE sum, token count] pair is all-reduced in fp64, so every rank returns the same value and
    the result does not depend on the world size or `batch_size`. A sharded (FSDP) model runs
    the same number of forwards on every rank (a rank short of windows repeats window 0,
    uncounted). The model's train/eval mode is restored afterwards.
    Returns {"loss": mean CE (nats), "perplexity": exp(loss), "tokens": count}.
    """
    was_training = model.training
    model.eval()
    idx = np.arange(len(dataset))[dist.rank::dist.world_size]
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [CE sum, tokens]
    n_local = len(idx)
    if is_sharded(model):  # FSDP forwards are collectives: every rank runs the same number of batches
        n_local = -(-len(dataset) // dist.world_size)
    for a in range(0, n_local, batch_size):
        if a >= len(idx):  # a rank with fewer windows joins the collective on window 0, not counted
            with autocast(device, autocast_dtype):
                model(dataset.batch(np.zeros(1, dtype=np.int64)).to(device)[:, :-1])
            continue
        w = dataset.batch(idx[a:a + batch_size]).to(device)
        with autocast(device, autocast_dtype):
            logits = model(w[:, :-1]).logits
        ce = F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum")
        sums += torch.stack([ce.double(), torch.tensor(w[:, 1:].numel(), dtype=torch.float64, device=device)])
    all_reduce_sum_([sums])
    model.train(was_training)
    loss = (sums[0] / sums[1]).item()
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(sums[1].item())}


def validate(model: torch.nn.Module, valid: Mapping[str, object], batch_size: int, device: torch.device,
             autocast_dtype: Optional[torch.dtype], dist: DistInfo) -> Dict[str, float]:
    """`evaluate` on every validation set of the run ({name: WindowDataset}, "val" first), as
    the record the loop logs: {"validation/<name>/loss": nats/token, "validation/<name>/perplexity",
    "validation/<name>/tokens": the number of predicted tokens it averages over}.
    A collective under DDP: every rank calls it."""
    res: Dict[str, float] = {}
    for name, ds in valid.items():
        r = evaluate(model, ds, batch_size, device, autocast_dtype, dist)
        res[f"validation/{name}/loss"], res[f"validation/{name}/perplexity"] = r["loss"], r["perplexity"]
        res[f"validation/{name}/tokens"] = r["tokens"]
    return res
