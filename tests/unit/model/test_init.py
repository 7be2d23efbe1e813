"""Initialisation table (SPEC 1.6) and the regulariser's value at init (SPEC 1.7)."""
import math

import pytest
import torch

from moeut.registry import get_preset
from moeut.model import MoEUTLM, renorm_keep_std, renorm_rows


def _std(t):
    return t.detach().float().std().item()


@pytest.mark.parametrize("norm_init", [False, True])
def test_init_stds_match_table(norm_init):
    cfg = get_preset("mini", norm_init=norm_init, ff_n_experts=48, n_layers=8)
    torch.manual_seed(0)
    m = MoEUTLM(cfg)
    sc, d = math.sqrt(2 / cfg.n_layers), cfg.d_model
    assert abs(cfg.init_scale - sc) < 1e-12
    layer = m.transformer.layers[0]
    expect = {
        "ffn.expert_sel": sc / math.sqrt(d),
        "ffn.keys": sc / math.sqrt(d),
        "ffn.values": sc / math.sqrt(cfg.ff_n_experts * cfg.ff_expert_size),  # fan-in over ALL experts
        "attention.q.weight": sc / math.sqrt(d),
        "attention.k.weight": sc / math.sqrt(d),
        "attention.v": sc / math.sqrt(d),
        "attention.o": sc / math.sqrt(cfg.n_heads * cfg.d_head),
        "attention.sel_v": sc / math.sqrt(d),
        "attention.sel_o": sc / math.sqrt(d),
    }
    params = dict(layer.named_parameters())
    for name, sigma in expect.items():
        assert abs(_std(params[name]) / sigma - 1) < 0.03, (name, _std(params[name]), sigma)
    assert abs(_std(m.embedding.weight) * math.sqrt(d) - 1) < 0.03  # kaiming fan_in=d, linear gain
    bound = 1 / math.sqrt(d)  # PyTorch default Linear init for the head, weight and bias
    assert m.lm_head.weight.abs().max() <= bound and m.lm_head.bias.abs().max() <= bound
    assert torch.equal(layer.ln1.weight, torch.ones(d)) and torch.equal(layer.ln2.bias, torch.zeros(d))
    # norm_init: the vector across the H*E_att experts has the same norm at every (in, out) coordinate
    norms = layer.attention.v.norm(dim=0)
    assert (norms.std() / norms.mean() < 1e-4) == norm_init


def test_renorm_helpers():
    torch.manual_seed(0)
    w = torch.randn(40, 1024) * 0.3
    w0 = w.clone()
    renorm_rows(w)
    ratio = w.norm(dim=1) / w0.norm(dim=1)
    assert ((ratio > 0.995) & (ratio < 1.005)).all()  # effectively a no-op on Gaussian rows (SPEC 1.6)
    v = torch.randn(6, 5, 7) * 2
    std = v.std()
    renorm_keep_std(v, dim=0)
    assert abs(v.std() - std) < 1e-5
    n = v.norm(dim=0)
    assert torch.allclose(n, n.flatten()[0].expand_as(n), rtol=1e-5)


def test_post_ln_uses_unit_init_scale():
    assert get_preset("tiny", ln_placement="post").init_scale == 1.0


def test_regulariser_at_init_44m():
    """SPEC 1.7: the 44M value at init lies in [bound, bound + 5e-4], bound = -0.109186."""
    torch.manual_seed(0)
    model = MoEUTLM(get_preset("moeut_44m")).train()
    with torch.no_grad():
        reg = model(torch.randint(0, 8000, (2, 64))).reg_loss.item()
    assert -0.109186 - 1e-6 <= reg <= -0.109186 + 5e-4, reg
