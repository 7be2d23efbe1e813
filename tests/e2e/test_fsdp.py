"""FSDP2 training (train.parallel=fsdp) and checkpoints that reshard (CPU, gloo, preset `tiny`/
`dense_tiny`, fp32): 2 sharded processes train what 1 process trains; a checkpoint written by
1 or 2 processes, DDP or FSDP, resumes with the other and the following losses equal the
uninterrupted run's; a resume at the same world size is bit-exact; a checkpoint written before
the optimiser state was keyed by parameter name still resumes; `load_model` reads an FSDP run's
checkpoint as the model that trained."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from moeut.checkpoint import find_checkpoints, load_model
from moeut.train_lib.config import to_typed
from moeut.train_lib.fsdp import mixed_precision_policy
from moeut.train_lib.loop import train
from test_train import torchrun as run_torchrun

REPO = Path(__file__).resolve().parents[2]
STEPS, SPLIT = 10, 5
TIMING_KEYS = ("time", "train/tokens_per_s", "train/mfu", "train/memory_mb")
# FSDP runs split each rank's 4 sequences into 2 micro-batches: sharded gradients accumulate
FSDP = ("train.parallel=fsdp", "train.micro_batch_size=2")
COMMON = (f"train.steps={STEPS}", "train.log_interval=1", "train.val_interval=4", "train.routing_interval=5")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("cache"))
    run(d, tmp_path_factory.mktemp("warm"), "train.steps=2")  # tokenizer + shards cached for the subprocesses
    return d


def run(cache_dir, run_dir, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=cpu_tiny", "name=test", "print_config=false",
                                           f"data.cache_dir={cache_dir}", "logger.progress=none",
                                           "train.threads=1", *COMMON, *overrides])
    return train(to_typed(cfg), str(run_dir))


def torchrun(cache_dir, run_dir, *overrides):
    """train.py under torchrun with 2 gloo processes."""
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MOEUT_DATA", None)
    p = run_torchrun(["train.py", "experiment=cpu_tiny", f"data.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}",
                      "print_config=false", "logger.progress=none", "train.threads=1", *COMMON, *overrides],
                     env, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


def logged(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]


def losses(run_dir):
    """{step: train/loss} of the run's metrics.jsonl."""
    return {r["step"]: r["train/loss"] for r in logged(run_dir) if "train/loss" in r}


def assert_after_split_equal(run_dir, reference):
    got, want = losses(run_dir), losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(SPLIT + 1, STEPS + 1):
        assert got[s] == pytest.approx(want[s], rel=1e-6, abs=0), s


@pytest.fixture(scope="module")
def single(cache_dir, tmp_path_factory):
    """The uninterrupted 1-process run (MoEUT, the reference of every resharded resume)."""
    d = tmp_path_factory.mktemp("single")
    run(cache_dir, d)
    return d


@pytest.fixture(scope="module")
def fsdp_full(cache_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp_full")
    out = torchrun(cache_dir, d, *FSDP)
    assert "sharded over 2 processes" in out
    return d


@pytest.fixture(scope="module")
def fsdp_split(cache_dir, tmp_path_factory):
    """A 2-process FSDP run stopped at step SPLIT (its checkpoint is copied by the tests)."""
    d = tmp_path_factory.mktemp("fsdp_split")
    torchrun(cache_dir, d, *FSDP, f"train.stop_at={SPLIT}")
    return d


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_fsdp_two_processes_equal_one_process_moeut(single, fsdp_full):
    want, got = losses(single), losses(fsdp_full)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in sorted(got)] == pytest.approx([want[s] for s in sorted(want)], rel=1e-6, abs=0)
    assert len(find_checkpoints(str(fsdp_full))) == 1  # only rank 0 writes


def test_fsdp_two_processes_equal_one_process_dense(cache_dir, tmp_path):
    """Dense, with activation checkpointing; 127 validation windows in batches of 3 (64 and 63 per
    rank: the second rank runs one uncounted forward so the sharded forwards stay in step), and
    the validation perplexities equal the 1-process run's."""
    val = ("data.valid_tokens=4064", "train.val_batch_size=3")
    run(cache_dir, tmp_path / "single", "model=dense_tiny", *val)
    torchrun(cache_dir, tmp_path / "fsdp", "model=dense_tiny", "train.parallel=fsdp",
             "train.activation_checkpointing=true", *val)
    want, got = losses(tmp_path / "single"), losses(tmp_path / "fsdp")
    assert len(got) == STEPS
    assert [got[s] for s in sorted(got)] == pytest.approx([want[s] for s in sorted(want)], rel=1e-6, abs=0)

    def ppl(d):
        return [(r["step"], r["validation/val/perplexity"]) for r in logged(d) if "validation/val/perplexity" in r]
    assert [s for s, _ in ppl(tmp_path / "fsdp")] == [4, 8, 10]
    assert [p for _, p in ppl(tmp_path / "fsdp")] == pytest.approx([p for _, p in ppl(tmp_path / "single")],
                                                                   rel=1e-6, abs=0)


def test_fsdp_checkpoint_loads_as_the_trained_model(single, fsdp_full):
    """model.pt of a sharded run is the full, unsharded state dict: `load_model` (evaluation,
    analysis, export, the lm-eval adapter) gives the logits of the unsharded run's model."""
    a, b = load_model(str(fsdp_full)), load_model(str(single))
    assert a.meta["step"] == STEPS and a.tokenizer is not None
    assert a.model.state_dict().keys() == b.model.state_dict().keys()
    assert all(not hasattr(t, "to_local") for t in a.model.state_dict().values())  # plain tensors, no DTensor
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = a.model(ids).logits, b.model(ids).logits
    assert torch.allclose(la, lb, rtol=1e-4, atol=1e-5)


def test_fsdp_resume_same_world_size_is_bit_exact(cache_dir, fsdp_full, fsdp_split, tmp_path):
    d = copy_run(fsdp_split, tmp_path / "run")
    torchrun(cache_dir, d, *FSDP)
    assert logged(d) == logged(fsdp_full)


def test_fsdp_two_to_one_process(cache_dir, single, fsdp_split, tmp_path):
    d = copy_run(fsdp_split, tmp_path / "run")
    with pytest.warns(UserWarning, match="written by 2 process"):  # RNG streams re-seeded, named
        run(cache_dir, d)
    assert_after_split_equal(d, single)


def test_fsdp_to_ddp(cache_dir, single, fsdp_split, tmp_path):
    d = copy_run(fsdp_split, tmp_path / "run")
    torchrun(cache_dir, d, "train.parallel=ddp")
    assert_after_split_equal(d, single)


def test_one_process_to_fsdp(cache_dir, single, tmp_path):
    d = tmp_path / "run"
    run(cache_dir, d, f"train.stop_at={SPLIT}")
    out = torchrun(cache_dir, d, "train.parallel=fsdp")
    assert "written by 1 process(es), this run has 2" in out
    assert_after_split_equal(d, single)


def test_ddp_to_fsdp(cache_dir, single, tmp_path):
    d = tmp_path / "run"
    torchrun(cache_dir, d, f"train.stop_at={SPLIT}")
    torchrun(cache_dir, d, "train.parallel=fsdp")
    assert_after_split_equal(d, single)


def test_checkpoint_with_positional_optimizer_state_still_resumes(cache_dir, single, tmp_path, monkeypatch):
    """A train_state.pt written before the optimiser state was keyed by parameter name (the
    optimiser's own state_dict, no "optimizer_keys") resumes unsharded with the same losses, and
    an FSDP resume of it is refused naming train.parallel."""
    import moeut.train_lib.state as state_mod
    d = tmp_path / "run"
    with monkeypatch.context() as m:  # write the old layout
        m.setattr(state_mod, "full_optimizer_state", lambda model, opt: opt.state_dict())
        run(cache_dir, d, f"train.stop_at={SPLIT}")
    ckpt = Path(find_checkpoints(str(d))[-1]) / "train_state.pt"
    st = torch.load(ckpt, weights_only=False)
    assert isinstance(next(iter(st["optimizer"]["state"])), int)
    del st["optimizer_keys"]
    torch.save(st, ckpt)
    refused = copy_run(d, tmp_path / "refused")
    env_out = None
    try:
        torchrun(cache_dir, refused, "train.parallel=fsdp")
    except AssertionError as e:
        env_out = str(e)
    assert env_out is not None and "train.parallel" in env_out and "keyed by parameter position" in env_out
    run(cache_dir, d)
    assert_after_split_equal(d, single)


def test_fp16_with_fsdp_is_refused_and_bf16_reduces_in_fp32():
    with pytest.raises(ValueError, match="train.parallel=fsdp"):
        mixed_precision_policy(torch.float16)
    p = mixed_precision_policy(torch.bfloat16)
    assert p.param_dtype == torch.bfloat16 and p.reduce_dtype == torch.float32
    assert mixed_precision_policy(None).param_dtype is None
