"""The NumPy statistics of the expert analysis (moeut.analysis.stats, SPEC 7.1-7.3) on hand-made
inputs with hand-computed answers, and the metrics.jsonl reader."""
import numpy as np
import pytest

from moeut.analysis import stats as A


# ------------------------------------------------------------------------------------------
# NumPy statistics with hand-computed answers
# ------------------------------------------------------------------------------------------


def test_relative_perplexity_dead_fraction_intersection():
    assert A.relative_perplexity(np.array([5, 5, 5, 5])) == pytest.approx(1.0)
    assert A.relative_perplexity(np.array([3, 3, 0, 0])) == pytest.approx(0.5)
    assert A.relative_perplexity(np.array([7, 0, 0, 0])) == pytest.approx(0.25)
    assert np.isnan(A.relative_perplexity(np.zeros(3)))
    assert A.dead_fraction(np.array([1, 0, 2, 0, 0])) == pytest.approx(0.6)
    m = A.histogram_intersection(np.array([[1, 1, 0], [0, 1, 1], [2, 2, 0]]))
    np.testing.assert_allclose(m, [[1, 0.5, 1], [0.5, 1, 0.5], [1, 0.5, 1]])
    assert A.universal_score(m) == pytest.approx(7 / 9)
    assert A.offdiag_max_mean(m) == pytest.approx((1 + 0.5 + 1) / 3)


def test_f1_com_order_on_constructed_p():
    # Columns: e0 peaks at r=2, e1 at r=0, e2 mostly r=1, e3 flat.
    p = np.array([[0.0, 1.0, 0.2, 1 / 3],
                  [0.0, 0.0, 0.6, 1 / 3],
                  [1.0, 0.0, 0.2, 1 / 3]])
    # 0.9-quantiles (linear): e0 0.8, e1 0.8, e2 0.2 + 0.8*0.4 = 0.52, e3 1/3 (nothing above).
    # scores (paper formula): e0 2*1, e1 0*1, e2 1*0.6, e3 0 -> ascending, stable: 1, 3, 2, 0.
    order, score = A.com_order(p)
    np.testing.assert_allclose(score, [2.0, 0.0, 0.6, 0.0])
    np.testing.assert_array_equal(order, [1, 3, 2, 0])
    # normalised: e2 -> 0.6/0.6 * 1 = 1; e3 falls back to its plain centre of mass (0+1+2)/3 = 1.
    order_n, score_n = A.com_order(p, normalised=True)
    np.testing.assert_allclose(score_n, [2.0, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(order_n, [1, 2, 3, 0])
    # P from counts: columns normalised, an unused expert stays 0.
    np.testing.assert_allclose(A.expert_layer_usage(np.array([[1, 0], [3, 0]])), [[0.25, 0], [0.75, 0]])


def test_f1_unnormalised_score_is_not_a_centre_of_mass_for_r9():
    # SPEC 7.2 note: with R = 9 only the max survives the 0.9-quantile, score = r_max * P_max.
    p = np.zeros((9, 1))
    p[3, 0], p[6, 0] = 0.4, 0.6
    _, score = A.com_order(p)
    assert score[0] == pytest.approx(6 * 0.6)
    _, score_n = A.com_order(p, normalised=True)
    assert score_n[0] == pytest.approx(6.0)


def test_jaccard_and_overlap_hand_cases():
    same = np.array([[[0, 1], [0, 1], [1, 0]]])  # one position, R=3, identical sets
    np.testing.assert_allclose(A.jaccard_matrix(same), np.ones((3, 3)))
    sets = np.array([[[0, 1], [1, 2], [3, 4]]])  # {0,1} vs {1,2}: 1/3; vs {3,4}: 0
    np.testing.assert_allclose(A.jaccard_matrix(sets), [[1, 1 / 3, 0], [1 / 3, 1, 0], [0, 0, 1]])
    np.testing.assert_allclose(A.consecutive_overlap(sets), [0.5, 0.0])


def test_top_tokens_and_f2_curve():
    freq = np.array([0, 5, 9, 5, 1])
    np.testing.assert_array_equal(A.top_tokens(freq, 3), [2, 1, 3])  # tie 1/3 by id
    np.testing.assert_array_equal(A.top_tokens(freq, 10), [2, 1, 3, 4])  # never-seen id 0 excluded
    np.testing.assert_array_equal(A.f2_curve(np.array([3, 0, 1, 2, 0]), 2), [1, 2])


def test_token_counts_roundtrip_and_f2_f3_by_hand():
    n = np.zeros((1, 2, 3, 4), dtype=np.int64)  # G=1, R=2, N_E=3, V=4
    n[0, 0, 0, 1] = 2
    n[0, 0, 1, 1] = 1
    n[0, 1, 2, 1] = 4
    n[0, 1, 0, 3] = 1
    tec = A.TokenExpertCounts.from_dense(n)
    np.testing.assert_array_equal(tec.to_dense(), n)
    keys = (((tec.g * 2 + tec.r) * 3 + tec.e) * 4 + tec.v)
    np.testing.assert_array_equal(A.TokenExpertCounts.from_keys(keys, tec.count, n.shape).to_dense(), n)
    np.testing.assert_array_equal(A.distinct_experts_per_token(tec, 0, 0), [0, 2, 0, 0])
    np.testing.assert_array_equal(A.distinct_experts_per_token(tec, 0, 1), [0, 1, 0, 1])
    # token 1: set over layers {0,1,2}: r0 has 2 of 3, r1 has 1 of 3; token 3: {0}: r0 0, r1 1.
    img = A.layer_share_of_token_set(tec, 0, np.array([1, 3]))
    np.testing.assert_allclose(img, [[2 / 3, 0], [1 / 3, 1]])


def test_metrics_jsonl_reading(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 10, "moe/g0/usage_rel_ppl": 0.5, "loss": 3}\n\n'
                 '{"step": 5, "moe/g0/usage_rel_ppl": 0.25, "activation_norm/in_layer_0": 2.0}\n'
                 '{"step": 20, "activation_norm/in_layer_0": 3.0, "activation_norm/in_layer_1": 4}\n')
    rows = A.read_metrics_jsonl(str(p))
    s = A.metric_series(rows, "moe/")
    assert list(s) == ["moe/g0/usage_rel_ppl"]
    np.testing.assert_array_equal(s["moe/g0/usage_rel_ppl"][0], [5, 10])
    np.testing.assert_array_equal(s["moe/g0/usage_rel_ppl"][1], [0.25, 0.5])
    assert A.final_layer_values(rows, "activation_norm/in_layer_") == {0: 3.0, 1: 4.0}
    p.write_text('{"step": 1}\n{"step": 2,\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        A.read_metrics_jsonl(str(p))
