"""LR schedule (SPEC 4.2): closed form with the warm-up shift, checked against hand values."""
import math

import pytest

from moeut.train_lib.schedule import lr_at

LR = 2.5e-4


def test_paper_endpoints_with_warmup():
    # warm-up is linear to lr_max: lr_i = lr_max * (i+1) / W
    assert lr_at(0, LR, 4000, 100000) == pytest.approx(LR / 4000, rel=1e-12)
    assert lr_at(1999, LR, 4000, 100000) == pytest.approx(LR * 0.5, rel=1e-12)
    assert lr_at(3999, LR, 4000, 100000) == pytest.approx(LR, rel=1e-12)
    assert lr_at(4000, LR, 4000, 100000) == pytest.approx(LR, rel=1e-12)  # c = 0 right after warm-up
    # The cosine is indexed by i - W but spans S: the last step (c = 95999) ends above lr_min.
    last = lr_at(99999, LR, 4000, 100000)
    assert last == pytest.approx(2.5888e-5, abs=5e-10)
    assert last > 0.1 * LR


def test_paper_44m_without_warmup():
    assert lr_at(0, LR, 0, 100000) == pytest.approx(LR, rel=1e-12)
    assert lr_at(50000, LR, 0, 100000) == pytest.approx(0.1 * LR + 0.9 * LR * 0.5, rel=1e-12)
    assert lr_at(99999, LR, 0, 100000) == pytest.approx(2.5000e-5, abs=1e-10)


def test_matches_naive_formula_everywhere():
    W, S, lmin = 7, 50, 0.1 * LR
    for i in range(S):
        c = max(0, i - W)
        cos = lmin + (LR - lmin) * 0.5 * (1 + math.cos(math.pi * c / S))
        want = cos * (i + 1) / W if i < W else cos
        assert lr_at(i, LR, W, S) == pytest.approx(want, rel=1e-12)


def test_constant_and_bad_schedule():
    assert lr_at(10, LR, 0, 100, schedule="constant") == LR
    assert lr_at(1, LR, 4, 100, schedule="constant") == pytest.approx(LR * 2 / 4)
    with pytest.raises(ValueError, match="optim.schedule"):
        lr_at(0, LR, 0, 10, schedule="linear")
