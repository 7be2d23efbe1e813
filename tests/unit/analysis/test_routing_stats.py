"""Training-time routing metrics (SPEC 7.3) on hand-made routings with known answers."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from routing_fakes import random_sets, record  # noqa: E402

from moeut.analysis.routing import RoutingStats  # noqa: E402


def _cycle(n_tokens, n_experts, k, start=0):
    """[1, n_tokens, k]: token t uses experts (start + t*k + j) mod N_E -> perfectly even usage
    when n_tokens*k is a multiple of N_E."""
    t = np.arange(n_tokens)[:, None] * k + np.arange(k)[None, :] + start
    return (t % n_experts)[None]


def test_uniform_usage_gives_rel_ppl_one_and_no_dead():
    s = RoutingStats(n_groups=1, n_repeats=2, n_experts=4)
    s.update([record(0, 0, 0, _cycle(8, 4, 2)), record(1, 0, 1, _cycle(8, 4, 2, start=1))])
    m = s.compute()
    assert m["moe/g0/usage_rel_ppl"] == pytest.approx(1.0)
    assert m["moe/g0/dead_frac"] == 0.0
    assert m["moe/usage_rel_ppl_all"] == pytest.approx(1.0)


def test_dead_experts_and_half_usage():
    # Only experts 0 and 1 (of 4) are used, equally: H = ln 2 -> exp(H)/N_E = 2/4.
    idx = np.array([[[0], [1], [0], [1]]])
    s = RoutingStats(1, 1, 4)
    s.update([record(0, 0, 0, idx)])
    m = s.compute()
    assert m["moe/g0/usage_rel_ppl"] == pytest.approx(0.5)
    assert m["moe/g0/dead_frac"] == pytest.approx(0.5)
    assert "moe/g0/universal_score_offdiag_max" not in m  # R = 1: no other application


def test_universal_score_disjoint_vs_identical():
    a = np.array([[[0], [1]]])  # repetition 0 uses {0, 1}
    b = np.array([[[2], [3]]])  # repetition 1 uses {2, 3}
    s = RoutingStats(1, 2, 4)
    s.update([record(0, 0, 0, a), record(1, 0, 1, b)])
    m = s.compute()
    # M = [[1, 0], [0, 1]]: mean of all entries 0.5, off-diagonal max 0.
    assert m["moe/g0/universal_score"] == pytest.approx(0.5)
    assert m["moe/g0/universal_score_offdiag_max"] == pytest.approx(0.0)
    s.reset()
    s.update([record(0, 0, 0, a), record(1, 0, 1, a)])
    m = s.compute()
    assert m["moe/g0/universal_score"] == pytest.approx(1.0)
    assert m["moe/g0/universal_score_offdiag_max"] == pytest.approx(1.0)
    # Partial: u0 = (1/2, 1/2, 0, 0), u1 = (0, 1/2, 1/2, 0) -> M01 = 1/2, mean = (1+1/2+1/2+1)/4.
    s.reset()
    s.update([record(0, 0, 0, np.array([[[0], [1]]])), record(1, 0, 1, np.array([[[1], [2]]]))])
    assert s.compute()["moe/g0/universal_score"] == pytest.approx(0.75)


def test_sel_overlap_with_previous_application_uses_absolute_layer():
    # G = 2, R = 2 (abab): member 0 at l = 0, 2; member 1 at l = 1, 3.
    s = RoutingStats(2, 2, 6)
    recs = [
        record(0, 0, 0, [[[0, 1], [2, 3]]]),
        record(1, 1, 0, [[[0, 1], [0, 1]]]),
        record(2, 0, 1, [[[1, 2], [2, 3]]]),  # overlaps 1/2 and 2/2 -> mean 0.75
        record(3, 1, 1, [[[4, 5], [4, 5]]]),  # overlaps 0
    ]
    s.update(recs[::-1])  # order of the list must not matter
    m = s.compute()
    assert m["moe/g0/sel_overlap_l2"] == pytest.approx(0.75)
    assert m["moe/g1/sel_overlap_l3"] == pytest.approx(0.0)
    assert "moe/g0/sel_overlap_l0" not in m


def test_aabb_order_counts_by_record_fields():
    # "aabb": l -> g = l div R, r = l mod R. Counts must land in [g, r] from the records' fields.
    s = RoutingStats(2, 2, 4)
    s.update([record(0, 0, 0, [[[0]]]), record(1, 0, 1, [[[1]]]), record(2, 1, 0, [[[2]]]), record(3, 1, 1, [[[3]]])])
    c = s.counts_numpy()["mlp_counts"]
    expect = np.zeros((2, 2, 4), dtype=np.int64)
    expect[0, 0, 0] = expect[0, 1, 1] = expect[1, 0, 2] = expect[1, 1, 3] = 1
    np.testing.assert_array_equal(c, expect)
    assert "moe/g0/sel_overlap_l1" in s.compute()  # previous application of g=0 is l=0


def test_random_routing_matches_naive_loops():
    rng = np.random.default_rng(0)
    G, R, NE, K, H, E, B, T = 2, 3, 7, 3, 2, 4, 2, 5
    mlp = {(g, r): random_sets(rng, (B, T), NE, K) for g in range(G) for r in range(R)}
    att_v = {(g, r): random_sets(rng, (B, T, H), E, 2) for g in range(G) for r in range(R)}
    att_o = {(g, r): random_sets(rng, (B, T, H), E, 2) for g in range(G) for r in range(R)}
    gates = {(g, r): rng.random((B, T, K)) for g in range(G) for r in range(R)}
    recs = [record(r * G + g, g, r, mlp[g, r], att_v[g, r], att_o[g, r], gate=gates[g, r])
            for r in range(R) for g in range(G)]
    s = RoutingStats(G, R, NE, att_n_heads=H, att_n_experts=E)
    s.update(recs)
    c = s.counts_numpy()
    for g in range(G):
        for r in range(R):
            naive = np.zeros(NE, dtype=np.int64)
            for e in mlp[g, r].reshape(-1):
                naive[e] += 1
            np.testing.assert_array_equal(c["mlp_counts"][g, r], naive)
            for name, src in (("att_v_counts", att_v), ("att_o_counts", att_o)):
                naive_att = np.zeros((H, E), dtype=np.int64)
                for b in range(B):
                    for t in range(T):
                        for h in range(H):
                            for e in src[g, r][b, t, h]:
                                naive_att[h, e] += 1
                np.testing.assert_array_equal(c[name][g, r], naive_att)
    m = s.compute()
    for g in range(G):
        for r in range(1, R):
            ov = np.mean([len(set(mlp[g, r][b, t]) & set(mlp[g, r - 1][b, t])) / K
                          for b in range(B) for t in range(T)])
            assert m[f"moe/g{g}/sel_overlap_l{r * G + g}"] == pytest.approx(ov)
        gmin = np.mean([gates[g, r][b, t].min() for r in range(R) for b in range(B) for t in range(T)])
        gmax = np.mean([gates[g, r][b, t].max() for r in range(R) for b in range(B) for t in range(T)])
        assert m[f"moe/g{g}/min_sel_score"] == pytest.approx(gmin, rel=1e-6)
        assert m[f"moe/g{g}/max_sel_score"] == pytest.approx(gmax, rel=1e-6)
        assert m[f"moe/g{g}/selections_per_expert"] == B * T * K * R / NE  # every token selects K, R times
        # attention relative perplexity: mean over heads of exp(H)/E of the per-head usage.
        per_head = c["att_v_counts"][g].sum(0)
        ppl = []
        for h in range(H):
            u = per_head[h] / per_head[h].sum()
            ppl.append(math.exp(-sum(x * math.log(x) for x in u if x > 0)) / E)
        assert m[f"att/g{g}/v_usage_rel_ppl"] == pytest.approx(np.mean(ppl))
        # universal score: histogram intersection written out as a double loop.
        u = c["mlp_counts"][g] / c["mlp_counts"][g].sum(1, keepdims=True)
        M = np.array([[sum(min(u[a, e], u[b, e]) for e in range(NE)) for b in range(R)] for a in range(R)])
        assert m[f"moe/g{g}/universal_score"] == pytest.approx(M.mean())
        assert m[f"moe/g{g}/universal_score_offdiag_max"] == pytest.approx(
            np.mean([max(M[a, b] for b in range(R) if b != a) for a in range(R)]))


def test_state_counts_allreduce_equivalence_and_load():
    rng = np.random.default_rng(1)
    batches = [[record(r, 0, r, random_sets(rng, (2, 4), 5, 2), random_sets(rng, (2, 4, 2), 3, 1),
                       random_sets(rng, (2, 4, 2), 3, 1)) for r in range(2)] for _ in range(2)]
    kw = dict(n_groups=1, n_repeats=2, n_experts=5, att_n_heads=2, att_n_experts=3)
    both, rank0, rank1 = RoutingStats(**kw), RoutingStats(**kw), RoutingStats(**kw)
    for b in batches:
        both.update(b)
    rank0.update(batches[0])
    rank1.update(batches[1])
    # simulated all-reduce SUM, in place on the returned tensors
    for k, t in rank0.state_counts().items():
        t += rank1.state_counts()[k]
    assert rank0.compute() == pytest.approx(both.compute())
    fresh = RoutingStats(**kw)
    fresh.load_counts({k: v.clone() for k, v in both.state_counts().items()})
    fresh.layer_index[:] = both.layer_index
    assert fresh.compute() == pytest.approx(both.compute())
    with pytest.raises(ValueError, match="mlp_counts"):
        fresh.load_counts({**both.state_counts(), "mlp_counts": torch.zeros(3)})
    # an empty instance still returns every key (all ranks must all-reduce the same tensors)
    assert set(RoutingStats(**kw).state_counts()) == set(both.state_counts())
    both.reset()
    assert both.compute() == {}


def test_bad_records_raise_clear_errors():
    s = RoutingStats(1, 2, 4)
    with pytest.raises(ValueError, match="mlp_idx"):
        s.update([record(0, 0, 0, [[[4]]])])
    with pytest.raises(ValueError, match="g=1"):
        s.update([record(0, 1, 0, [[[0]]])])
    with pytest.raises(ValueError, match="n_experts"):
        RoutingStats(1, 1, 0)


def test_heatmap_rows_normalised():
    s = RoutingStats(1, 2, 4)
    s.update([record(0, 0, 0, [[[0], [0], [1]]]), record(1, 0, 1, [[[3], [3], [3]]])])
    u = s.usage_matrix(0)
    np.testing.assert_allclose(u, [[2 / 3, 1 / 3, 0, 0], [0, 0, 0, 1]])
    fig = s.heatmap_figure(0)
    assert fig.axes and fig.axes[0].images[0].get_array().shape == (2, 4)


def test_real_model_records(tiny_model_records):
    cfg, recs = tiny_model_records
    s = RoutingStats.from_config(cfg)
    s.update(recs)
    c = s.counts_numpy()
    B, T = recs[0].mlp_idx.shape[:2]
    # every position selects K experts in every application
    assert (c["mlp_counts"].sum(-1) == B * T * cfg.ff_k).all()
    assert (c["att_v_counts"].sum(-1) == B * T * cfg.att_k).all()
    m = s.compute()
    for g in range(cfg.group_size):
        assert 0 < m[f"moe/g{g}/usage_rel_ppl"] <= 1
        assert 1 / s.n_repeats - 1e-9 <= m[f"moe/g{g}/universal_score"] <= 1 + 1e-9


@pytest.fixture
def tiny_model_records():
    from moeut.registry import get_preset
    from moeut.model import MoEUTLM
    cfg = get_preset("tiny")
    model = MoEUTLM(cfg).eval()
    with torch.no_grad():
        out = model(torch.randint(0, cfg.vocab_size, (2, 16)), collect_routing=True)
    return cfg, out.routing
