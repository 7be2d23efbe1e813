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
