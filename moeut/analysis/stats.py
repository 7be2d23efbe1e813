"""The arrays behind the expert-specialisation figures (SPEC §7), from stored statistics.

Everything here is plain NumPy on arrays that `python -m moeut.analysis routing` stores in
`<run dir>/analysis/` (`routing_stats.npz`), so figures and notebooks can be redrawn without rerunning the model.
Training-time metrics (`moeut.analysis.routing.RoutingStats`) reuse the usage functions below.

Conventions (SPEC 0): G group members, R repetitions, absolute layer l (execution order), N_E MLP
experts per unique layer, K active MLP experts, H heads, E_att attention experts per head,
V vocabulary. Token-expert counts N[g, r, e, v] are stored sparsely as a coordinate list
(`TokenExpertCounts`): one row per non-zero (g, r, e, v) with its count.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

# ------------------------------------------------------------------------------------------
# Usage distributions (SPEC 7.3; also F6)
# ------------------------------------------------------------------------------------------


def normalise(counts: np.ndarray, axis: int = -1) -> np.ndarray:
    """counts / sum(counts, axis); an all-zero slice stays all zero (no NaN)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=axis, keepdims=True)
    return np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)


def relative_perplexity(counts: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """SPEC 7.3 `usag_rel_perplexity` = exp(H(u)) / N with u = counts normalised along `axis`
    and N = counts.shape[axis]. 1.0 = uniform usage, 1/N = a single expert takes everything.
    The entropy uses u * log(max(u, eps)) so unused experts contribute 0 (the official eps clamp).
    An all-zero slice (nothing counted) gives NaN: there is no distribution to measure."""
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.shape[axis]
    u = normalise(counts, axis)
    h = -(u * np.log(np.maximum(u, eps))).sum(axis=axis)
    out = np.exp(h) / n
    empty = counts.sum(axis=axis) == 0
    return np.where(empty, np.nan, out)


def dead_fraction(counts: np.ndarray, axis: int = -1) -> np.ndarray:
    """SPEC 7.3 `dead_expert_proportion` = #{e : count_e = 0} / N_E along `axis`."""
    counts = np.asarray(counts)
    return (counts == 0).sum(axis=axis) / counts.shape[axis]


def histogram_intersection(usage: np.ndarray) -> np.ndarray:
    """SPEC 7.3 `layer_sel_similarity`: M[l, o] = sum_e min(u_l(e), u_o(e)) for the per-application
    usage distributions u_l (rows of `usage` [R, N_E], counts or probabilities; rows are
    normalised here). M is symmetric with diagonal 1 for every application that was used."""
    u = normalise(usage, axis=-1)  # [R, N_E]
    return np.minimum(u[:, None, :], u[None, :, :]).sum(-1)  # [R, R]


def universal_score(m: np.ndarray) -> float:
    """SPEC 7.3 `universal_score` = mean of all R^2 entries of M (diagonal included, so >= 1/R)."""
    return float(np.mean(m))


def offdiag_max_mean(m: np.ndarray) -> float:
    """[ours] mean_l max_{o != l} M[l, o]. The official `universal_score_optimist` takes the max
    including the diagonal and is therefore always 1 (SPEC 7.3); this is the informative version.
    NaN when R = 1 (no other application exists)."""
    r = m.shape[0]
    if r < 2:
        return float("nan")
    off = np.where(np.eye(r, dtype=bool), -np.inf, m)
    return float(off.max(axis=1).mean())


# ------------------------------------------------------------------------------------------
# F1: expert usage by layer, ordered by the thresholded "centre of mass" (SPEC 7.2)
# ------------------------------------------------------------------------------------------


def expert_layer_usage(counts: np.ndarray) -> np.ndarray:
    """F1: P[r, e] = C[r, e] / sum_r' C[r', e] for one group member; C [R, N_E] counts of
    selections of expert e at repetition r (all tokens, all K slots). Each used expert's column
    sums to 1; a never-selected expert's column is all zero."""
    return normalise(counts, axis=0)


def com_order(p: np.ndarray, quantile: float = 0.9, normalised: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """F1 ordering exactly as SPEC 7.2 (the authors' plot code):

        q_e     = quantile_{r}(P[., e], 0.9)      (linear interpolation, per expert over layers)
        score_e = sum_r r * P[r, e] * 1[P[r, e] > q_e]     (r 0-based; NOT renormalised)
        order   = argsort(score) ascending (stable: ties keep expert index order)

    With R = 9 only the largest entry of a column exceeds its 0.9-quantile, so the score is about
    r_max * P_max rather than a true centre of mass (SPEC 7.2 note, Appendix A item 3).

    `normalised=True` is our variant: the score is divided by the surviving mass, giving the true
    centre of mass of the above-threshold entries; a column with no entry above its quantile
    (e.g. perfectly flat, or unused) falls back to the plain centre of mass sum_r r * P[r, e].

    Returns (order [N_E] int, score [N_E] float).
    """
    p = np.asarray(p, dtype=np.float64)
    n_rep = p.shape[0]
    r = np.arange(n_rep, dtype=np.float64)[:, None]  # [R, 1]
    q = np.quantile(p, quantile, axis=0)  # [N_E], numpy default method = linear
    keep = p > q[None, :]
    score = (r * p * keep).sum(0)
    if normalised:
        mass = (p * keep).sum(0)
        plain = (r * p).sum(0)
        score = np.where(mass > 0, np.divide(score, mass, out=np.zeros_like(score), where=mass > 0), plain)
    order = np.argsort(score, kind="stable")
    return order, score


# ------------------------------------------------------------------------------------------
# Token x expert counts (F2, F3)
# ------------------------------------------------------------------------------------------


@dataclass
class TokenExpertCounts:
    """Sparse N[g, r, e, v]: number of times input token id v selected MLP expert e at
    repetition r of group member g. Coordinate list with unique (g, r, e, v) rows, count > 0."""

    g: np.ndarray  # [nnz] int
    r: np.ndarray
    e: np.ndarray
    v: np.ndarray
    count: np.ndarray  # [nnz] int64
    shape: Tuple[int, int, int, int]  # (G, R, N_E, V)

    @classmethod
    def from_dense(cls, n: np.ndarray) -> "TokenExpertCounts":
        """From a dense count array n[G, R, N_E, V] (its non-zero entries)."""
        n = np.asarray(n)
        g, r, e, v = np.nonzero(n)
        return cls(g, r, e, v, n[g, r, e, v].astype(np.int64), tuple(int(s) for s in n.shape))

    @classmethod
    def from_keys(cls, keys: np.ndarray, counts: np.ndarray, shape: Sequence[int]) -> "TokenExpertCounts":
        """From flat keys ((g*R + r)*N_E + e)*V + v (unique) and their counts."""
        G, R, NE, V = (int(s) for s in shape)
        keys = np.asarray(keys, dtype=np.int64)
        v = keys % V
        rest = keys // V
        e = rest % NE
        rest = rest // NE
        r = rest % R
        g = rest // R
        return cls(g, r, e, v, np.asarray(counts, dtype=np.int64), (G, R, NE, V))

    def to_dense(self) -> np.ndarray:
        """The dense int64 array [G, R, N_E, V] (memory G*R*N_E*V*8 bytes: for tests and small models)."""
        out = np.zeros(self.shape, dtype=np.int64)
        np.add.at(out, (self.g, self.r, self.e, self.v), self.count)
        return out

    def select(self, g: int, r: Optional[int] = None) -> np.ndarray:
        """Bool mask [nnz] of the entries of group member g (and repetition r when given)."""
        m = self.g == g
        if r is not None:
            m &= self.r == r
        return m


def distinct_experts_per_token(counts: TokenExpertCounts, g: int, r: int) -> np.ndarray:
    """F2: n_used[v] = #{e : N[g, r, e, v] > 0} for the application (g, r), shape [V]."""
    m = counts.select(g, r) & (counts.count > 0)
    return np.bincount(counts.v[m], minlength=counts.shape[3])


def f2_curve(n_used: np.ndarray, max_tokens: int = 1000) -> np.ndarray:
    """F2 curve: drop tokens with n_used = 0, sort ascending, keep the first `max_tokens`."""
    vals = np.sort(np.asarray(n_used)[np.asarray(n_used) > 0], kind="stable")
    return vals[:max_tokens]


def top_tokens(token_freq: np.ndarray, n: int = 6000) -> np.ndarray:
    """The `n` most frequent token ids (frequency over all window tokens), descending frequency,
    ties broken by smaller id; tokens that never occur are excluded (so fewer than n may return)."""
    freq = np.asarray(token_freq)
    order = np.lexsort((np.arange(len(freq)), -freq))  # primary -freq, secondary id
    order = order[freq[order] > 0]
    return order[:n]


def layer_share_of_token_set(counts: TokenExpertCounts, g: int, token_ids: np.ndarray) -> np.ndarray:
    """F3 (appendix Fig. 15) for member g: S[r, v] = #{e : N_g[r, e, v] > 0},
    U[v] = #{e : sum_r N_g[r, e, v] > 0}, img[r, i] = S[r, v_i] / U[v_i] for v_i in `token_ids`.
    Shape [R, len(token_ids)]; NaN for a token with an empty set (it never occurred)."""
    _, R, NE, V = counts.shape
    m = counts.select(g) & (counts.count > 0)
    r, e, v = counts.r[m], counts.e[m], counts.v[m]
    s = np.zeros((R, V), dtype=np.float64)
    np.add.at(s, (r, v), 1.0)  # rows are unique (g, r, e, v), so each adds one distinct expert
    pairs = np.unique(e.astype(np.int64) * V + v)  # distinct (e, v) over all repetitions
    u = np.bincount(pairs % V, minlength=V).astype(np.float64)
    token_ids = np.asarray(token_ids, dtype=np.int64)
    uu = u[token_ids]
    return np.divide(s[:, token_ids], uu[None, :], out=np.full((R, len(token_ids)), np.nan), where=uu[None, :] > 0)


# ------------------------------------------------------------------------------------------
# F4: per-token overlap between repetitions
# ------------------------------------------------------------------------------------------


def set_intersections(sets: np.ndarray) -> np.ndarray:
    """|S_a ∩ S_b| for every position and pair of applications: sets [N, R, K] (expert ids, distinct
    within each set) -> [N, R, R]."""
    sets = np.asarray(sets)
    eq = sets[:, :, None, :, None] == sets[:, None, :, None, :]  # [N, R, R, K, K]
    return eq.sum(axis=(-1, -2))


def jaccard_matrix(sets: np.ndarray) -> np.ndarray:
    """F4 from explicit per-position expert sets [N, R, K] of one member:
    J(l, o) = mean_i |S_il ∩ S_io| / |S_il ∪ S_io|, with |A ∪ B| = 2K - |A ∩ B|. [R, R], diagonal 1."""
    sets = np.asarray(sets)
    k = sets.shape[-1]
    inter = set_intersections(sets).astype(np.float64)
    return (inter / (2 * k - inter)).mean(0)


def jaccard_from_sums(jaccard_sum: np.ndarray, n_positions: int) -> np.ndarray:
    """F4 from the streaming accumulation of `moeut.analysis.routing.RoutingStats.add` (sum over
    positions of J_i)."""
    if n_positions <= 0:
        raise ValueError("jaccard_from_sums: n_positions must be > 0 (no positions were analysed)")
    return np.asarray(jaccard_sum, dtype=np.float64) / n_positions


def consecutive_overlap(sets: np.ndarray) -> np.ndarray:
    """SPEC 7.3 `layer_sel_overlap`: for r >= 1, mean_i |S_i,r ∩ S_i,r-1| / K (same member, previous
    application). sets [N, R, K] -> [R - 1]."""
    sets = np.asarray(sets)
    k = sets.shape[-1]
    inter = set_intersections(sets)
    return np.array([inter[:, r, r - 1].mean() / k for r in range(1, sets.shape[1])])


# ------------------------------------------------------------------------------------------
# F5: update magnitude and residual norm per layer
# ------------------------------------------------------------------------------------------


def layer_means(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-layer means from streamed sums (F5: mean ||x_out - x_in||, mean ||x_in||, ...).
    NaN where a layer recorded nothing."""
    sums = np.asarray(sums, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    return np.divide(sums, counts, out=np.full_like(sums, np.nan), where=counts > 0)


# ------------------------------------------------------------------------------------------
# F6: attention expert usage
# ------------------------------------------------------------------------------------------


def att_sorted_totals(counts: np.ndarray) -> np.ndarray:
    """F6 bar plot: counts [R, H, E_att] of one unique attention module and one gate (V or O)
    -> per head, total selections over repetitions sorted descending, [H, E_att]."""
    tot = np.asarray(counts).sum(0)
    return -np.sort(-tot, axis=-1)


def att_usage_rel_ppl(counts: np.ndarray) -> float:
    """F6 `usag_rel_perplexity`: mean over heads of the relative perplexity of each head's usage
    distribution (summed over repetitions). counts [R, H, E_att]."""
    return float(np.nanmean(relative_perplexity(np.asarray(counts).sum(0), axis=-1)))


# ------------------------------------------------------------------------------------------
# Logged scalars (metrics.jsonl)
# ------------------------------------------------------------------------------------------


def read_metrics_jsonl(path: str) -> List[dict]:
    """Rows of a run's metrics.jsonl (one JSON object per line, each with "step"), read by
    `moeut.rundir.read_jsonl`: a cut last line (no newline: a crash mid-write) is skipped with a
    warning naming file:line; any other malformed line raises CorruptRunFile (a ValueError)
    naming the file and line number; blank lines are skipped."""
    from ..rundir import read_jsonl
    return read_jsonl(path).records


def metric_series(rows: Iterable[dict], prefix: str = "moe/") -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """{key: (steps, values)} for every finite numeric key starting with `prefix`, over rows that
    carry a "step"; sorted by step."""
    out: Dict[str, List[Tuple[float, float]]] = {}
    for row in rows:
        if "step" not in row:
            continue
        for k, v in row.items():
            if k.startswith(prefix) and isinstance(v, (int, float)) and not isinstance(v, bool) \
                    and math.isfinite(v):
                out.setdefault(k, []).append((float(row["step"]), float(v)))
    res = {}
    for k, pts in sorted(out.items()):
        pts.sort()
        res[k] = (np.array([p[0] for p in pts]), np.array([p[1] for p in pts]))
    return res


def final_layer_values(rows: Iterable[dict], prefix: str) -> Dict[int, float]:
    """Last logged value of every key `<prefix><l>` (e.g. "activation_norm/abs_update_layer_"),
    as {l: value}; used for F5 from training logs (SPEC 7.2)."""
    last: Dict[int, Tuple[float, float]] = {}
    for row in rows:
        step = float(row.get("step", -1))
        for k, v in row.items():
            if k.startswith(prefix) and k[len(prefix):].isdigit() and isinstance(v, (int, float)):
                l = int(k[len(prefix):])
                if l not in last or step >= last[l][0]:
                    last[l] = (step, float(v))
    return {l: sv[1] for l, sv in sorted(last.items())}


def user_path(path: str, environ: Optional[Dict[str, str]] = None) -> str:
    """`path` as an absolute path, a relative one taken from where the user stands: the shell's
    `$PWD` (a notebook kernel runs in the notebook's folder, `analysis/`, but inherits the $PWD
    of the shell that started `jupytext --execute` or `jupyter lab`), else the current
    directory. `~` is expanded."""
    env = os.environ if environ is None else environ
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return os.path.normpath(path)
    base = env.get("PWD")
    if not base or not os.path.isabs(base) or not os.path.isdir(base):
        base = os.getcwd()
    return os.path.normpath(os.path.join(base, path))


def notebook_dirs(environ: Optional[Dict[str, str]] = None) -> Tuple[str, str]:
    """(run dir, analysis dir) of the analysis notebooks, from `MOEUT_RUN_DIR` and the optional
    `MOEUT_ANALYSIS_DIR` (default `<run dir>/analysis`), relative paths taken from where the user
    stands (`user_path`). Raises ValueError when MOEUT_RUN_DIR is unset and FileNotFoundError
    naming the variable, its value and the resolved path when a directory does not exist."""
    env = os.environ if environ is None else environ
    given = env.get("MOEUT_RUN_DIR")
    if not given:
        raise ValueError("MOEUT_RUN_DIR: not set; set it to a run directory analysed with "
                         "`python -m moeut.analysis routing checkpoint=<run dir>`")
    run_dir = user_path(given, env)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"MOEUT_RUN_DIR={given}: no such directory ({run_dir})")
    analysis_dir = os.path.join(run_dir, "analysis")
    if env.get("MOEUT_ANALYSIS_DIR"):
        analysis_dir = user_path(env["MOEUT_ANALYSIS_DIR"], env)
        if not os.path.isdir(analysis_dir):
            raise FileNotFoundError(f"MOEUT_ANALYSIS_DIR={env['MOEUT_ANALYSIS_DIR']}: no such directory "
                                    f"({analysis_dir})")
    return run_dir, analysis_dir


def load_stats(path: str) -> Dict[str, np.ndarray]:
    """Load `routing_stats.npz` (written by `python -m moeut.analysis routing`) into a plain dict of
    arrays; the JSON metadata stored under key "meta_json" is decoded into stats["meta"]."""
    if os.path.isdir(path):
        path = os.path.join(path, "routing_stats.npz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"routing statistics not found: {path} (run `python -m moeut.analysis routing "
                                f"checkpoint=<run dir>` first)")
    with np.load(path, allow_pickle=False) as z:
        stats = {k: z[k] for k in z.files}
    stats["meta"] = json.loads(str(stats.pop("meta_json")))
    return stats


def token_counts_from_stats(stats: Dict[str, np.ndarray]) -> TokenExpertCounts:
    """The token x expert counts (F2, F3; SPEC 7.2) stored in a routing-statistics dict (`tok_g`,
    `tok_r`, `tok_e`, `tok_v`, `tok_count` [nnz] and the shape from `meta`); KeyError if absent."""
    m = stats["meta"]
    return TokenExpertCounts(stats["tok_g"].astype(np.int64), stats["tok_r"].astype(np.int64),
                             stats["tok_e"].astype(np.int64), stats["tok_v"].astype(np.int64),
                             stats["tok_count"].astype(np.int64),
                             (m["n_groups"], m["n_repeats"], m["n_experts"], m["vocab_size"]))
