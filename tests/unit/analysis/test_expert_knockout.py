"""Exact expert knock-out (moeut.model.knock_out via moeut.analysis.probe.run_layers): a knock-out of
experts that are never selected changes nothing bit for bit; knocking out every expert of a branch
equals a hand-written forward without that branch; batched knock-outs equal one-at-a-time ones;
no mask is the model's own forward."""
import numpy as np
import pytest
import torch

from moeut.analysis.knockout import Target, knockout_losses, masks_for
from moeut.analysis.probe import run_layers, token_ce
from moeut.lm import ForwardState
from moeut.registry import build_model, get_preset

V = 256


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(get_preset("tiny", vocab_size=V)).eval()
    return m


@torch.no_grad()
def routing(model, x):
    out = model(x, collect_routing=True)
    return out.logits, {rec.l: rec for rec in out.routing}


@torch.no_grad()
def test_no_mask_is_the_model_forward(model):
    x = torch.randint(0, V, (2, 12))
    assert torch.equal(run_layers(model, x)[0], model(x).logits)


@pytest.mark.parametrize("kind", ["mlp", "att_v", "att_o"])
def test_knocking_out_never_selected_experts_changes_nothing(model, kind):
    cfg = model.config
    x = torch.randint(0, V, (1, 3))  # 3 tokens: at most 3*k of the experts are used per application
    ref, recs = routing(model, x)
    masks = {}
    n_unused = 0
    for l, rec in recs.items():
        if kind == "mlp":
            used = torch.zeros(cfg.ff_n_experts, dtype=torch.bool)
            used[rec.mlp_idx.reshape(-1).long()] = True
            masks[l] = {kind: ~used}
        else:
            idx = (rec.att_v_idx if kind == "att_v" else rec.att_o_idx).long()  # [1, T, H, k]
            used = torch.zeros(cfg.n_heads, cfg.att_n_experts, dtype=torch.bool)
            for h in range(cfg.n_heads):
                used[h, idx[..., h, :].reshape(-1)] = True
            masks[l] = {kind: ~used}
        n_unused += int((~used).sum())
    assert n_unused > 0  # the test knocks out something
    logits, recs2 = run_layers(model, x, knockouts=masks, collect_routing=True)
    assert torch.equal(logits, ref)
    for l, rec in enumerate(recs2):  # and the routing is the same
        assert torch.equal(rec.mlp_idx.sort(-1).values, recs[l].mlp_idx.sort(-1).values)
    # the masks are removed again: the next plain forward is the model's
    assert model.transformer.layers[0].ffn.knockout is None and model.transformer.layers[0].attention.knockout is None


def test_knocked_out_expert_is_never_selected(model):
    cfg = model.config
    x = torch.randint(0, V, (2, 16))
    _, recs = routing(model, x)
    e = int(torch.bincount(recs[1].mlp_idx.reshape(-1).long(), minlength=cfg.ff_n_experts).argmax())  # most used
    mask = torch.zeros(cfg.ff_n_experts, dtype=torch.bool)
    mask[e] = True
    _, recs2 = run_layers(model, x, knockouts={1: {"mlp": mask}}, collect_routing=True)
    new, old = recs2[1].mlp_idx.sort(-1).values, recs[1].mlp_idx.sort(-1).values
    assert not (new == e).any()
    had = (old == e).any(-1)
    assert had.any() and torch.equal(new[~had], old[~had])  # positions that did not select it keep their choice
    for n_row, o_row in zip(new[had], old[had]):  # the others keep k-1 experts and take one new one
        kept = set(o_row.tolist()) - {e}
        assert kept <= set(n_row.tolist()) and len(set(n_row.tolist())) == cfg.ff_k
    # earlier layer applications are untouched
    assert torch.equal(recs2[0].mlp_idx, recs[0].mlp_idx)


def forward_without(model, x, l_skip, branch):
    """Hand-written peri-LN forward (SPEC 1.2) with the `branch` ("mlp" / "att") of layer
    application l_skip left out."""
    state = ForwardState(False, False)
    h = model.embed(x)
    for l, g, r in model.execution_order():
        layer = model.unique_layer(g)
        if l == l_skip and branch == "att":
            h = h + layer.ffn(h, layer.ln2(h), g, state)
        elif l == l_skip and branch == "mlp":
            h = h + layer.attention(layer.ln1(h), h, g, l, state, None)
        else:
            h = layer(h, g, l, state, None)
    return model.head(h)


@pytest.mark.parametrize("kind, branch", [("mlp", "mlp"), ("att_v", "att"), ("att_o", "att")])
@pytest.mark.parametrize("l", [0, 3])
def test_knocking_out_every_expert_removes_the_branch(model, kind, branch, l):
    cfg = model.config
    x = torch.randint(0, V, (2, 10))
    shape = (cfg.ff_n_experts,) if kind == "mlp" else (cfg.n_heads, cfg.att_n_experts)
    logits, _ = run_layers(model, x, knockouts={l: {kind: torch.ones(shape, dtype=torch.bool)}})
    with torch.no_grad():
        ref = forward_without(model, x, l, branch)
    assert torch.equal(logits, ref)
    assert not torch.equal(logits, model(x).logits)


def test_batched_knockouts_equal_one_at_a_time(model):
    cfg = model.config
    torch.manual_seed(1)
    windows = np.random.default_rng(0).integers(0, V, (3, 9))
    targets = [Target("a", "mlp", {0: [1]}), Target("b", "att_v", {2: [3, 5]}), Target("c", "mlp", {1: [0, 2], 3: [4]}),
               Target("d", "att_o", {3: list(range(cfg.n_heads * cfg.att_n_experts))})]
    base, batched = knockout_losses(model, windows, targets, batch_size=2, per_forward=3, device=torch.device("cpu"))
    x, y = torch.from_numpy(windows[:, :-1]), torch.from_numpy(windows[:, 1:])
    for j, t in enumerate(targets):
        logits, _ = run_layers(model, x, knockouts=masks_for([t], cfg, 3, torch.device("cpu")))
        assert batched[j] == pytest.approx(float(token_ce(logits, y).double().mean()), rel=1e-5)
    with torch.no_grad():
        assert base == pytest.approx(float(token_ce(model(x).logits, y).double().mean()), rel=1e-6)


def test_unknown_kind_is_refused(model):
    with pytest.raises(ValueError, match="mlp, att_v or att_o"):
        run_layers(model, torch.zeros(1, 2, dtype=torch.long), knockouts={0: {"ffn": torch.ones(16, dtype=torch.bool)}})
