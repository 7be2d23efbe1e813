"""Padding edge case: a batch row with no real token at all (attention_mask row of zeros). Against the
batch without that row: the real row's logits, the regulariser and auxiliary losses, the gradients (all
finite) and the routing statistics are the same (moeut.outputs "Padding contract", SPEC 1.7)."""
import pytest
import torch

from moeut.model import entropy_reg_term
from moeut.analysis.routing import RoutingStats

from model_families import FAMILIES, V, build_family, family_config

# MoEUT (entropy regulariser), a capacity-limited Switch (capacity per group), DeepSeek (balance
# losses over routed experts), SUT (halting and MIM averages): every way a padded row enters a loss.
ROW_FAMILIES = [f for f in ("moeut", "switch_capacity", "deepseek", "sut") if f in FAMILIES]


def _pair(T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    real = torch.randint(1, V, (1, T), generator=g)
    ids = torch.cat([real, torch.zeros(1, T, dtype=torch.long)])  # row 1: padding only
    mask = torch.tensor([[1] * T, [0] * T])
    return real, ids, mask


@pytest.mark.parametrize("family", ROW_FAMILIES)
def test_fully_padded_row_changes_nothing_in_training(family):
    torch.manual_seed(0)
    model = build_family(family).train()
    real, ids, mask = _pair()
    torch.manual_seed(1)
    ref = model(real)
    torch.manual_seed(1)
    out = model(ids, attention_mask=mask)
    torch.testing.assert_close(out.logits[:1], ref.logits, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out.reg_loss)
    torch.testing.assert_close(out.reg_loss, ref.reg_loss, atol=1e-6, rtol=1e-5)
    assert sorted(out.reg_terms) == sorted(ref.reg_terms)
    for k in ref.reg_terms:
        torch.testing.assert_close(out.reg_terms[k], ref.reg_terms[k], atol=1e-6, rtol=1e-5)
    # the backward through the empty row is finite and equals the one-row batch's
    loss = lambda o: o.logits[:1].float().logsumexp(-1).mean() + o.reg_loss  # noqa: E731
    params = [p for p in model.parameters() if p.requires_grad]
    g_out = torch.autograd.grad(loss(out), params, allow_unused=True)
    g_ref = torch.autograd.grad(loss(ref), params, allow_unused=True)
    for p, a, b in zip(params, g_out, g_ref):
        if b is None:
            continue
        assert a is not None and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", [f for f in ROW_FAMILIES if hasattr(family_config(f), "ff_n_experts")])
def test_fully_padded_row_enters_no_routing_statistics(family):
    torch.manual_seed(0)
    cfg = family_config(family)
    model = build_family(family).eval()
    real, ids, mask = _pair(seed=4)
    a, b = RoutingStats.from_config(cfg), RoutingStats.from_config(cfg)
    with torch.no_grad():
        a.update(model(ids, attention_mask=mask, collect_routing=True).routing)
        b.update(model(real, collect_routing=True).routing)
    ca, cb = a.counts_numpy(), b.counts_numpy()
    assert ca["mlp_counts"].sum() > 0
    for k in ca:
        torch.testing.assert_close(torch.as_tensor(ca[k]), torch.as_tensor(cb[k]), atol=1e-6, rtol=1e-6)


def test_entropy_regulariser_leaves_empty_rows_out_of_the_mean():
    """Hand-built gate log-marginals: rows with 0 real tokens do not enter the mean over sequences."""
    torch.manual_seed(0)
    lse = [torch.randn(3, 4), torch.randn(3, 4)]  # R = 2 repetitions, B = 3, E = 4
    T = torch.tensor([5, 0, 7])
    got = entropy_reg_term(lse, T)
    # naive reference: per real row b, p = sum_r exp(lse[r][b]) / (T_b * R); reg = -mean_b H(p_b)
    ents = []
    for b in (0, 2):
        p = sum(x[b].double().exp() for x in lse) / (int(T[b]) * 2)
        ents.append(-(p * p.log()).sum())
    torch.testing.assert_close(got.double(), -torch.stack(ents).mean(), atol=1e-6, rtol=1e-6)
    assert torch.isfinite(entropy_reg_term(lse, torch.tensor([0, 0, 0])))
