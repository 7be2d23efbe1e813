"""The one routing accumulator (SPEC 7.1, 7.3): training's routing metrics and the offline
expert analysis both count routing here, from the model's routing records.

Training: the loop calls the model with `collect_routing=True` on the steps it samples (every 10th
step and every eval step in the authors' code), passes `out.routing` to `RoutingStats.update`,
all-reduces `state_counts()` (SUM) across ranks before logging, then logs `compute()` and
`heatmap_figure(g)` and calls `reset()`. Keep separate instances for train and eval.

Counts come from the forward's output records, never from module hooks, so activation
checkpointing (which re-runs forwards) cannot count anything twice.

    stats = RoutingStats(n_groups=G, n_repeats=R, n_experts=N_E, att_n_heads=H, att_n_experts=E_att)
    stats.update(out.routing)
    for k, t in stats.state_counts().items(): dist.all_reduce(t)   # tensors are updated in place
    logger.log(stats.compute(), step=step); stats.reset()

Offline (`moeut.analysis.collect`): `RoutingStats(..., vocab_size=V, store_positions=n)` and
`add(input_ids, records)` per batch also count (g, r, expert, token id) tuples, the per-position
overlaps between every pair of repetitions, the residual norms and the first `store_positions`
expert sets; `arrays()` is the content of routing_stats.npz. These extras are host-side NumPy
arrays outside `state_counts()`, so training's all-reduce and checkpointed counts are unchanged.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..outputs import RoutingRecord
from . import stats as A


def _check_idx(t: torch.Tensor, n: int, what: str, rec: RoutingRecord) -> None:
    # One host sync per record; update() runs only on the sampled steps, never inside the forward.
    if t.numel() == 0:  # every position padded
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"RoutingRecord l={rec.l} (g={rec.g}, r={rec.r}): {what} has values in "
                         f"[{lo}, {hi}], expected 0..{n - 1}")


class _SparseCounter:
    """Counts of int64 keys, merged in bounded-memory chunks (np.unique on the concatenation)."""

    def __init__(self, flush_at: int = 1 << 22):
        self.keys = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)
        self._buf: List[Tuple[np.ndarray, np.ndarray]] = []
        self._n = 0
        self.flush_at = flush_at

    def add(self, keys: np.ndarray, counts: np.ndarray) -> None:
        """Buffer (keys [n] int64, counts [n]) pairs; coalesced once flush_at pairs are buffered."""
        self._buf.append((keys, counts))
        self._n += len(keys)
        if self._n >= self.flush_at:
            self.coalesce()

    def coalesce(self) -> None:
        """Merge the buffered pairs into the sorted unique `keys` with summed `counts`."""
        if not self._buf:
            return
        k = np.concatenate([self.keys] + [b[0] for b in self._buf])
        c = np.concatenate([self.counts] + [b[1] for b in self._buf])
        self.keys, inv = np.unique(k, return_inverse=True)
        self.counts = np.bincount(inv.reshape(-1), weights=c, minlength=len(self.keys)).astype(np.int64)
        self._buf, self._n = [], 0


class RoutingStats:
    """Accumulates MLP expert counts [G, R, N_E], attention V/O counts [G, R, H, E_att], the
    overlap of each application's expert sets with the previous application of the same member,
    and the mean min/max selected gate, over any number of `update` calls (training, SPEC 7.3).
    With `vocab_size`, `add(input_ids, records)` also accumulates the offline statistics of SPEC
    7.1 (token x expert counts, pairwise Jaccard, norms, the first `store_positions` expert sets)."""

    def __init__(self, n_groups: int, n_repeats: int, n_experts: int, att_n_heads: Optional[int] = None,
                 att_n_experts: Optional[int] = None, device: Optional[torch.device] = None,
                 vocab_size: Optional[int] = None, store_positions: int = 0):
        for name, v in (("n_groups", n_groups), ("n_repeats", n_repeats), ("n_experts", n_experts)):
            if not (isinstance(v, int) and v > 0):
                raise ValueError(f"RoutingStats.{name}: must be a positive integer, got {v!r}")
        if (att_n_heads is None) != (att_n_experts is None):
            raise ValueError("RoutingStats: give both att_n_heads and att_n_experts, or neither")
        self.n_groups, self.n_repeats, self.n_experts = n_groups, n_repeats, n_experts
        self.att_n_heads, self.att_n_experts = att_n_heads, att_n_experts
        self.device = torch.device(device) if device is not None else None
        self._counts: Optional[Dict[str, torch.Tensor]] = None
        self.layer_index = np.full((n_groups, n_repeats), -1, dtype=np.int64)  # (g, r) -> absolute l
        self.vocab_size = vocab_size
        if vocab_size is not None:
            self._init_offline(vocab_size, store_positions)

    @classmethod
    def from_config(cls, cfg, device=None) -> "RoutingStats":
        """From a MoEUTConfig (attention counters only when the model has attention experts)."""
        kw = {}
        if getattr(cfg, "att_n_experts", None):
            kw = dict(att_n_heads=cfg.n_heads, att_n_experts=cfg.att_n_experts)
        return cls(cfg.group_size, cfg.n_layers // cfg.group_size, cfg.ff_n_experts, device=device, **kw)

    # -- state -----------------------------------------------------------------------------
    def _alloc(self, device: torch.device) -> Dict[str, torch.Tensor]:
        G, R, NE = self.n_groups, self.n_repeats, self.n_experts
        z = lambda *s, dt=torch.int64: torch.zeros(*s, dtype=dt, device=device)  # noqa: E731
        c = {
            "mlp_counts": z(G, R, NE),  # selections of expert e at (g, r), all tokens and K slots
            "overlap_sum": z(G, R, dt=torch.float64),  # sum over tokens of |S_r ∩ S_r-1| / K
            "overlap_n": z(G, R),  # tokens counted in overlap_sum
            "gate_min_sum": z(G, dt=torch.float64),  # sum over tokens of min_j selected sigmoid
            "gate_max_sum": z(G, dt=torch.float64),
            "gate_n": z(G),
        }
        if self.att_n_heads is not None:
            c["att_v_counts"] = z(G, R, self.att_n_heads, self.att_n_experts)
            c["att_o_counts"] = z(G, R, self.att_n_heads, self.att_n_experts)
        return c

    def _state(self, device: torch.device) -> Dict[str, torch.Tensor]:
        if self._counts is None:
            self._counts = self._alloc(self.device or device)
        return self._counts

    def reset(self) -> None:
        """Zero every accumulator in place (start of a new logging window)."""
        if self._counts is not None:
            for t in self._counts.values():
                t.zero_()

    def state_counts(self) -> Dict[str, torch.Tensor]:
        """The accumulator tensors themselves (not copies), for an in-place all-reduce SUM across
        ranks. Allocated on `device` (or CPU) if no update has happened yet, so every rank returns
        the same keys and shapes."""
        return self._state(self.device or torch.device("cpu"))

    def load_counts(self, d: Dict[str, torch.Tensor]) -> None:
        """Replace the accumulators with `d` (e.g. reduced counts, or a saved dump)."""
        state = self._state(self.device or torch.device("cpu"))
        missing = sorted(set(state) - set(d))
        if missing:
            raise ValueError(f"RoutingStats.load_counts: missing keys {missing}")
        for k, t in state.items():
            src = torch.as_tensor(d[k])
            if tuple(src.shape) != tuple(t.shape):
                raise ValueError(f"RoutingStats.load_counts: {k} has shape {tuple(src.shape)}, "
                                 f"expected {tuple(t.shape)}")
            t.copy_(src.to(t.device, t.dtype))

    # -- accumulation ------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, records: Sequence[RoutingRecord]) -> None:
        """Add one forward's records (any order; each record's own g and r are used). Positions
        a record marks as padding (`RoutingRecord.valid` False) are not counted."""
        if not records:
            return
        by_group: Dict[int, Dict[int, RoutingRecord]] = {}
        for rec in records:
            if not (0 <= rec.g < self.n_groups and 0 <= rec.r < self.n_repeats):
                raise ValueError(f"RoutingRecord l={rec.l}: (g={rec.g}, r={rec.r}) outside "
                                 f"G={self.n_groups}, R={self.n_repeats}")
            if rec.r in by_group.setdefault(rec.g, {}):
                raise ValueError(f"RoutingRecord l={rec.l}: (g={rec.g}, r={rec.r}) appears twice in one forward")
            by_group[rec.g][rec.r] = rec
            self.layer_index[rec.g, rec.r] = rec.l
        dev = next(r.mlp_idx.device for r in records if r.mlp_idx is not None) if any(
            r.mlp_idx is not None for r in records) else torch.device("cpu")
        c = self._state(dev)
        NE = self.n_experts
        for g, reps in by_group.items():
            prev_idx, prev_r = None, None
            for r in sorted(reps):
                rec = reps[r]
                keep_N = rec.valid.reshape(-1).bool() if rec.valid is not None else None  # real tokens
                if rec.mlp_idx is not None:
                    idx = rec.mlp_idx.reshape(-1, rec.mlp_idx.shape[-1]).long()  # [N, K]
                    if keep_N is not None:
                        idx = idx[keep_N.to(idx.device)]
                    _check_idx(idx, NE, "mlp_idx", rec)
                    c["mlp_counts"][g, r] += torch.bincount(idx.reshape(-1), minlength=NE).to(c["mlp_counts"].device)
                    if prev_idx is not None and prev_idx.shape == idx.shape and r == prev_r + 1:
                        # top-k ids are distinct within a token, so the number of equal pairs is
                        # exactly the size of the intersection.
                        inter = (idx[:, :, None] == prev_idx[:, None, :]).sum((1, 2))  # [N]
                        c["overlap_sum"][g, r] += (inter.double() / idx.shape[1]).sum().to(c["overlap_sum"].device)
                        c["overlap_n"][g, r] += idx.shape[0]
                    prev_idx, prev_r = idx, r
                    if rec.mlp_gate is not None:
                        gate = rec.mlp_gate.reshape(-1, rec.mlp_gate.shape[-1]).double()  # [N, K]
                        if keep_N is not None:
                            gate = gate[keep_N.to(gate.device)]
                        c["gate_min_sum"][g] += gate.min(-1).values.sum().to(c["gate_min_sum"].device)
                        c["gate_max_sum"][g] += gate.max(-1).values.sum().to(c["gate_max_sum"].device)
                        c["gate_n"][g] += gate.shape[0]
                if self.att_n_heads is not None:
                    for name, t in (("att_v", rec.att_v_idx), ("att_o", rec.att_o_idx)):
                        if t is None:
                            continue
                        H, E = self.att_n_heads, self.att_n_experts
                        if t.shape[-2] != H:
                            raise ValueError(f"RoutingRecord l={rec.l}: {name}_idx has {t.shape[-2]} heads, "
                                             f"expected att_n_heads={H}")
                        _check_idx(t, E, f"{name}_idx", rec)
                        flat = t.reshape(-1, H, t.shape[-1]).long() + \
                            torch.arange(H, device=t.device)[None, :, None] * E  # [N, H, k] -> h*E + e
                        if keep_N is not None:
                            flat = flat[keep_N.to(flat.device)]
                        cnt = torch.bincount(flat.reshape(-1), minlength=H * E).view(H, E)
                        c[f"{name}_counts"][g, r] += cnt.to(c[f"{name}_counts"].device)

    # -- offline statistics (SPEC 7.1) ----------------------------------------------------------
    def _init_offline(self, vocab_size: int, store_positions: int) -> None:
        G, R = self.n_groups, self.n_repeats
        self.G, self.R, self.NE, self.V = G, R, self.n_experts, vocab_size
        self.L = L = G * R
        self.tokens = _SparseCounter()
        self.token_freq = np.zeros(vocab_size, dtype=np.int64)
        self.jaccard_sum = np.zeros((G, R, R), dtype=np.float64)
        self.inter_sum = np.zeros((G, R, R), dtype=np.float64)
        self.n_positions = 0
        self.in_norm_sum, self.update_norm_sum = np.zeros(L), np.zeros(L)
        self.rel_update_sum, self.abs_cos_sum = np.zeros(L), np.zeros(L)
        self.norm_count = np.zeros(L, dtype=np.int64)
        self.layer_g = np.full(L, -1, dtype=np.int64)
        self.layer_r = np.full(L, -1, dtype=np.int64)
        self.store_positions = store_positions
        self._sets: List[np.ndarray] = []  # [n, L, K] per batch, until store_positions are kept
        self._set_tokens: List[np.ndarray] = []
        self._n_stored = 0
        self.k: Optional[int] = None
        self.loss_sum, self.loss_count = 0.0, 0

    @torch.no_grad()
    def add(self, input_ids: torch.Tensor, records: Sequence[RoutingRecord]) -> None:
        """Accumulate one batch of the offline pass: input_ids [B, T] and the model's routing
        records (one per absolute layer, SPEC 1.8): `update(records)` plus the SPEC 7.1 extras.
        Raises ValueError when the instance has no vocab_size, when `records` is empty (no
        collect_routing=True, or not a MoE model), when a layer or repetition is missing, or for
        token ids outside 0..V-1."""
        if self.vocab_size is None:
            raise ValueError("RoutingStats.add: needs vocab_size (RoutingStats(..., vocab_size=V)); "
                             "training uses update(records)")
        if not records:
            raise ValueError("RoutingStats.add: the model returned no routing records "
                             "(was collect_routing=True passed? is this a MoE model?)")
        B, T = input_ids.shape
        # Heavy work (unique keys, one-hot overlaps) runs on the records' device (the GPU in a real
        # pass); only reduced results travel to the host.
        dev = next((r.mlp_idx.device for r in records if r.mlp_idx is not None), input_ids.device)
        ids_dev = input_ids.reshape(-1).to(dev, torch.int64)  # [N], N = B*T positions
        ids = ids_dev.cpu()
        if int(ids.max()) >= self.V or int(ids.min()) < 0:
            raise ValueError(f"input ids outside 0..{self.V - 1}")
        self.update(records)
        self.token_freq += np.bincount(ids.numpy(), minlength=self.V)
        by_l = sorted(records, key=lambda rec: rec.l)
        if len(by_l) != self.L or [r.l for r in by_l] != list(range(self.L)):
            raise ValueError(f"expected one routing record per absolute layer 0..{self.L - 1}, got "
                             f"layers {[r.l for r in by_l]}")
        per_member: Dict[int, Dict[int, torch.Tensor]] = {}
        keys = []
        for rec in by_l:
            self.layer_g[rec.l], self.layer_r[rec.l] = rec.g, rec.r
            if rec.mlp_idx is None:
                raise ValueError(f"routing record l={rec.l} has no mlp_idx")
            idx = rec.mlp_idx.reshape(B * T, -1).to(dev, torch.int64)  # [N, K]
            if self.k is None:
                self.k = idx.shape[1]
            per_member.setdefault(rec.g, {})[rec.r] = idx
            # flat key ((g*R + r)*N_E + e)*V + v: one sparse counter for N[g, r, e, v]
            base = (rec.g * self.R + rec.r) * self.NE
            keys.append(((base + idx) * self.V + ids_dev[:, None]).reshape(-1))
            self._add_norms(rec, B * T)
        uk, uc = torch.unique(torch.cat(keys), return_counts=True)
        self.tokens.add(uk.cpu().numpy(), uc.cpu().numpy().astype(np.int64))
        for g, reps in per_member.items():
            if len(reps) != self.R:
                raise ValueError(f"member g={g} has {len(reps)} applications, expected R={self.R}")
            s = torch.stack([reps[r] for r in range(self.R)], 1)  # [N, R, K]
            self._add_overlaps(g, s)
        self.n_positions += B * T
        if self._n_stored < self.store_positions:
            n = min(B * T, self.store_positions - self._n_stored)
            s_all = torch.stack([per_member[r.g][r.r][:n] for r in by_l], 1)  # [n, L, K]
            dt = np.int16 if self.NE < 32768 else np.int32
            self._sets.append(s_all.cpu().numpy().astype(dt))
            self._set_tokens.append(ids[:n].numpy().astype(np.int32))
            self._n_stored += n

    def _add_overlaps(self, g: int, s: torch.Tensor) -> None:
        """Intersections of the K-sets of every pair of repetitions, per position, through one-hot
        matmuls (chunked so that [chunk, R, N_E] stays small): J = |A∩B| / (2K - |A∩B|)."""
        N, R, K = s.shape
        chunk = max(1, (1 << (24 if s.is_cuda else 22)) // (R * self.NE))
        for i in range(0, N, chunk):
            part = s[i:i + chunk]  # [n, R, K]
            onehot = torch.zeros(part.shape[0], R, self.NE, device=s.device)
            onehot.scatter_(2, part, 1.0)  # [n, R, N_E]
            # 0/1 inputs and sums <= K: exact in fp32, also with TF32 matmuls on GPU
            inter = torch.bmm(onehot, onehot.transpose(1, 2)).double()  # [n, R, R]
            self.inter_sum[g] += inter.sum(0).cpu().numpy()
            self.jaccard_sum[g] += (inter / (2 * K - inter)).sum(0).cpu().numpy()

    def _add_norms(self, rec: RoutingRecord, n: int) -> None:
        if rec.in_norm is None or rec.update_norm is None:
            return
        x_in = rec.in_norm.reshape(-1).double().cpu()
        upd = rec.update_norm.reshape(-1).double().cpu()
        self.in_norm_sum[rec.l] += float(x_in.sum())
        self.update_norm_sum[rec.l] += float(upd.sum())
        self.rel_update_sum[rec.l] += float((upd / x_in.clamp_min(1e-12)).sum())
        if rec.cos_in_out is not None:
            self.abs_cos_sum[rec.l] += float(rec.cos_in_out.reshape(-1).double().abs().sum())
        self.norm_count[rec.l] += n

    def add_loss(self, ce_sum: float, n_targets: int) -> None:
        """Add a batch's summed cross-entropy (nats) over `n_targets` tokens (for the perplexity)."""
        self.loss_sum += ce_sum
        self.loss_count += n_targets

    def arrays(self) -> Dict[str, np.ndarray]:
        """The offline statistics as NumPy arrays: the content of routing_stats.npz minus
        "meta_json" (SPEC 7.1; keys listed in docs/analysis.md). Raises ValueError without vocab_size."""
        if self.vocab_size is None:
            raise ValueError("RoutingStats.arrays: needs vocab_size (the offline statistics)")
        self.tokens.coalesce()
        tec = A.TokenExpertCounts.from_keys(self.tokens.keys, self.tokens.counts, (self.G, self.R, self.NE, self.V))
        c = self.counts_numpy()
        small = lambda x, n: x.astype(np.int16 if n < 32768 else np.int32)  # noqa: E731
        out = {
            "mlp_counts": c["mlp_counts"],
            "token_freq": self.token_freq,
            "tok_g": small(tec.g, self.G), "tok_r": small(tec.r, self.R), "tok_e": small(tec.e, self.NE),
            "tok_v": small(tec.v, self.V), "tok_count": tec.count,
            "jaccard_sum": self.jaccard_sum, "intersection_sum": self.inter_sum,
            "n_positions": np.array(self.n_positions, dtype=np.int64),
            "in_norm_sum": self.in_norm_sum, "update_norm_sum": self.update_norm_sum,
            "rel_update_sum": self.rel_update_sum, "abs_cos_sum": self.abs_cos_sum,
            "norm_count": self.norm_count, "layer_g": self.layer_g, "layer_r": self.layer_r,
            "gate_min_sum": c["gate_min_sum"], "gate_max_sum": c["gate_max_sum"], "gate_n": c["gate_n"],
            "sets": (np.concatenate(self._sets) if self._sets
                     else np.zeros((0, self.L, self.k or 0), dtype=np.int16)),
            "set_tokens": (np.concatenate(self._set_tokens) if self._set_tokens else np.zeros(0, np.int32)),
        }
        if "att_v_counts" in c:
            out["att_v_counts"] = c["att_v_counts"]
            out["att_o_counts"] = c["att_o_counts"]
        return out

    # -- results -----------------------------------------------------------------------------
    def counts_numpy(self) -> Dict[str, np.ndarray]:
        """Copies of the accumulators as numpy arrays: mlp_counts [G, R, N_E] int64, overlap_sum /
        overlap_n [G, R], gate_min_sum / gate_max_sum / gate_n [G], and att_v_counts / att_o_counts
        [G, R, H, E_att] when attention experts are tracked (SPEC 7.1, 7.3)."""
        return {k: v.detach().cpu().numpy() for k, v in self.state_counts().items()}

    def compute(self) -> Dict[str, float]:
        """Scalar metrics since the last reset (SPEC 7.3). Keys:

        moe/g{g}/usage_rel_ppl        exp(H(u))/N_E of the member's counts over all repetitions
        moe/g{g}/dead_frac            experts never selected by member g
        moe/g{g}/selections_per_expert  member g's selections (tokens x K, all repetitions) / N_E: how
                                      many draws the two above rest on [ours]
        moe/g{g}/universal_score      mean of the R x R histogram-intersection matrix (>= 1/R)
        moe/g{g}/universal_score_offdiag_max   mean_l max_{o != l} M[l, o] (only if R > 1)
        moe/g{g}/sel_overlap_l{l}     mean |S_l ∩ S_(l-G)| / K, same member's previous application
        moe/g{g}/min_sel_score, max_sel_score  mean over tokens of the min / max selected sigmoid
        moe/usage_rel_ppl_all         relative perplexity over all G*N_E experts together [ours]
        moe/dead_frac_all
        att/g{g}/{v,o}_usage_rel_ppl  mean over heads of each head's relative perplexity
        att/g{g}/{v,o}_dead_frac      (head, expert) pairs never selected
        Groups with no counts yet are left out (nothing to report).
        """
        c = self.counts_numpy()
        out: Dict[str, float] = {}
        mlp = c["mlp_counts"]  # [G, R, N_E]
        for g in range(self.n_groups):
            if mlp[g].sum() > 0:
                per_expert = mlp[g].sum(0)
                out[f"moe/g{g}/usage_rel_ppl"] = float(A.relative_perplexity(per_expert))
                out[f"moe/g{g}/dead_frac"] = float(A.dead_fraction(per_expert))
                out[f"moe/g{g}/selections_per_expert"] = float(per_expert.sum() / per_expert.size)
                used = mlp[g].sum(1) > 0  # repetitions that were seen
                m = A.histogram_intersection(mlp[g][used])
                out[f"moe/g{g}/universal_score"] = A.universal_score(m)
                if used.sum() > 1:
                    out[f"moe/g{g}/universal_score_offdiag_max"] = A.offdiag_max_mean(m)
                for r in range(1, self.n_repeats):
                    if c["overlap_n"][g, r] > 0:
                        l = int(self.layer_index[g, r])
                        out[f"moe/g{g}/sel_overlap_l{l}"] = float(c["overlap_sum"][g, r] / c["overlap_n"][g, r])
            if c["gate_n"][g] > 0:
                out[f"moe/g{g}/min_sel_score"] = float(c["gate_min_sum"][g] / c["gate_n"][g])
                out[f"moe/g{g}/max_sel_score"] = float(c["gate_max_sum"][g] / c["gate_n"][g])
            for name in ("v", "o"):
                att = c.get(f"att_{name}_counts")
                if att is not None and att[g].sum() > 0:
                    per_head = att[g].sum(0)  # [H, E_att]
                    out[f"att/g{g}/{name}_usage_rel_ppl"] = float(np.nanmean(A.relative_perplexity(per_head)))
                    out[f"att/g{g}/{name}_dead_frac"] = float(A.dead_fraction(per_head.reshape(-1)))
        if mlp.sum() > 0:
            # [ours] "all layers" variant: one distribution over every (member, expert) pair.
            all_experts = mlp.sum(1).reshape(-1)
            out["moe/usage_rel_ppl_all"] = float(A.relative_perplexity(all_experts))
            out["moe/dead_frac_all"] = float(A.dead_fraction(all_experts))
        return out

    def usage_matrix(self, g: int) -> np.ndarray:
        """SPEC 7.3 `moe_per_layer`: [R, N_E] counts of member g, each row normalised to sum 1."""
        return A.normalise(self.counts_numpy()["mlp_counts"][g], axis=-1)

    def heatmap_figure(self, g: int, title: Optional[str] = None):
        """Repetitions x experts heatmap of member g (rows normalised), as a matplotlib Figure
        created without pyplot (safe in training loops; the caller logs and drops it)."""
        from .style import figure
        if not 0 <= g < self.n_groups:
            raise ValueError(f"heatmap_figure: g={g} outside 0..{self.n_groups - 1}")
        u = self.usage_matrix(g)
        fig, ax = figure((8, 1.2 + 0.35 * self.n_repeats))
        im = ax.imshow(u, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_xlabel("expert")
        ax.set_ylabel("repetition r (layer l)")
        ax.set_yticks(range(self.n_repeats))
        ax.set_yticklabels([f"r={r} (l={self.layer_index[g, r] + 1})" if self.layer_index[g, r] >= 0
                            else f"r={r}" for r in range(self.n_repeats)])
        ax.set_title(title or f"MLP expert usage, group member g={g} (rows sum to 1)")
        fig.colorbar(im, ax=ax, label="share of the repetition's selections")
        return fig
