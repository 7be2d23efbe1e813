"""The routing-stability options (docs/training.md "Routing stability"), each against a hand
computation: per-parameter-group AdamW settings and the router warm-up (optim.groups), the
sigmoid-gate router z-loss (model.router_zloss, model.att_router_zloss) and bias balancing
(model.bias_balance_rate); every one off by default. Under gradient accumulation and 2 gloo
processes (DDP), a step with all of them on equals the full-batch single-process step."""
import copy
import dataclasses
import os
import re

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from model_families import V, family_config
from moeut.data.dataset import StreamSampler
from moeut.model import SigmaMoE, SwitchHeadAttention, gate_zloss, sigmoid_topk
from moeut.registry import build_model
from moeut.train_lib.config import OptimGroupSchema, OptimGroupsSchema, OptimSchema
from moeut.train_lib.distributed import DistInfo, cleanup
from moeut.train_lib.optim import build_optimizer, param_group_name
from moeut.train_lib.schedule import set_lr
from moeut.train_lib.state import TrainState
from moeut.train_lib.step import train_step

B, T = 8, 16


def optim_cfg(**groups):
    return OptimSchema(lr=1e-2, betas=[0.9, 0.99], eps=1e-8, weight_decay=0.1,
                       groups=OptimGroupsSchema(**{k: OptimGroupSchema(**v) for k, v in groups.items()}))


GROUPS = dict(router={"lr_mult": 0.5, "weight_decay": 0.0, "warmup": 4}, norm={"weight_decay": 0.0},
              embedding={"lr_mult": 2.0})


def tiny(**extra):
    torch.manual_seed(0)
    return build_model(dataclasses.replace(family_config("moeut"), **extra)).double().train()


def windows(seed=3):
    return torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(seed))


# ---- optim.groups ----------------------------------------------------------------------------

def test_parameter_groups_by_name():
    model = tiny()
    names = param_group_name(model)
    router = sorted(n for n, g in names.items() if g == "router")
    G = model.config.group_size
    assert router == sorted(f"transformer.layers.{g}.{p}" for g in range(G)
                            for p in ("attention.sel_v", "attention.sel_o", "ffn.expert_sel"))
    assert sorted(n for n, g in names.items() if g == "embedding") == ["embedding.weight"]
    assert sorted(n for n, g in names.items() if g == "norm") == sorted(
        [f"transformer.layers.{g}.{ln}.{w}" for g in range(G) for ln in ("ln1", "ln2") for w in ("weight", "bias")]
        + ["out_norm.weight", "out_norm.bias"])


def test_defaults_build_the_papers_single_group():
    model = tiny()
    opt, line = build_optimizer(model, optim_cfg())
    assert len(opt.param_groups) == 1 and "one parameter group" in line
    ref = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    assert opt.state_dict() == ref.state_dict()


@pytest.mark.parametrize("step", [0, 1, 3, 7])
def test_one_adamw_step_per_group_equals_the_hand_computation(step):
    """First AdamW step from zero moments: p' = p (1 - lr_g wd_g) - lr_g g / (|g| + eps), with
    lr_g = lr x lr_mult x min(1, (step + 1) / warmup) (optim.groups.<g>.warmup on top of the schedule)."""
    model = tiny()
    opt, line = build_optimizer(model, optim_cfg(**GROUPS))
    assert [g["name"] for g in opt.param_groups] == ["router", "norm", "embedding", "other"]
    assert line.count("router: 6 tensors") == 1 and "warm-up 4 steps" in line
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    lr = 3e-3
    set_lr(opt, lr, step)
    opt.step()
    which = param_group_name(model)
    for n, p in model.named_parameters():
        s = GROUPS.get(which[n], {})
        lr_g = lr * s.get("lr_mult", 1.0)
        if s.get("warmup"):
            lr_g *= min(1.0, (step + 1) / s["warmup"])
        wd = s.get("weight_decay", 0.1)
        g = p.grad
        want = before[n] * (1 - lr_g * wd) - lr_g * g / (g.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-12, msg=n)


def test_groups_resume_bit_exactly_and_refuse_another_layout(cache_dir, tmp_path):
    from test_train import logged, run, tiny_cfg
    over = ["train.steps=8", "optim.groups.router.lr_mult=0.5", "optim.groups.router.warmup=6",
            "optim.groups.router.weight_decay=0", "optim.groups.norm.weight_decay=0",
            "optim.groups.embedding.lr_mult=2", "train.save_interval=4", "train.val_interval=100"]
    full = run(cache_dir, tmp_path / "full", *over)
    part = run(cache_dir, tmp_path / "split", *over, "train.stop_at=4")
    rest = run(cache_dir, tmp_path / "split", *over)
    assert part["losses"] + rest["losses"] == full["losses"]  # bit-exact in fp32 on CPU
    assert logged(tmp_path / "split") == logged(tmp_path / "full")
    log = (tmp_path / "full" / "train.log").read_text()
    assert len(re.findall(r"\[optim\] AdamW parameter groups: router: \d+ tensors", log)) == 1
    ckpt = torch.load(tmp_path / "split" / "checkpoints" / "step_0000004" / "train_state.pt", weights_only=False)
    groups = ckpt["optimizer"]["param_groups"]
    assert [(g["name"], g["lr_mult"], g["warmup"], g["weight_decay"]) for g in groups] == [
        ("router", 0.5, 6, 0.0), ("norm", 1.0, 0, 0.0), ("embedding", 2.0, 0, 0.01), ("other", 1.0, 0, 0.01)]
    from moeut.train_lib.start import validated_start
    with pytest.raises(ValueError, match=r"optim.groups: .* parameter groups"):  # all at defaults = one group
        validated_start(tiny_cfg(cache_dir, "train.steps=12"), str(tmp_path / "split"), DistInfo(), say=print)
    said = []
    setup = validated_start(tiny_cfg(cache_dir, *over[:-2], "optim.groups.router.lr_mult=0.25", "train.steps=12"),
                            str(tmp_path / "split"), DistInfo(), say=said.append)
    assert setup.state.optimizer.param_groups[0]["lr_mult"] == 0.25
    assert any("optim.groups.router.lr_mult" in m and "0.5" in m for m in said)


# ---- router z-loss for sigmoid gates ------------------------------------------------------------

def test_gate_zloss_is_the_mean_square_over_real_tokens():
    z = torch.randn(3, 5, 2, 4, dtype=torch.float64)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    total, n = 0.0, 0
    for b in range(3):
        for t in range(5):
            if valid[b, t]:
                for h in range(2):
                    for e in range(4):
                        total += float(z[b, t, h, e]) ** 2
                        n += 1
    assert float(gate_zloss(z, valid)) == pytest.approx(total / n, rel=1e-12)
    assert float(gate_zloss(z, None)) == pytest.approx(float((z ** 2).sum()) / z.numel(), rel=1e-12)


def test_zloss_enters_the_loss_as_the_weighted_sum_over_gate_applications():
    cm, ca = 0.003, 0.0005
    model = tiny(router_zloss=cm, att_router_zloss=ca)
    inputs = []  # (kind, gate input) of every gate application, captured in order
    for m in model.modules():
        if isinstance(m, SwitchHeadAttention):
            m.register_forward_pre_hook(lambda mod, args: inputs.append(("att", mod, args[0].detach())))
        if isinstance(m, SigmaMoE):
            m.register_forward_pre_hook(lambda mod, args: inputs.append(("mlp", mod, args[1].detach())))
    x = windows()[:, :-1]
    out = model(x)
    want_mlp = sum(float(F.linear(u, mod.expert_sel).pow(2).mean()) for k, mod, u in inputs if k == "mlp")
    want_att = sum(float(F.linear(u, w).pow(2).mean()) for k, mod, u in inputs if k == "att"
                   for w in (mod.sel_v, mod.sel_o))
    assert len(inputs) == 2 * model.config.n_layers
    # the model casts gate logits to fp32 (as for the entropy regulariser): fp32 rounding
    assert float(out.reg_terms["aux/router_zloss"]) == pytest.approx(cm * want_mlp, rel=1e-6)
    assert float(out.reg_terms["aux/att_router_zloss"]) == pytest.approx(ca * want_att, rel=1e-6)
    plain = tiny()(x)
    assert float(out.reg_loss - plain.reg_loss) == pytest.approx(cm * want_mlp + ca * want_att, rel=1e-6)
    assert "aux/router_zloss" not in plain.reg_terms  # off by default
    model.eval()
    assert float(model(x).reg_loss) == 0.0


def test_zloss_on_another_mlp_type_is_refused():
    with pytest.raises(ValueError, match="router_zloss"):
        dataclasses.replace(family_config("moeut_switch"), router_zloss=0.01)
    with pytest.raises(ValueError, match="bias_balance_rate"):
        dataclasses.replace(family_config("moeut_switch"), bias_balance_rate=0.01)


# ---- bias balancing ------------------------------------------------------------------------------

def test_choice_bias_changes_the_choice_not_the_gate():
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    idx, gate = sigmoid_topk(z, 2, False, 0.0)
    assert sorted(idx[0].tolist()) == [0, 1]
    bias = torch.tensor([0.0, -1.0, 0.0, 1.0])  # scores + bias: 0.88, -0.27, 0.5, 1.27
    idx, gate = sigmoid_topk(z, 2, False, 0.0, choice_bias=bias)
    order = idx[0].argsort()
    assert idx[0][order].tolist() == [0, 3]
    torch.testing.assert_close(gate[0][order], torch.sigmoid(torch.tensor([2.0, -1.0])))


def _counts_by_hand(model, w):
    """Selections per unique layer and expert of a full-batch forward (routing records)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        recs = ref(w[:, :-1], collect_routing=True).routing
    E = model.config.ff_n_experts
    counts = torch.zeros(model.config.group_size, E, dtype=torch.float64)
    for r in recs:
        counts[r.g] += torch.bincount(r.mlp_idx.reshape(-1).long(), minlength=E).double()
    return counts


def _step(model, w, mb, dist=DistInfo(), fwd_model=None, opt=None, lr=1e-2):
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.0)
    state = TrainState(model, opt, None, StreamSampler(96, B, "sequential", 0), dist)
    res = train_step(state, fwd_model or model, w, lr, micro_batch_size=mb, autocast_dtype=None, grad_clip=None)
    assert res.finite
    return res


@pytest.mark.parametrize("mb", [1, 2, 8])
def test_bias_update_from_the_whole_steps_counts(mb):
    rate = 0.01
    model = tiny(bias_balance_rate=rate)
    sigma = [m for m in model.modules() if isinstance(m, SigmaMoE)]
    assert all(float(m.selection_bias.abs().sum()) == 0 for m in sigma)
    w = windows()
    counts = _counts_by_hand(model, w)  # bias 0 before the step: the step's choice
    _step(model, w, mb)
    for g, m in enumerate(sigma):
        mean = float(counts[g].sum()) / counts.shape[1]
        want = torch.tensor([rate * (1.0 if c < mean else -1.0 if c > mean else 0.0) for c in counts[g].tolist()],
                            dtype=m.selection_bias.dtype)
        torch.testing.assert_close(m.selection_bias, want, rtol=0, atol=0)
        assert m.load_counts is None
    assert "transformer.layers.0.ffn.selection_bias" in model.state_dict()
    assert "transformer.layers.0.ffn.selection_bias" not in tiny().state_dict()  # off by default
    # the next step chooses with the bias: its update follows the biased choice's counts
    counts2 = _counts_by_hand(model, windows(4))
    before = sigma[0].selection_bias.clone()
    _step(model, windows(4), mb)
    mean = float(counts2[0].sum()) / counts2.shape[1]
    torch.testing.assert_close(sigma[0].selection_bias - before,
                               rate * torch.sign(mean - counts2[0]).to(before.dtype), rtol=0, atol=1e-15)


def test_a_skipped_step_does_not_update_the_bias():
    model = tiny(bias_balance_rate=0.01)
    w = windows()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    state = TrainState(model, opt, None, StreamSampler(96, B, "sequential", 0), DistInfo())
    model.embedding.weight.data[0, 0] = float("nan")
    w[:, 0] = 0
    res = train_step(state, model, w, 0.0, micro_batch_size=4, autocast_dtype=None, grad_clip=None)
    assert not res.finite
    sigma = [m for m in model.modules() if isinstance(m, SigmaMoE)]
    assert all(float(m.selection_bias.abs().sum()) == 0 and m.load_counts is None for m in sigma)


def test_bias_balancing_resumes_bit_exactly(cache_dir, tmp_path):
    from test_train import logged, run
    over = ["train.steps=8", "model.bias_balance_rate=0.001", "model.router_zloss=0.001",
            "model.att_router_zloss=0.001", "train.save_interval=4", "train.val_interval=100"]
    full = run(cache_dir, tmp_path / "full", *over)
    part = run(cache_dir, tmp_path / "split", *over, "train.stop_at=4")
    rest = run(cache_dir, tmp_path / "split", *over)
    assert part["losses"] + rest["losses"] == full["losses"]
    assert logged(tmp_path / "split") == logged(tmp_path / "full")
    from moeut.checkpoint import load_model
    a = load_model(str(tmp_path / "full" / "checkpoints" / "step_0000008")).model.state_dict()
    b = load_model(str(tmp_path / "split" / "checkpoints" / "step_0000008")).model.state_dict()
    bias = "transformer.layers.0.ffn.selection_bias"
    assert torch.equal(a[bias], b[bias]) and float(a[bias].abs().sum()) > 0


# ---- everything on: micro-batches and 2 gloo processes equal the full-batch step -----------------

ALL_ON = dict(router_zloss=0.01, att_router_zloss=0.01, bias_balance_rate=0.01)


def _two_steps(model, parts, mb, dist=DistInfo(), fwd_model=None):
    opt, _ = build_optimizer(model, optim_cfg(**GROUPS))
    for w in parts:
        _step(model, w, mb, dist=dist, fwd_model=fwd_model, opt=opt, lr=1e-2)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        dist = DistInfo(rank=rank, local_rank=rank, world_size=world)
        model = tiny(**ALL_ON)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        local = [w[rank * (B // world):(rank + 1) * (B // world)] for w in (windows(), windows(4))]
        torch.save(_two_steps(model, local, 2, dist=dist, fwd_model=ddp), os.path.join(out_dir, f"rank{rank}.pt"))
        ddp = None  # before the process group goes (docs/architecture.md, "Process-group teardown")
    finally:
        cleanup()


def _assert_close_states(got, want):
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12, msg=k)


def test_all_options_with_micro_batches_equal_the_full_batch_steps():
    want = _two_steps(tiny(**ALL_ON), [windows(), windows(4)], B)
    assert float(want["transformer.layers.0.ffn.selection_bias"].abs().sum()) > 0
    for mb in (1, 4):
        _assert_close_states(_two_steps(tiny(**ALL_ON), [windows(), windows(4)], mb), want)


@pytest.mark.slow
def test_all_options_under_two_gloo_processes_equal_the_full_batch_steps(tmp_path):
    from test_step_invariance import _free_port
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    want = _two_steps(tiny(**ALL_ON), [windows(), windows(4)], B)
    for r in range(2):
        _assert_close_states(torch.load(tmp_path / f"rank{r}.pt"), want)


@pytest.mark.parametrize("mb", [1, 2])
def test_router_zlosses_are_logged_as_aux_terms(mb):
    """train/ records carry each auxiliary loss (aux/router_zloss, aux/att_router_zloss) as its
    step mean: with the z-losses on, train/reg at the first step exceeds the same step's without
    them by exactly the two logged terms (the forward is otherwise identical)."""
    w = windows()
    records = {}
    for on in (False, True):
        kw = dict(router_zloss=0.01, att_router_zloss=0.02) if on else {}
        torch.manual_seed(0)
        model = tiny(**kw)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        state = TrainState(model, opt, None, StreamSampler(96, B, "sequential", 0), DistInfo())
        train_step(state, model, w, 0.0, micro_batch_size=mb, autocast_dtype=None, grad_clip=None)
        records[on] = state.window.record()
    off, on = records[False], records[True]
    assert not any(k.startswith("aux/") for k in off)
    assert on["aux/router_zloss"] > 0 and on["aux/att_router_zloss"] > 0
    assert on["train/reg"] - off["train/reg"] == pytest.approx(on["aux/router_zloss"] + on["aux/att_router_zloss"],
                                                               rel=1e-6)  # reg sums in fp32
    assert on["train/ce"] == off["train/ce"]
