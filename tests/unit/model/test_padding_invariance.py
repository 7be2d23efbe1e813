"""A score never depends on padding, batch size or batch-mates, for every model family (issue 14.3).

The LM contract (moeut/outputs.py "Padding contract"): `model(ids, attention_mask)` with
attention_mask [B, T] 1 = real token, 0 = right padding. Reference: the request scored alone,
unpadded, with no mask (pad_multiple = 1). Capacity routers (Switch/GShard with a capacity factor:
cpu_du_every2 and the CF 1 / 1.25 variants here, which do drop tokens) group tokens per sequence
in eval mode and never give capacity to padded positions.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model_families import FAMILIES, V, build_family, family_config, is_capacity_limited

PAD = 0


def _request(n, seed):
    return torch.randint(1, V, (n,), generator=torch.Generator().manual_seed(seed))


def _batch(reqs, t_pad):
    ids = torch.full((len(reqs), t_pad), PAD, dtype=torch.long)
    mask = torch.zeros(len(reqs), t_pad, dtype=torch.long)
    for b, r in enumerate(reqs):
        ids[b, :len(r)], mask[b, :len(r)] = r, 1
    return ids, mask


def _loglik(logits_TV, ids_T):
    """Sum of log p(token t | tokens < t), t = 1..n-1, in float64 (as moeut.eval.scoring)."""
    n = ids_T.shape[0]
    logp = F.log_softmax(logits_TV[:n - 1].double(), -1)
    return math.fsum(logp.gather(-1, ids_T[1:, None])[:, 0].tolist())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_score_independent_of_padding_and_batch_mates(family):
    torch.manual_seed(0)
    model = build_family(family).eval()
    req = _request(40, seed=1)
    mates = [_request(n, seed=10 + n) for n in (17, 128, 73)]
    with torch.no_grad():
        alone = _loglik(model(req[None]).logits[0], req)
        scores = {}
        for t_pad in (40, 41, 128):  # pad_multiple 1 with a mask, and padded to 41 and to 128
            ids, mask = _batch([req], t_pad)
            scores[f"pad{t_pad}"] = _loglik(model(ids, attention_mask=mask).logits[0], req)
        for pos in (0, 2):  # batched with random requests (one of them full length), two slots
            reqs = mates[:pos] + [req] + mates[pos:]
            ids, mask = _batch(reqs, 128)
            scores[f"batch_slot{pos}"] = _loglik(model(ids, attention_mask=mask.bool()).logits[pos], req)
    for name, s in scores.items():
        assert abs(s - alone) <= 1e-5, (name, s, alone)


@pytest.mark.parametrize("family", sorted(f for f in FAMILIES if is_capacity_limited(family_config(f))))
def test_unmasked_padding_would_change_capacity_scores(family):
    """Guard: for capacity routers padding does matter without the mask (pad tokens would take
    capacity), so the test above checks something."""
    torch.manual_seed(0)
    model = build_family(family).eval()
    req = _request(40, seed=1)
    ids, _ = _batch([req], 128)
    with torch.no_grad():
        alone = _loglik(model(req[None]).logits[0], req)
        unmasked = _loglik(model(ids).logits[0], req)
    assert abs(unmasked - alone) > 1e-3


@pytest.mark.parametrize("family", sorted(f for f in FAMILIES if hasattr(family_config(f), "ff_n_experts")))
def test_routing_statistics_skip_padding(family):
    """RoutingStats over a padded batch = the sum over its requests scored alone (no padding)."""
    from moeut.analysis.routing import RoutingStats
    torch.manual_seed(0)
    cfg = family_config(family)
    model = build_family(family).eval()
    reqs = [_request(n, seed=20 + n) for n in (40, 9, 64)]
    padded, alone = RoutingStats.from_config(cfg), RoutingStats.from_config(cfg)
    with torch.no_grad():
        ids, mask = _batch(reqs, 128)
        out = model(ids, attention_mask=mask, collect_routing=True)
        assert all(rec.valid is not None and rec.valid.shape == ids.shape for rec in out.routing)
        padded.update(out.routing)
        for r in reqs:
            alone.update(model(r[None], collect_routing=True).routing)
    a, b = padded.counts_numpy(), alone.counts_numpy()
    assert a["mlp_counts"].sum() > 0
    for k in a:
        if a[k].dtype.kind == "i":  # expert counts: exactly the same selections
            assert (a[k] == b[k]).all(), k
        else:  # sums of fp32 gates computed in differently shaped batches
            assert (abs(a[k] - b[k]) <= 1e-6 * (1 + abs(b[k]))).all(), k


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_training_losses_skip_padding(family):
    """Train mode: a padded sequence with its mask gives the unpadded sequence's logits and the
    same regulariser / auxiliary losses (entropy marginals, balance and z-losses, capacity of the
    micro-batch group, SUT's MIM and ACT averages)."""
    torch.manual_seed(0)
    model = build_family(family).train()
    req = _request(40, seed=3)
    ids, mask = _batch([req], 96)
    ref = model(req[None])
    out = model(ids, attention_mask=mask)
    torch.testing.assert_close(out.logits[:, :40], ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.reg_loss, ref.reg_loss, atol=1e-6, rtol=1e-5)
    assert sorted(out.reg_terms) == sorted(ref.reg_terms)
    for k in ref.reg_terms:
        torch.testing.assert_close(out.reg_terms[k], ref.reg_terms[k], atol=1e-6, rtol=1e-5)


def test_attention_mask_errors_name_the_argument():
    model = build_family("moeut").eval()
    ids = torch.randint(1, V, (2, 8))
    with pytest.raises(ValueError, match="attention_mask: shape"):
        model(ids, attention_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match="attention_mask: only right padding.*row 1"):
        model(ids, attention_mask=torch.tensor([[1] * 8, [0, 0] + [1] * 6]))
    with pytest.raises(ValueError, match="attention_mask: values"):
        model(ids, attention_mask=torch.full((2, 8), 2))
    from moeut.model import KVCache
    with pytest.raises(ValueError, match="attention_mask: padding cannot be combined with a KV cache"):
        model(ids, attention_mask=torch.tensor([[1] * 8, [1] * 6 + [0, 0]]), cache=KVCache())
    # All ones is the unpadded call, bit for bit.
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=torch.ones(2, 8)).logits, model(ids).logits)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scorer_end_to_end(family):
    """Through the evaluator (moeut.eval.scoring.Scorer, fp32 on CPU): the same request alone with
    pad_multiple 1, with pad_multiple 128, and batched with other random requests scores the same."""
    from moeut.eval.scoring import Scorer, make_request
    torch.manual_seed(0)
    model = build_family(family)
    req = make_request(_request(12, seed=5).tolist(), _request(28, seed=6).tolist())
    mates = [make_request(_request(n, seed=30 + n).tolist(), _request(7, seed=40 + n).tolist()) for n in (3, 50, 100)]

    def score(reqs, **kw):
        return Scorer(model, device="cpu", dtype=None, progress=False, **kw).score(reqs)

    alone = score([req], pad_multiple=1)[0].logprob
    padded = score([req], pad_multiple=128)[0].logprob
    batched = score(mates + [req], pad_multiple=128, batch_size=4)[-1].logprob
    for s in (padded, batched):
        assert abs(s - alone) <= 1e-5, (s, alone)


def test_bidirectional_moeut_masks_padded_keys():
    """causal=False (MoEUT's non-causal mode): real positions attend to every key, so padded keys
    must be masked; the padded batch then gives the unpadded logits at real positions."""
    model = build_family("moeut").eval()
    req = _request(20, seed=7)
    ids, mask = _batch([req], 32)
    with torch.no_grad():
        ref = model(req[None], causal=False).logits
        out = model(ids, attention_mask=mask, causal=False).logits[:, :20]
        unmasked = model(ids, causal=False).logits[:, :20]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked, ref, atol=1e-3)  # the mask is what makes them equal


@pytest.mark.parametrize("family", ["moeut", "moeut_postln"])
def test_entropy_regulariser_of_padded_batch_is_mean_of_sequences(family):
    """SPEC 1.7: the regulariser is a mean over sequences of per-sequence marginals, so a padded
    batch of sequences of different lengths gives the mean of each sequence's own regulariser."""
    torch.manual_seed(0)
    model = build_family(family).train()
    reqs = [_request(n, seed=50 + n) for n in (33, 12, 64)]
    ids, mask = _batch(reqs, 64)
    batched = model(ids, attention_mask=mask).reg_loss
    alone = torch.stack([model(r[None]).reg_loss for r in reqs]).mean()
    torch.testing.assert_close(batched, alone, atol=1e-6, rtol=1e-5)
