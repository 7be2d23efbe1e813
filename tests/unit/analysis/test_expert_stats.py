"""moeut.analysis.expert_stats and the depth/dynamics helpers against closed forms: a perfectly
specialised and a uniform routing, a hand-computed NMI, saturation and settling by hand."""
import math

import numpy as np
import pytest
import torch

from moeut.analysis import expert_stats as X
from moeut.analysis.depth import settle_depth


def specialised_counts(S=2, E=8, per=10):
    """Source s routes its slots uniformly over its own E/S experts only."""
    c = np.zeros((S, E), np.int64)
    w = E // S
    for s in range(S):
        c[s, s * w:(s + 1) * w] = per
    return c


@pytest.mark.parametrize("S, E", [(2, 8), (4, 8), (3, 9)])
def test_perfectly_specialised_routing(S, E):
    c = specialised_counts(S, E)
    assert X.source_nmi(c) == pytest.approx(1.0, abs=1e-12)
    share = X.relative_share(c)
    own = np.repeat(np.eye(S, dtype=bool), E // S, axis=1)
    assert np.allclose(share[own], S) and np.allclose(share[~own], 0)  # each source: E/S experts at S x uniform
    assert np.allclose(X.expert_specialisation(c), S)  # every expert serves one source only


def test_uniform_routing():
    c = np.full((3, 8), 7)
    assert X.source_nmi(c) == pytest.approx(0.0, abs=1e-12)
    assert np.allclose(X.relative_share(c), 1.0)
    assert np.allclose(X.expert_specialisation(c), 1.0)
    assert np.allclose(X.usage_entropy(c), 1.0)
    assert np.allclose(X.dead_share(c), 0.0)


def test_nmi_hand_computed():
    # P(e|s) = [[.75, .25], [.25, .75]], P(e) = [.5, .5]: I = ln 2 - H_b(.75), NMI = I / ln 2
    hb = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert X.source_nmi(np.array([[3, 1], [1, 3]])) == pytest.approx((math.log(2) - hb) / math.log(2), rel=1e-12)
    # unequal source sizes do not matter (sources weigh equally)
    assert X.source_nmi(np.array([[30, 10], [1, 3]])) == pytest.approx((math.log(2) - hb) / math.log(2), rel=1e-12)
    assert math.isnan(X.source_nmi(np.array([[1, 2]])))


def test_entropy_and_dead_by_hand():
    c = np.array([[5, 0, 0, 0], [1, 1, 0, 0]])
    assert np.allclose(X.usage_entropy(c), [0.0, math.log(2) / math.log(4)])
    assert np.allclose(X.dead_share(c), [0.75, 0.5])


def test_saturation_by_hand_and_with_itself():
    a = torch.tensor([[0, 1], [2, 3], [4, 5]])
    b = torch.tensor([[1, 0], [2, 7], [6, 8]])
    assert X.saturation(a, b).tolist() == [1.0, 0.5, 0.0]
    idx = torch.randint(0, 16, (5, 7, 16)).argsort(-1)[..., :4]  # distinct experts per row
    assert torch.equal(X.saturation(idx, idx), torch.ones(5, 7))
    with pytest.raises(ValueError, match="shapes differ"):
        X.saturation(a, b[:, :1])


def test_settle_depth_by_hand():
    # depth x position: position 0 settles at 0, 1 at 2, 2 changes at the last depth (3), 3 flips back at 2
    top1 = np.array([[5, 1, 9, 4],
                     [5, 2, 9, 3],
                     [5, 3, 9, 4],
                     [5, 3, 8, 4]])
    assert settle_depth(top1).tolist() == [0, 2, 3, 2]


def test_counts_by_hand():
    idx = torch.tensor([[[0, 1]], [[1, 3]]])  # [N, H=1, k=2]
    assert X.counts_of(idx, 4).tolist() == [1, 2, 0, 1]
    h = torch.tensor([[[0, 1], [1, 2]]])  # one position, two heads, k=2
    assert X.head_counts(h, 3).tolist() == [[1, 1, 0], [0, 1, 1]]
