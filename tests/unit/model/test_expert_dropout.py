"""Expert dropout in the sigmoid top-k choice (SPEC 1.3, 1.5): in training each expert is left out of the
choice with probability `expert_dropout`; in eval never; the gate is sigmoid(z) at the chosen expert either
way. Reference: the probabilities themselves, measured over 40,000 seeded draws (4 standard errors ~ 0.9 %)."""
import torch

from moeut.model import sigmoid_topk


def test_dropout_rate_choice_and_gates():
    N, p = 40_000, 0.25
    z = torch.tensor([4.0, 1.0, 0.0, -1.0]).expand(N, 4)  # expert 0 is always the best, expert 1 the second
    torch.manual_seed(0)
    idx, gate = sigmoid_topk(z, 1, training=True, expert_dropout=p)
    share0 = (idx[:, 0] == 0).double().mean().item()
    assert abs(share0 - (1 - p)) < 0.01  # expert 0 kept with probability 1 - p
    # expert 1 wins when 0 is dropped and 1 is not: p (1 - p)
    assert abs((idx[:, 0] == 1).double().mean().item() - p * (1 - p)) < 0.01
    torch.testing.assert_close(gate, torch.sigmoid(z).gather(-1, idx))
    idx_eval, _ = sigmoid_topk(z, 1, training=False, expert_dropout=p)
    assert (idx_eval == 0).all()
    idx_none, _ = sigmoid_topk(z, 1, training=True, expert_dropout=0.0)
    assert (idx_none == 0).all()
