"""Activation checkpointing as a model option (`LanguageModel.set_activation_checkpointing`, moeut.lm).

Reference: the same model, same weights, same RNG, without checkpointing, in float64. With
checkpointing every layer application is recomputed in backward; the loss (CE + reg_loss), every
gradient, the regulariser terms, the routing records and the routing statistics must equal the
plain model's, and the recomputation must really run (a layer's forward is called twice) while
writing nothing into the forward's records or losses (nothing counted twice). Covers every model
family: MoEUT (peri/post-LN, Switch/DeepSeek MLPs), dense, naive UT, the non-shared σ-MoE/Switch/
DeepSeek transformers, Du et al.'s every-k MoE transformer, and SUT; with dropout, expert dropout
and SUT's sampled routing on, so the recomputation must replay the RNG."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from model_families import FAMILIES, V, family_config
from moeut.checkpoint import build_model
from moeut.analysis.routing import RoutingStats

B, T = 2, 12


def _stochastic(cfg):
    """The family's config with every source of randomness in the forward switched on."""
    kw = {"dropout": 0.1}
    if hasattr(cfg, "expert_dropout") and getattr(cfg, "arch", "moeut") == "moeut":
        kw["expert_dropout"] = 0.1
    if hasattr(cfg, "sample_topk"):
        kw["sample_topk"] = 1
    return dataclasses.replace(cfg, **kw)


def _run(model, ids, mask, seed):
    """One training step's forward + backward; returns (loss, reg terms, grads, records, #layer calls)."""
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1))
             for m in model.modules() if type(m).__name__.endswith("Layer")]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(ids, attention_mask=mask, collect_routing="logits")
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none")
    loss = (ce * mask[:, 1:].reshape(-1)).sum() / mask[:, 1:].sum() + out.reg_loss
    n_forward_calls = len(calls)
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return loss.detach(), out.reg_terms, grads, out.routing, (n_forward_calls, len(calls))


def _assert_records_equal(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for f in dataclasses.fields(ra):
            x, y = getattr(ra, f.name), getattr(rb, f.name)
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), f"record l={ra.l}: {f.name} differs"
            else:
                assert x == y, f"record l={ra.l}: {f.name} {x} != {y}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_checkpointed_model_has_plain_loss_gradients_and_routing(family):
    torch.manual_seed(0)
    cfg = _stochastic(family_config(family))
    plain = build_model(cfg).double().train()
    ckpt = build_model(cfg).double().train()
    ckpt.load_state_dict(plain.state_dict())
    keys = list(ckpt.state_dict())
    ckpt.set_activation_checkpointing(True)
    assert list(ckpt.state_dict()) == keys  # a model option, not a wrapper: keys unchanged

    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - 3:] = 0  # right padding: the mask must reach the recomputation too
    loss_p, terms_p, grads_p, rec_p, calls_p = _run(plain, ids, mask, seed=1)
    loss_c, terms_c, grads_c, rec_c, calls_c = _run(ckpt, ids, mask, seed=1)

    n_apps = len(plain.execution_order())
    assert calls_p == (n_apps, n_apps)  # plain: no recomputation
    assert calls_c == (n_apps, 2 * n_apps)  # checkpointed: each application recomputed once in backward

    torch.testing.assert_close(loss_c, loss_p, rtol=1e-12, atol=0)
    assert list(terms_c) == list(terms_p)
    for name in terms_p:  # regulariser inputs / aux losses collected once, not again by the recomputation
        torch.testing.assert_close(terms_c[name], terms_p[name], rtol=1e-12, atol=0, msg=name)
    for name, g in grads_p.items():
        if g is None:
            assert grads_c[name] is None, name
            continue
        torch.testing.assert_close(grads_c[name], g, rtol=1e-10, atol=1e-14, msg=lambda m: f"{name}: {m}")
    # The records were read after backward: the recomputation appended nothing and changed nothing.
    assert len(rec_c) == n_apps
    _assert_records_equal(rec_c, rec_p)
    if getattr(cfg, "arch", None) == "moeut":  # routing statistics (SPEC 7.3) from those records
        stats_p, stats_c = RoutingStats.from_config(cfg), RoutingStats.from_config(cfg)
        stats_p.update(rec_p)
        stats_c.update(rec_c)
        assert stats_c.compute() == stats_p.compute()


@pytest.mark.parametrize("family", ["moeut", "dense", "sut", "du_every2"])
def test_checkpointing_only_in_training_with_grad(family, monkeypatch):
    """Eval mode, no_grad and KV-cache decoding run the plain code (no checkpoint call, same logits);
    a training forward checkpoints every layer application."""
    import moeut.lm
    wrapped = []

    def spy(fn, *args, **kwargs):
        wrapped.append(1)
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(moeut.lm, "checkpoint", spy)
    torch.manual_seed(0)
    model = build_model(family_config(family))
    ids = torch.randint(0, V, (B, T))
    ref = model.eval()(ids).logits
    model.set_activation_checkpointing(True)
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        model(ids)
    model.generate(ids[:1, :4], 3, greedy=True)
    assert model.training  # generate restored the mode
    assert wrapped == []
    model(ids)
    assert len(wrapped) == len(model.execution_order())
    model.set_activation_checkpointing(False)
    model(ids)
    assert len(wrapped) == len(model.execution_order())


def test_set_activation_checkpointing_rejects_non_bool():
    model = build_model(family_config("dense"))
    with pytest.raises(TypeError, match="enabled"):
        model.set_activation_checkpointing("yes")


@pytest.mark.parametrize("family", ["moeut", "dense", "sut", "du_every2"])
def test_checkpointing_keeps_fewer_activations(family):
    """The point of the option: the tensors kept for backward outside the checkpointed layers
    (measured with an outer saved-tensors hook; inside a region checkpoint's own hook applies)
    shrink to a fraction of the plain model's."""
    kept = {}
    for enabled in (False, True):
        torch.manual_seed(0)
        model = build_model(family_config(family)).train()
        model.set_activation_checkpointing(enabled)
        sizes = {}

        def pack(t):
            sizes[id(t)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randint(0, V, (4, 64)))
        kept[enabled] = sum(sizes.values())
    assert kept[True] < 0.5 * kept[False], kept
