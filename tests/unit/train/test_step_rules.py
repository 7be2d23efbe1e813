"""Training-step and validation rules not covered by the clipped full-batch comparison (SPEC 4.3, 5.7):
without `grad_clip` the step uses the raw gradient (no hidden default norm), and `evaluate` leaves the
model in the mode it found it in; consecutive steps do not carry gradients over. References: hand-written
unclipped SGD steps; the mode flags."""
import copy

import pytest
import torch
import torch.nn.functional as F

from moeut.data.dataset import StreamSampler
from moeut.registry import build_model, get_preset
from moeut.train_lib.distributed import DistInfo
from moeut.train_lib.evaluate import evaluate
from moeut.train_lib.state import TrainState
from moeut.train_lib.step import train_step

B, T, LR = 4, 8, 1e-2


@pytest.mark.parametrize("grad_clip", [None, 0.0])
def test_no_grad_clip_steps_with_the_raw_gradient(grad_clip):
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    model = build_model(cfg).train()
    ref = copy.deepcopy(model)
    w = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(1))
    out = ref(w[:, :-1])
    (F.cross_entropy(out.logits.flatten(0, 1), w[:, 1:].flatten()) + out.reg_loss).backward()
    norm = sum(float(p.grad.pow(2).sum()) for p in ref.parameters() if p.grad is not None) ** 0.5
    assert norm > 1.5  # large enough that any default clipping norm of 1 or less would show
    with torch.no_grad():
        for p in ref.parameters():
            if p.grad is not None:
                p -= LR * p.grad
    state = TrainState(model, torch.optim.SGD(model.parameters(), lr=LR), None, StreamSampler(100, B), DistInfo())
    res = train_step(state, model, w, LR, micro_batch_size=B, autocast_dtype=None, grad_clip=grad_clip)
    assert res.grad_norm == pytest.approx(norm, rel=1e-4)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_restores_the_model_mode(training):
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    model = build_model(cfg).train(training)

    class Windows:
        def __len__(self):
            return 2

        def batch(self, idx):
            return torch.arange(2 * (T + 1)).view(2, T + 1)[torch.as_tensor(idx)] % cfg.vocab_size

    evaluate(model, Windows(), 2, torch.device("cpu"), None, DistInfo())
    assert model.training is training and all(m.training is training for m in model.modules())


def test_consecutive_steps_do_not_accumulate_gradients():
    """Two train_steps equal two hand-written SGD steps, each on its own window's gradient only."""
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    model = build_model(cfg).train()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    windows = [torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g) for _ in range(2)]
    for w in windows:
        out = ref(w[:, :-1])
        (F.cross_entropy(out.logits.flatten(0, 1), w[:, 1:].flatten()) + out.reg_loss).backward()
        with torch.no_grad():
            for p in ref.parameters():
                if p.grad is not None:
                    p -= LR * p.grad
                p.grad = None
    state = TrainState(model, torch.optim.SGD(model.parameters(), lr=LR), None, StreamSampler(100, B), DistInfo())
    for w in windows:
        train_step(state, model, w, LR, micro_batch_size=B, autocast_dtype=None, grad_clip=None)
    assert all(p.grad is None for p in model.parameters())  # nothing carried into the next step
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
