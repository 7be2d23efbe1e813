"""Start-up checks of training (and the other entry points) that need no data: every numeric
option is range-checked with its dotted name (generated from the schemas), routing metrics exist
for every MoE architecture, FLOPs accounting never falls back to total parameters, the run state
round-trips, and a broken baselines import is not swallowed."""
import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moeut import validate as V
from moeut.analysis.routing_command import RoutingOptions
from moeut.registry import get_preset
from moeut.sweep import SweepFile
from moeut.train_lib import config as TC
from moeut.train_lib import metrics as train_metrics

REPO = Path(__file__).resolve().parents[3]


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=["experiment=cpu_tiny", "name=test", "print_config=false", *overrides])


TRAIN_SCHEMAS = {"data": TC.DataSchema, "optim": TC.OptimSchema, "train": TC.TrainSchema,
                 "logger": TC.LoggerSchema, "model": TC.ModelSchema}
TRAIN_OPTIONS = [(f"{group}.{name}", field, kind) for group, cls in TRAIN_SCHEMAS.items()
                 for name, field, kind in V.numeric_fields(cls)]
OTHER_OPTIONS = ([(f"routing.{n}", f, k) for n, f, k in V.numeric_fields(RoutingOptions)]
                 + [(f"sweep.{n}", f, k) for n, f, k in V.numeric_fields(SweepFile)])


@pytest.mark.parametrize("name,field,kind", TRAIN_OPTIONS + OTHER_OPTIONS, ids=lambda x: x if isinstance(x, str) else "")
def test_every_numeric_option_declares_a_range(name, field, kind):
    """A new numeric option without a range fails here (add metadata=at_least(...) / in_range(...))."""
    assert V.field_range(field) is not None, f"{name}: numeric option without a declared range"


def _bad_values(field):
    return V.field_range(field).outside()


def _override(name, kind, value):
    value = int(value) if float(value).is_integer() else value
    return f"{name}=[{value}]" if kind == "items" else f"{name}={value}"


@pytest.mark.parametrize("name,field,kind", TRAIN_OPTIONS, ids=lambda x: x if isinstance(x, str) else "")
def test_train_option_out_of_range_is_named(name, field, kind):
    for bad in _bad_values(field):
        ov = _override(name, kind, bad)
        if name == "optim.betas":
            ov = f"optim.betas=[0.9,{bad}]"
        cfg = _compose(ov)
        shown = f"{name}[1]" if name == "optim.betas" else (f"{name}[0]" if kind == "items" else name)
        with pytest.raises(ValueError, match="^" + re.escape(shown) + ": must be"):
            TC.to_typed(cfg)


@pytest.mark.parametrize("ov,key", [
    ("train.batch_size=0", "train.batch_size"),          # was ZeroDivisionError
    ("train.batch_size=-4", "train.batch_size"),         # was "0 windows" after loading the data
    ("train.micro_batch_size=0", "train.micro_batch_size"),  # was accepted
    ("train.steps=0", "train.steps"),                    # was an error naming optim.warmup
    ("train.steps=-5", "train.steps"),
    ("optim.lr=nan", "optim.lr"),
    ("+model.overrides.d_model=0", "model.overrides.d_model"),
])
def test_issue_examples(ov, key):
    with pytest.raises(ValueError, match=rf"^{key}: must be"):
        TC.to_typed(_compose(ov))


@pytest.mark.parametrize("ov,key", [
    ("+train.stepz=5", "train.stepz"),     # a typo in '+' form: Hydra adds the key; nothing reads it
    ("+foo=1", "foo"),
    ("+data.seq_lenn=64", "data.seq_lenn"),
])
def test_a_key_the_schema_does_not_declare_is_refused(ov, key):
    with pytest.raises(ValueError, match=rf"^{re.escape(key)}: no such option"):
        TC.to_typed(_compose(ov))
    # a plain mapping option still takes any key
    assert TC.unknown_keys(_compose("+data.extra_valid.mine=/tmp")) == []


def test_defaults_and_every_experiment_pass_the_range_checks():
    for exp in sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[f"experiment={exp}", "name=test", "data.path=/", "data.source=local"])
        obj = OmegaConf.to_object(cfg)
        for key in ("model", "data", "optim", "train", "logger"):
            V.check_ranges(getattr(obj, key), key)


@pytest.mark.parametrize("name,field,kind", [o for o in OTHER_OPTIONS if o[0].startswith("routing.")],
                         ids=lambda x: x if isinstance(x, str) else "")
def test_routing_option_out_of_range_is_named(name, field, kind):
    from moeut.analysis.routing_command import run_analysis
    path = name.split(".", 1)[1]
    for bad in _bad_values(field):
        cfg = RoutingOptions(checkpoint="/nonexistent")
        node, leaf = cfg, path
        while "." in leaf:
            head, leaf = leaf.split(".", 1)
            node = getattr(node, head)
        setattr(node, leaf, [int(bad)] if kind == "items" else bad)
        shown = path + ("[0]" if kind == "items" else "")
        with pytest.raises(ValueError, match="^" + re.escape(shown) + ": must be"):
            run_analysis(cfg)  # checked before the checkpoint is looked up


def test_sweep_expected_jobs_out_of_range(tmp_path):
    from moeut.sweep import load_sweep
    f = tmp_path / "s.yaml"
    f.write_text("name: s\ngrids:\n  - overrides: [experiment=cpu_tiny]\nexpected_jobs: 0\n")
    with pytest.raises(ValueError, match="expected_jobs"):
        load_sweep(f)


@pytest.mark.parametrize("key,bad", [("limit", 0), ("batch_size", 0), ("pad_multiple", -1),
                                     ("perplexity.stride", 0)])
def test_eval_option_out_of_range_is_named(key, bad):
    from moeut.cli import typed_options
    from moeut.evaluate import EvaluateOptions
    with pytest.raises(ValueError, match=rf"^{key}: must be >= 1, got {bad}$"):
        typed_options(EvaluateOptions, ["checkpoint=/nonexistent", "tasks=[piqa]", f"{key}={bad}"])


def test_eval_numeric_options_all_have_ranges():
    from moeut.evaluate import EvaluateOptions
    numeric = list(V.numeric_fields(EvaluateOptions))
    assert {name for name, _, _ in numeric} >= {"limit", "batch_size", "pad_multiple", "perplexity.stride"}
    assert [name for name, f, _ in numeric if V.field_range(f) is None] == []


def test_range_descriptions():
    r = V.Range(0, 1, hi_open=True)
    assert r.describe() == "in [0, 1)" and r.contains(0) and not r.contains(1) and not r.contains(float("nan"))
    assert V.Range(0, lo_open=True).describe() == "> 0" and V.Range(0, lo_open=True).outside() == [0]


# ------------------------------------------------------------------------------------------
# Routing metrics for every MoE architecture (were silently off for Switch, DeepSeekMoE, SUT)
# ------------------------------------------------------------------------------------------

def _moe_applications(cfg):
    """Hand count of MoE MLP applications per token, from the architecture's definition."""
    if cfg.arch == "moe_transformer":
        return cfg.n_layers // cfg.moe_every
    return cfg.n_layers  # MoEUT: every layer application; SUT: every ACT step (n_layers max)


@pytest.mark.parametrize("preset", ["tiny", "cpu_moeut_switch", "cpu_moeut_deepseek", "cpu_switch", "cpu_deepseek",
                                    "cpu_du_every2", "cpu_sut", "cpu_sigma_moe"])
def test_routing_metrics_for_every_moe_architecture(preset):
    from moeut.registry import build_model
    cfg = get_preset(preset)
    stats = train_metrics.make_routing_stats(cfg)
    assert stats is not None
    torch.manual_seed(0)
    model = build_model(cfg).train()
    B, T = 2, 8
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    with torch.no_grad():
        out = model(ids, collect_routing=True)
    stats.update(out.routing)
    counts = stats.counts_numpy()["mlp_counts"]
    # every token selects ff_k experts (shared ones included) in every MoE application
    assert counts.sum() == B * T * cfg.ff_k * _moe_applications(cfg)
    metrics = stats.compute()
    assert "moe/usage_rel_ppl_all" in metrics and any(k.endswith("/usage_rel_ppl") for k in metrics)
    assert all(0 <= v <= 1 for k, v in metrics.items() if k.endswith("dead_frac"))


def test_dense_model_has_no_routing_stats():
    assert train_metrics.make_routing_stats(get_preset("dense_tiny")) is None


def test_unknown_moe_architecture_is_an_error_not_silence():
    @dataclasses.dataclass
    class Odd:
        arch: str = "odd"
        ff_n_experts: int = 4
    with pytest.raises(ValueError, match="train.routing_interval"):
        train_metrics.make_routing_stats(Odd())


# ------------------------------------------------------------------------------------------
# FLOPs for MFU: active compute, never 6 x total parameters
# ------------------------------------------------------------------------------------------

def test_flops_per_token_is_active_compute_for_moe():
    from moeut.compute import flops_per_token, total_params
    for preset in ("moeut_244m", "cpu_switch", "cpu_sut"):
        cfg = get_preset(preset)
        fpt = train_metrics.flops_per_token(cfg, 1024)
        assert fpt == flops_per_token(cfg, 1024, "paper")
        if preset == "moeut_244m":  # far below 6 x total parameters (+ attention) for a MoE
            assert fpt < 6 * total_params(cfg)


def test_flops_per_token_unknown_arch_warns_and_returns_none():
    @dataclasses.dataclass
    class Odd:
        arch: str = "odd"
    with pytest.warns(UserWarning, match="train/mfu: not logged"):
        assert train_metrics.flops_per_token(Odd(), 16) is None


# ------------------------------------------------------------------------------------------
# Run state round trip and the baselines import
# ------------------------------------------------------------------------------------------

def test_log_window_state_round_trip_counts_time_without_downtime():
    from moeut.train_lib.state import LogWindow
    w = LogWindow()
    w.add(2.0, 1.5, 0.5)
    w.add(4.0, 3.5, 0.5)
    w.tokens = 100
    w.seconds = 10.0
    d = w.state_dict()
    assert d["seconds"] >= 10.0
    v = LogWindow()
    v.load_state_dict(d)
    rec = v.record()
    assert rec["train/loss"] == 3.0 and rec["train/ce"] == 2.5 and rec["train/reg"] == 0.5
    assert math.isclose(rec["train/tokens_per_s"], 100 / d["seconds"], rel_tol=0.05)
    assert v.n_finite == 0 and v.tokens == 0  # the next window starts empty


def _state(seed=0):
    from moeut.data.dataset import StreamSampler
    from moeut.analysis.routing import RoutingStats
    from moeut.train_lib.distributed import DistInfo
    from moeut.train_lib.state import TrainState
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return TrainState(model, opt, None, StreamSampler(100, 4, "shuffled", 7), DistInfo(), RoutingStats(2, 2, 4),
                      seed=seed)


def test_train_state_round_trip_restores_rng_routing_and_counters():
    import random
    import numpy as np
    from moeut.train_lib.state import seed_all
    st = _state()
    st.step, st.tokens_seen, st.wandb_id = 5, 640, "abc"
    st.sampler.position = 5
    st.window.add(3.0, 2.0, 1.0)
    counts = {k: torch.randint(0, 50, v.shape).to(v.dtype) for k, v in st.routing.state_counts().items()}
    st.routing.load_counts(counts)
    st.routing.layer_index[:] = [[0, 2], [1, 3]]
    seed_all(123)
    d = st.state_dict()
    want = (torch.rand(4), np.random.rand(3), random.random())  # the streams right after the save
    seed_all(999)  # a new process: other streams, empty accumulators
    new = _state(seed=1)
    new.load_state_dict(d, source="test")
    got = (torch.rand(4), np.random.rand(3), random.random())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]
    assert (new.step, new.tokens_seen, new.wandb_id, new.sampler.position) == (5, 640, "abc", 5)
    assert new.window.n_finite == 1 and new.window.loss_sum == 3.0
    for k, v in counts.items():
        assert torch.equal(new.routing.state_counts()[k], v)
    assert new.routing.layer_index.tolist() == [[0, 2], [1, 3]]
    assert torch.equal(new.optimizer.state_dict()["state"][0]["exp_avg"], st.optimizer.state_dict()["state"][0]["exp_avg"])


def test_train_state_from_another_world_size_warns_and_keeps_routing_sum():
    st = _state()
    counts = {k: torch.randint(0, 50, v.shape).to(v.dtype) for k, v in st.routing.state_counts().items()}
    st.routing.load_counts(counts)
    d = st.state_dict()
    d["ranks"] = [d["ranks"][0], d["ranks"][0]]  # as if written by 2 processes
    new = _state()
    with pytest.warns(UserWarning, match=r"train.resume: test was written by 2 process\(es\), this run has 1"):
        new.load_state_dict(d, source="test")
    for k, v in counts.items():
        assert torch.equal(new.routing.state_counts()[k], 2 * v)


def test_train_state_sampler_change_warns():
    st = _state()
    d = st.state_dict()
    d["sampler"] = dict(d["sampler"], mode="sequential")
    with pytest.warns(UserWarning, match="data.sampler: test was trained with 'sequential'"):
        _state().load_state_dict(d, source="test")
