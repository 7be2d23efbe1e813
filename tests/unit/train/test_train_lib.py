"""The training library's pieces against independent references (SPEC §4.1-4.3, §5.7):
`train_step` equals a hand-written full-batch step (micro-batching and clipping included)
and skips a non-finite step without touching the weights; `evaluate` equals exp of the mean
token cross-entropy computed window by window; `pick_precision` follows SPEC 4.3."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from moeut.checkpoint import build_model
from moeut.registry import get_preset
from moeut.data.dataset import StreamSampler
from moeut.train_lib.distributed import DistInfo
from moeut.train_lib.evaluate import evaluate, validate
from moeut.train_lib.metrics import make_routing_stats
from moeut.train_lib.precision import pick_precision
from moeut.train_lib.state import TrainState
from moeut.train_lib.step import train_step

B, T, LR, CLIP = 4, 8, 1e-2, 0.1


def _tiny():
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    return cfg, build_model(cfg).train()


def _sgd(model):
    # SGD, not AdamW: an update linear in the gradient, so the comparison tests the clipped,
    # accumulated gradient itself (Adam's first step, g / (|g| + eps), amplifies rounding in
    # near-zero gradients to O(lr) differences)
    return torch.optim.SGD(model.parameters(), lr=LR, weight_decay=0.01)


def _state(model, cfg=None):
    opt = _sgd(model)
    routing = make_routing_stats(cfg) if cfg is not None else None
    return TrainState(model, opt, None, StreamSampler(100, B, "sequential", 0), DistInfo(), routing)


def test_train_step_equals_a_full_batch_step_with_clipping():
    cfg, model = _tiny()
    ref = copy.deepcopy(model)
    window_BT1 = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(1))
    # reference: one forward over the whole batch, CE + reg, global L2 clip to CLIP, one step
    ref_opt = _sgd(ref)
    out = ref(window_BT1[:, :-1])
    ref_loss = F.cross_entropy(out.logits.flatten(0, 1), window_BT1[:, 1:].flatten()) + out.reg_loss
    ref_loss.backward()
    norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in ref.parameters() if p.grad is not None))
    scale = min(1.0, CLIP / (norm + 1e-6))
    for p in ref.parameters():
        if p.grad is not None:
            p.grad.mul_(scale)
    ref_opt.step()

    state = _state(model, cfg)
    res = train_step(state, model, window_BT1, LR, micro_batch_size=2, autocast_dtype=None, grad_clip=CLIP,
                     collect_routing=True)
    assert res.finite and res.step == 0 and res.lr == LR
    assert res.loss == pytest.approx(ref_loss.item(), rel=1e-5)
    assert res.grad_norm == pytest.approx(norm, rel=1e-4)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert (state.step, state.tokens_seen, state.window.n_finite, state.window.tokens) == (1, B * T, 1, B * T)
    assert state.window.loss_sum == pytest.approx(ref_loss.item(), rel=1e-5)
    # every token picked ff_k experts in every layer application (2 micro-batches collected)
    assert state.routing.counts_numpy()["mlp_counts"].sum() == B * T * cfg.ff_k * cfg.n_layers
    assert all(g["lr"] == LR for g in state.optimizer.param_groups)


class _NaNLM(torch.nn.Module):
    """An LM whose loss is NaN: logits of NaN, zero regulariser."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, ids_BT, collect_routing=False):
        logits = (self.w.sum() * float("nan")).expand(*ids_BT.shape, 5)
        return SimpleNamespace(logits=logits, reg_loss=self.w.sum() * 0, routing=None)


def test_train_step_skips_a_nonfinite_loss_and_counts_it():
    model = _NaNLM()
    state = _state(model)
    window_BT1 = torch.zeros(B, T + 1, dtype=torch.long)
    for k in (1, 2):
        res = train_step(state, model, window_BT1, LR, micro_batch_size=B, autocast_dtype=None, grad_clip=CLIP)
        assert not res.finite and math.isnan(res.loss)
        assert state.window.nonfinite_run == k and state.step == k
    assert torch.equal(model.w.detach(), torch.ones(3))  # no optimiser step
    assert not state.optimizer.state and model.w.grad is None  # gradients dropped
    assert state.window.n_finite == 0 and state.tokens_seen == 2 * B * T


class _Windows:
    """A WindowDataset stand-in: fixed [N, T+1] windows."""

    def __init__(self, w):
        self.w = w

    def __len__(self):
        return len(self.w)

    def batch(self, idx):
        return self.w[torch.as_tensor(idx)]


def test_evaluate_is_exp_of_mean_token_cross_entropy():
    cfg, model = _tiny()
    windows = torch.randint(0, cfg.vocab_size, (5, T + 1), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # naive: one window at a time, fp64 sums
        ce = sum(F.cross_entropy(model.eval()(w[None, :-1]).logits[0].double(), w[1:], reduction="sum")
                 for w in windows)
    want = math.exp(float(ce) / (5 * T))
    model.train()
    for bs in (1, 3, 8):
        got = evaluate(model, _Windows(windows), bs, torch.device("cpu"), None, DistInfo())
        assert got["perplexity"] == pytest.approx(want, rel=1e-6) and got["tokens"] == 5 * T
    assert model.training  # mode restored
    rec = validate(model, {"val": _Windows(windows)}, 2, torch.device("cpu"), None, DistInfo())
    assert rec["validation/val/perplexity"] == pytest.approx(want, rel=1e-6)
    assert rec["validation/val/loss"] == pytest.approx(math.log(want), rel=1e-6)


def test_pick_precision_follows_spec_4_3():
    cpu = torch.device("cpu")
    assert pick_precision("auto", cpu) == (None, False)  # fp32 on CPU
    assert pick_precision("fp32", cpu) == (None, False)
    assert pick_precision("bf16", cpu) == (torch.bfloat16, False)  # no GradScaler with bf16
    assert pick_precision("fp16", cpu) == (torch.float16, True)


# ---- non-finite gradients with a finite loss --------------------------------------------------

def _snapshot(state):
    params = [p.detach().clone() for p in state.model.parameters()]
    opt = copy.deepcopy(state.optimizer.state_dict())
    return params, opt


def _assert_same_state(state, snap):
    params, opt = snap
    for p, q in zip(state.model.parameters(), params):
        assert torch.equal(p.detach(), q)  # bit-identical
    now = state.optimizer.state_dict()
    assert now["state"].keys() == opt["state"].keys()
    for k, st in opt["state"].items():
        for name, v in st.items():
            assert torch.equal(torch.as_tensor(now["state"][k][name]), torch.as_tensor(v)), (k, name)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("mb", [B, 2])
def test_train_step_skips_nonfinite_gradients_with_a_finite_loss(bad, mb):
    """A finite loss whose backward puts inf/NaN into one gradient entry (a backward hook): the step is
    skipped like a non-finite loss (weights and AdamW state bit-identical, counted, gradients
    dropped); the next good step resets the count and trains."""
    cfg, model = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    state = TrainState(model, opt, None, StreamSampler(100, B, "sequential", 0), DistInfo())
    window_BT1 = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(4))
    assert train_step(state, model, window_BT1, LR, micro_batch_size=mb, autocast_dtype=None, grad_clip=CLIP).finite
    snap = _snapshot(state)
    target = model.lm_head.weight

    def poison(g):
        g = g.clone()
        g.view(-1)[7] = bad
        return g
    hook = target.register_hook(poison)
    for k in (1, 2):
        res = train_step(state, model, window_BT1, LR, micro_batch_size=mb, autocast_dtype=None, grad_clip=CLIP)
        assert not res.finite and res.skipped == "gradient" and math.isfinite(res.loss)
        assert not math.isfinite(res.grad_norm)
        assert state.window.nonfinite_run == k and state.step == k + 1
        _assert_same_state(state, snap)
        assert all(p.grad is None for p in model.parameters())
    assert state.window.n_finite == 1  # only the good step entered the log window
    hook.remove()
    res = train_step(state, model, window_BT1, LR, micro_batch_size=mb, autocast_dtype=None, grad_clip=CLIP)
    assert res.finite and res.skipped is None and state.window.nonfinite_run == 0
    assert not torch.equal(target.detach(), snap[0][[p is target for p in model.parameters()].index(True)])


def _one_rank_poisons(rank, world, port, out_dir):
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        cfg, model = _tiny()
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        state = TrainState(model, opt, None, StreamSampler(100, B, "sequential", 0, rank, world),
                           DistInfo(rank=rank, local_rank=rank, world_size=world))
        window_BT1 = torch.randint(0, cfg.vocab_size, (B // world, T + 1), generator=torch.Generator().manual_seed(rank))
        before = [p.detach().clone() for p in model.parameters()]
        if rank == 1:  # only this rank's backward overflows; no DDP, so nothing else carries it over
            model.lm_head.weight.register_hook(lambda g: g * float("inf"))
        res = train_step(state, model, window_BT1, LR, micro_batch_size=B // world, autocast_dtype=None,
                         grad_clip=CLIP)
        same = all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), before))
        torch.save({"finite": res.finite, "skipped": res.skipped, "run": state.window.nonfinite_run,
                    "same": same, "opt_state": len(opt.state), "loss": res.loss},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_skip_together_when_one_sees_a_nonfinite_gradient(tmp_path):
    """2 gloo processes, plain (non-DDP) modules: only rank 1's gradient is infinite; the flag is
    all-reduced with the loss, so both ranks skip, keep their weights and count the skip."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_one_rank_poisons, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in range(2):
        loss = got[r].pop("loss")
        assert math.isfinite(loss) and loss == got[0].get("loss", loss)
        assert got[r] == {"finite": False, "skipped": "gradient", "run": 1, "same": True, "opt_state": 0}, (r, got)


def test_fp16_scaler_overflow_is_a_counted_skip_and_the_next_step_runs():
    """With an fp16 GradScaler, inf gradients skip the step like any other (counted, weights
    unchanged) and only lower the loss scale; the scaler is updated, so the next step's
    unscale_ works and the step is taken."""
    cfg, model = _tiny()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    state = TrainState(model, _sgd(model), scaler, StreamSampler(100, B, "sequential", 0), DistInfo())
    window_BT1 = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(5))
    before = [p.detach().clone() for p in model.parameters()]
    hook = model.lm_head.weight.register_hook(lambda g: g * float("inf"))
    res = train_step(state, model, window_BT1, LR, micro_batch_size=B, autocast_dtype=None, grad_clip=CLIP)
    assert res.skipped == "gradient" and state.window.nonfinite_run == 1 and scaler.get_scale() == 2.0 ** 9
    assert all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), before))
    hook.remove()
    res = train_step(state, model, window_BT1, LR, micro_batch_size=B, autocast_dtype=None, grad_clip=CLIP)
    assert res.finite and state.window.nonfinite_run == 0
    assert not all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), before))
