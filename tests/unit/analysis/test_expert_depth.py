"""Depth analysis (moeut.analysis.probe / depth): R' = R is the model's forward bit for bit; R' != R
equals a model built with G*R' layers holding the same weights; the logit lens at the last layer
application is the model's logits."""
import numpy as np
import pytest
import torch

from moeut.analysis.depth import lens_pass, repeats_pass
from moeut.analysis.probe import run_layers, target_rank, token_ce
from moeut.registry import build_model, get_preset

V = 256


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(get_preset("tiny", vocab_size=V)).eval()


@torch.no_grad()
@pytest.mark.parametrize("order", ["abab", "aabb"])
def test_trained_repeats_is_the_forward_bit_for_bit(order):
    torch.manual_seed(0)
    m = build_model(get_preset("tiny", vocab_size=V, layer_order=order)).eval()
    x = torch.randint(0, V, (2, 11))
    R = m.config.n_layers // m.config.group_size
    assert torch.equal(run_layers(m, x, n_repeats=R)[0], m(x).logits)


@torch.no_grad()
@pytest.mark.parametrize("repeats", [1, 3, 4])
def test_other_repeats_equal_a_deeper_or_shallower_model(model, repeats):
    cfg = model.config
    other = build_model(get_preset("tiny", vocab_size=V, n_layers=cfg.group_size * repeats)).eval()
    other.load_state_dict(model.state_dict())  # the shared layers are the only per-layer weights
    x = torch.randint(0, V, (2, 9))
    assert torch.equal(run_layers(model, x, n_repeats=repeats)[0], other(x).logits)
    w = np.random.default_rng(0).integers(0, V, (3, 10))
    ce = repeats_pass(model, w, 2, torch.device("cpu"), repeats)
    ref = token_ce(other(torch.from_numpy(w[:, :-1])).logits, torch.from_numpy(w[:, 1:])).double().mean()
    assert ce == pytest.approx(float(ref), rel=1e-6)  # batches of 2 vs 3: fp32 rounding


@torch.no_grad()
def test_logit_lens_last_layer_is_the_model_logits(model):
    w = np.random.default_rng(1).integers(0, V, (3, 13))
    lz = lens_pass(model, w, 3, torch.device("cpu"))  # one batch, as the reference forward
    x, y = torch.from_numpy(w[:, :-1]), torch.from_numpy(w[:, 1:])
    logits = model(x).logits
    assert lz["ce"].shape == (model.config.n_layers + 1, 3 * 12)
    assert np.array_equal(lz["ce"][-1], token_ce(logits, y).reshape(-1).numpy())
    assert np.array_equal(lz["top1"][-1], logits.argmax(-1).reshape(-1).numpy())
    # depth 0 is the head on the embedding alone
    assert np.array_equal(lz["ce"][0], token_ce(model.head(model.embed(x)), y).reshape(-1).numpy())
    seen = []
    run_layers(model, x, after_layer=lambda l, g, r, h: seen.append((l, torch.equal(model.head(h), logits))))
    assert [l for l, _ in seen] == list(range(model.config.n_layers)) and seen[-1][1]


def test_target_rank_by_hand():
    logits = torch.tensor([[[0.1, 0.5, 0.3, 0.5]]])
    assert target_rank(logits, torch.tensor([[1]])).item() == 0  # tie with index 3 counts for the target
    assert target_rank(logits, torch.tensor([[2]])).item() == 2
    assert target_rank(logits, torch.tensor([[0]])).item() == 3


def test_repeats_below_one_refused(model):
    with pytest.raises(ValueError, match="repeats: must be >= 1"):
        run_layers(model, torch.zeros(1, 2, dtype=torch.long), n_repeats=0)
