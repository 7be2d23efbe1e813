"""What a training start actually builds (SPEC 4.1, 5.4, 5.6): the optimiser `validated_start` constructs,
its parameter groups and settings compared with the config values that should have fed them (set to
non-defaults, so that a forgotten argument falls back to torch's default and shows), the sampler and the
train-token budget; and `set_lr` reaching every parameter group."""
import pytest
import torch

from moeut.train_lib.distributed import DistInfo
from moeut.train_lib.schedule import set_lr
from moeut.train_lib.start import validated_start

from test_train import tiny_cfg  # the suite's tiny CPU training config

# Every value differs from torch.optim.AdamW's default (betas (0.9, 0.999), eps 1e-8, weight_decay 0.01)
# and from the cpu_tiny experiment's.
OVERRIDES = ["optim.betas=[0.8,0.95]", "optim.eps=1e-6", "optim.weight_decay=0.3", "optim.lr=7e-4",
             "data.sampler=shuffled", "data.shuffle_seed=5", "train.seed=11"]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    root = tmp_path_factory.mktemp("start")
    tc = tiny_cfg(str(root / "cache"), *OVERRIDES)
    return tc, validated_start(tc, str(root / "run"), DistInfo(), say=lambda msg: None)


def test_optimizer_is_adamw_over_every_parameter_once(start):
    tc, setup = start
    opt = setup.state.optimizer
    assert type(opt) is torch.optim.AdamW
    in_groups = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups))  # no parameter twice
    assert set(in_groups) == {id(p) for p in setup.state.model.parameters()}  # SPEC 4.1: all parameters
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == setup.n_params


def test_every_param_group_carries_the_configured_settings(start):
    tc, setup = start
    for g in setup.state.optimizer.param_groups:
        assert tuple(g["betas"]) == (0.8, 0.95)
        assert g["eps"] == 1e-6
        assert g["weight_decay"] == 0.3
        assert (tuple(g["betas"]), g["eps"], g["weight_decay"]) == (tuple(tc.optim.betas), tc.optim.eps,
                                                                  tc.optim.weight_decay)


def test_sampler_and_train_budget_follow_the_config(start):
    tc, setup = start
    s = setup.state.sampler
    assert (s.mode, s.seed, s.batch_size, s.position) == ("shuffled", 5, tc.train.batch_size, 0)
    # SPEC 5.4 train limit (steps + 100) * B * T tokens: windows of T predicted tokens each
    assert len(setup.data.train) == (tc.train.steps + 100) * tc.train.batch_size
    assert setup.state.seed == 11 and not setup.resumed


def test_set_lr_reaches_every_param_group():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr": 5.0}], lr=1.0)
    set_lr(opt, 0.125)
    assert [g["lr"] for g in opt.param_groups] == [0.125, 0.125]
