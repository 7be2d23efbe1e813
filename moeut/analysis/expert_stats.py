"""NumPy statistics of the expert analyses beyond the paper (docs/analysis.md "Beyond the paper"):
specialisation by source, usage entropy, router saturation. Pure functions of count arrays, so each
has a closed form to test against (tests/unit/analysis/test_expert_stats.py).

Counts are routing *slots*: a token that selects k experts adds 1 to each of its k experts.
Sources are weighted equally (each source's counts are normalised by its own total first).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

import torch


def source_conditional(counts_SX: np.ndarray) -> np.ndarray:
    """P(e | s) [S, X]: each source's share of its routing slots per expert (rows sum to 1; a
    source without slots gives a row of NaN)."""
    c = np.asarray(counts_SX, dtype=np.float64)
    tot = c.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return c / tot


def source_nmi(counts_SX: np.ndarray) -> float:
    """Normalised mutual information I(E; S) / H(S) in [0, 1] between the expert a routing slot
    selects and the source of its token, sources equally likely (H(S) = log S): 0 when every
    source uses the experts in the same proportions, 1 when no expert serves two sources.
    counts_SX [S, X] slots per source and expert. NaN for fewer than two sources."""
    S = counts_SX.shape[0]
    if S < 2:
        return float("nan")
    p_es = source_conditional(counts_SX)  # [S, X]
    p_e = p_es.mean(0)  # [X]: P(e) with P(s) = 1/S
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(p_es > 0, p_es * np.log(p_es / p_e[None, :]), 0.0)
    return float(terms.sum() / S / np.log(S))


def relative_share(counts_SX: np.ndarray) -> np.ndarray:
    """OLMoE-style usage relative to uniform [S, X]: P(e | s) * X, the share of source s's routing
    slots that expert e takes over the uniform share 1/X (1 = as often as under uniform routing,
    0 = never, X = every slot of the source)."""
    return source_conditional(counts_SX) * counts_SX.shape[-1]


def expert_specialisation(counts_SX: np.ndarray) -> np.ndarray:
    """Per expert [X]: S * max_s P(s | e) with sources equally likely (P(s | e) proportional to
    P(e | s)): 1 when the expert serves every source alike, S when it serves one source only (the
    share of an expert's tokens from its top source, OLMoE's domain specialisation, relative to
    uniform). NaN for an expert no source uses."""
    p_es = source_conditional(counts_SX)
    with np.errstate(invalid="ignore", divide="ignore"):
        p_se = p_es / p_es.sum(0, keepdims=True)
    return p_se.max(0) * counts_SX.shape[0]


def usage_entropy(counts_X: np.ndarray) -> np.ndarray:
    """Normalised entropy H(p) / log X of the usage p = counts / sum along the last axis (1 =
    uniform over the X experts, 0 = one expert takes every slot); [...] for counts [..., X]."""
    c = np.asarray(counts_X, dtype=np.float64)
    p = c / c.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    return h / np.log(c.shape[-1])


def dead_share(counts_X: np.ndarray) -> np.ndarray:
    """Share of the X experts (last axis) that no routing slot selected; [...] for counts [..., X]."""
    return (np.asarray(counts_X) == 0).mean(-1)


def saturation(idx_a: torch.Tensor, idx_b: torch.Tensor) -> torch.Tensor:
    """Router saturation (OLMoE): per position, the share of the k experts of idx_a [..., k] that
    are also among idx_b [..., k] (each row holds k distinct experts), as [...] float. The mean
    over positions of saturation(checkpoint t, final checkpoint) is the saturation at step t."""
    if idx_a.shape != idx_b.shape:
        raise ValueError(f"saturation: index shapes differ: {tuple(idx_a.shape)} vs {tuple(idx_b.shape)}")
    same = (idx_a[..., :, None] == idx_b[..., None, :]).any(-1)
    return same.float().mean(-1)


def counts_of(idx: torch.Tensor, n_experts: int) -> np.ndarray:
    """Routing slots per expert: idx [..., k] int (any leading shape; every slot counted) ->
    counts [n_experts] int64."""
    return torch.bincount(idx.reshape(-1).long(), minlength=n_experts).cpu().numpy()


def head_counts(idx_NHk: torch.Tensor, n_experts: int) -> np.ndarray:
    """Attention routing slots per head and expert: idx [N, H, k] (expert within the head) ->
    counts [H, n_experts] int64."""
    N, H, k = idx_NHk.shape
    glob = idx_NHk.long() + torch.arange(H, device=idx_NHk.device)[None, :, None] * n_experts
    return torch.bincount(glob.reshape(-1), minlength=H * n_experts).view(H, n_experts).cpu().numpy()


def top_indices(values: np.ndarray, n: int, labels: Sequence[str]) -> list:
    """[(label, value)] of the n largest finite values (descending)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    order = [i for i in np.argsort(-v) if np.isfinite(v[i])][:n]
    return [(labels[i], float(v[i])) for i in order]
