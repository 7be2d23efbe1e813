"""Training-time routing metrics (SPEC 7.3), accumulated from the model's routing records.

The training loop calls the model with `collect_routing=True` on the steps it samples (every 10th
step and every eval step in the authors' code), passes `out.routing` to `RoutingStats.update`,
all-reduces `state_counts()` (SUM) across ranks before logging, then logs `compute()` and
`heatmap_figure(g)` and calls `reset()`. Keep separate instances for train and eval.

Counts come from the forward's output records, never from module hooks, so activation
checkpointing (which re-runs forwards) cannot count anything twice.

    stats = RoutingStats(n_groups=G, n_repeats=R, n_experts=N_E, att_n_heads=H, att_n_experts=E_att)
    stats.update(out.routing)
    for k, t in stats.state_counts().items(): dist.all_reduce(t)   # tensors are updated in place
    logger.log(stats.compute(), step=step); stats.reset()
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch

from .analysis import stats as A
from .outputs import RoutingRecord


def _check_idx(t: torch.Tensor, n: int, what: str, rec: RoutingRecord) -> None:
    # One host sync per record; update() runs only on the sampled steps, never inside the forward.
    if t.numel() == 0:  # every position padded
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"RoutingRecord l={rec.l} (g={rec.g}, r={rec.r}): {what} has values in "
                         f"[{lo}, {hi}], expected 0..{n - 1}")


class RoutingStats:
    """Accumulates MLP expert counts [G, R, N_E], attention V/O counts [G, R, H, E_att], the
    overlap of each application's expert sets with the previous application of the same member,
    and the mean min/max selected gate, over any number of `update` calls."""

    def __init__(self, n_groups: int, n_repeats: int, n_experts: int, att_n_heads: Optional[int] = None,
                 att_n_experts: Optional[int] = None, device: Optional[torch.device] = None):
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
        from matplotlib.figure import Figure
        if not 0 <= g < self.n_groups:
            raise ValueError(f"heatmap_figure: g={g} outside 0..{self.n_groups - 1}")
        u = self.usage_matrix(g)
        fig = Figure(figsize=(8, 1.2 + 0.35 * self.n_repeats), layout="constrained")
        ax = fig.add_subplot()
        im = ax.imshow(u, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_xlabel("expert")
        ax.set_ylabel("repetition r (layer l)")
        ax.set_yticks(range(self.n_repeats))
        ax.set_yticklabels([f"r={r} (l={self.layer_index[g, r] + 1})" if self.layer_index[g, r] >= 0
                            else f"r={r}" for r in range(self.n_repeats)])
        ax.set_title(title or f"MLP expert usage, group member g={g} (rows sum to 1)")
        fig.colorbar(im, ax=ax, label="share of the repetition's selections")
        return fig
