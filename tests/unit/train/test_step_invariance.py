"""A training step does not depend on how its batch is split (docs/architecture.md "Batch
statistics of auxiliary losses"): for every model family of tests/model_families.py with all its
auxiliary terms on, `train_step` with micro-batches of 1, 2 and 8 sequences, and 2 gloo processes
under DDP, gives the gradients of one hand-written full-batch forward + backward (fp64 model) to
1e-6. The per-micro-batch form (train.aux_loss_scope=micro_batch) is shown to differ where a
family has a loss built from batch statistics, so the test checks something.

Capacity-limited Switch/GShard families run with a capacity factor that cannot drop a token
(capacity >= tokens of a micro-batch): which tokens a capacity drops depends, by GShard's
definition, on the group (the micro-batch); that is routing, not an auxiliary term."""
import copy
import dataclasses
import os
import warnings

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from model_families import FAMILIES, V, is_capacity_limited, family_config
from moeut.data.dataset import StreamSampler
from moeut.registry import build_model
from moeut.train_lib.distributed import DistInfo, cleanup
from moeut.train_lib.state import TrainState
from moeut.train_lib.step import train_step

B, T = 8, 16
TOL = 1e-6


def aux_on_config(family: str, **extra):
    """The family's config with every auxiliary term it has switched on (nonzero weight), no
    dropout / sampled routing (a full-batch forward draws other masks), no token dropping."""
    cfg = family_config(family)
    names = {f.name for f in dataclasses.fields(cfg)}
    over = {}
    for name, value in (("moe_balance_weight", 0.01), ("moe_zloss_weight", 0.001), ("mim_weight", 0.01),
                        ("act_weight", 0.01), ("entropy_reg", 0.01), ("att_entropy_reg", 0.001)):
        if name in names and not getattr(cfg, name):
            over[name] = value
    if getattr(cfg, "mlp_type", "") == "deepseek" and "moe_device_groups" in names:
        n_routed = cfg.ff_n_experts - cfg.moe_n_shared
        groups = min(d for d in range(2, n_routed + 1) if n_routed % d == 0)
        over.update(moe_device_groups=groups, moe_device_balance_weight=0.003)
    if is_capacity_limited(cfg):
        over["moe_capacity_factor"] = float(cfg.ff_n_experts)  # capacity >= every token: nothing drops
    if "sample_topk" in names:
        over["sample_topk"] = 0
    if getattr(cfg, "mlp_type", "") == "sigma_moe" and "router_zloss" in names:  # sigmoid-gate z-losses
        over["router_zloss"] = 0.001
    if "att_router_zloss" in names:
        over["att_router_zloss"] = 0.001
    over.update(extra)
    return dataclasses.replace(cfg, **over)


def build(family: str, **extra):
    torch.manual_seed(0)
    return build_model(aux_on_config(family, **extra)).double().train()


def windows():
    return torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(3))


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients it was stepped with (by parameter name order)."""

    def step(self, closure=None):
        self.seen = [p.grad.detach().clone() if p.grad is not None else None
                     for g in self.param_groups for p in g["params"]]
        return super().step(closure)


def full_batch_grads(model):
    """The reference: one forward over all B sequences, CE + reg, one backward."""
    ref = copy.deepcopy(model)
    w = windows()
    out = ref(w[:, :-1])
    loss = F.cross_entropy(out.logits.flatten(0, 1), w[:, 1:].flatten()) + out.reg_loss
    loss.backward()
    return [p.grad.detach().clone() if p.grad is not None else None for p in ref.parameters()], float(loss.detach())


def step_grads(model, window_BT1, mb, scope="step", dist=DistInfo(), fwd_model=None):
    opt = RecordingSGD(model.parameters(), lr=0.0)
    state = TrainState(model, opt, None, StreamSampler(96, B, "sequential", 0), dist)
    res = train_step(state, model if fwd_model is None else fwd_model, window_BT1, 0.0, micro_batch_size=mb, autocast_dtype=None,
                     grad_clip=None, aux_loss_scope=scope)
    assert res.finite
    return opt.seen, res.loss


def max_rel_diff(got, want):
    worst = 0.0
    for g, w in zip(got, want):
        if w is None or g is None:
            assert (g is None or not g.abs().max()) and (w is None or not w.abs().max())
            continue
        worst = max(worst, float((g - w).abs().max()) / max(float(w.abs().max()), 1e-30))
    return worst


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_micro_batches_equal_the_full_batch_step(family):
    model = build(family)
    want, want_loss = full_batch_grads(model)
    for mb in (1, 2, 8):
        got, loss = step_grads(copy.deepcopy(model), windows(), mb)
        assert max_rel_diff(got, want) < TOL, (family, mb)
        assert loss == pytest.approx(want_loss, rel=TOL, abs=1e-9)
    recomputing = copy.deepcopy(model)  # activation checkpointing recomputes layers in backward
    recomputing.set_activation_checkpointing(True)
    got, _ = step_grads(recomputing, windows(), 2)
    assert max_rel_diff(got, want) < TOL, (family, "activation checkpointing")


STATS_FAMILIES = sorted(f for f in FAMILIES if build(f).uses_step_statistics())


def test_families_with_batch_statistics_are_the_expected_ones():
    assert STATS_FAMILIES == ["deepseek", "du_every2", "moeut_deepseek", "moeut_switch", "sut", "switch",
                              "switch_capacity"]


@pytest.mark.parametrize("family", STATS_FAMILIES)
def test_micro_batch_scope_is_the_per_group_form_and_differs(family):
    """Guard: the per-micro-batch form (train.aux_loss_scope=micro_batch) changes the gradients,
    so the test above checks something; with one micro-batch both scopes are the same step."""
    model = build(family)
    want, _ = full_batch_grads(model)
    got, _ = step_grads(copy.deepcopy(model), windows(), 2, scope="micro_batch")
    assert max_rel_diff(got, want) > 100 * TOL
    got, _ = step_grads(copy.deepcopy(model), windows(), B, scope="micro_batch")
    assert max_rel_diff(got, want) < TOL


def test_pre_pass_replays_dropout_and_sampled_routing(monkeypatch):
    """With dropout, expert dropout (MoEUT) and sampled top-k (SUT) the no-grad pre-pass and the
    real forwards draw the same masks (RNG replayed): the step's check that the real forwards'
    statistics equal the pre-pass's raises no warning. Guard: without the replay it warns."""
    cases = (("moeut_switch", {"dropout": 0.2, "expert_dropout": 0.2}), ("sut", {"dropout": 0.2, "sample_topk": 1}))
    for family, extra in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            step_grads(build(family, **extra), windows(), 2)
    monkeypatch.setattr(torch, "set_rng_state", lambda state: None)
    for family, extra in cases:
        with pytest.warns(UserWarning, match="differ from the no-grad pre-pass"):
            step_grads(build(family, **extra), windows(), 2)


def test_unknown_scope_is_refused():
    model = build("switch")
    with pytest.raises(ValueError, match="train.aux_loss_scope"):
        step_grads(model, windows(), 2, scope="batch")


# ---- 2 gloo processes under DDP -----------------------------------------------------------

def _ddp_worker(rank, world, port, out_dir, families, mbs):
    """Each family's step on this rank's part of the batch, for each micro-batch size of `mbs`
    (a fresh model and DDP wrapper per case): {(family, mb): (grads, loss)} in rank<r>.pt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        dist = DistInfo(rank=rank, local_rank=rank, world_size=world)
        local = windows()[rank * (B // world):(rank + 1) * (B // world)]
        result = {}
        for mb in mbs:
            for family in families:
                model = build(family)
                ddp = torch.nn.parallel.DistributedDataParallel(model)
                result[family, mb] = step_grads(model, local, mb, dist=dist, fwd_model=ddp)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        ddp = None  # before the process group goes (docs/architecture.md, "Process-group teardown")
    finally:
        cleanup()


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_equal_the_full_batch_step(tmp_path):
    families = sorted(FAMILIES)
    mbs = (4, 2)  # one and two micro-batches per rank, both in one pair of processes (one start-up)
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), families, mbs), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for family in families:
        want, want_loss = full_batch_grads(build(family))
        for mb in mbs:
            for r in range(2):
                got, loss = ranks[r][family, mb]
                assert max_rel_diff(got, want) < TOL, (family, mb, r)
                assert loss == pytest.approx(want_loss, rel=TOL, abs=1e-9)
