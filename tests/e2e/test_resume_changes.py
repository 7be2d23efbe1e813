"""A resume with changed options runs what it records and says what changed; a start with
nothing to do writes nothing (CPU, preset `tiny` on the C4 sample, a few steps).

References: an uninterrupted run whose optimiser hyperparameters are switched by hand at the
resume step (bit-exact in fp32 on CPU), the closed-form LR schedule, the run dir's sha256 tree."""
import hashlib
import json
from pathlib import Path

import pytest
import torch

from moeut.train_lib import loop
from moeut.train_lib.loop import train
from moeut.train_lib.schedule import lr_at
from moeut.train_lib.start import resume_config_changes
from test_train import tiny_cfg



@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def run(cache_dir, run_dir, *overrides, run_files=None):
    return train(tiny_cfg(cache_dir, *overrides), str(run_dir), run_files=run_files)


def log_lines(run_dir, marker):
    """The train.log messages (after the level prefix) that start with `marker`."""
    out = []
    for line in (Path(run_dir) / "train.log").read_text().splitlines():
        i = line.find(marker)
        if i >= 0:
            out.append(line[i:])
    return out


def tree(root):
    """{relative path: sha256} of every file, plus every directory (as None)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(Path(root).rglob("*"))}


NEW_OPTIM = ("optim.betas=[0.5,0.6]", "optim.eps=1e-3", "optim.weight_decay=0.5")


def test_resume_applies_changed_optimiser_hyperparameters(cache_dir, tmp_path, monkeypatch):
    """optim.betas / eps / weight_decay changed on resume: one warning each naming the option and
    both values, the new values in the optimiser, and the resumed losses equal an uninterrupted run
    whose param groups were switched to the new values by hand at the resume step."""
    run(cache_dir, tmp_path / "split", "train.steps=6", "train.stop_at=3")
    rest = run(cache_dir, tmp_path / "split", "train.steps=6", *NEW_OPTIM)
    tail = "(the new value applies from the resumed step)"
    assert log_lines(tmp_path / "split", "[optim] WARNING") == [
        f"[optim] WARNING: optim.betas: the checkpoint's optimiser was trained with [0.9, 0.999], now [0.5, 0.6] {tail}",
        f"[optim] WARNING: optim.eps: the checkpoint's optimiser was trained with 1e-08, now 0.001 {tail}",
        f"[optim] WARNING: optim.weight_decay: the checkpoint's optimiser was trained with 0.01, now 0.5 {tail}"]
    # said once (their own warning), not again as "[resume]" lines
    assert log_lines(tmp_path / "split", "[resume]") == []
    saved = torch.load(tmp_path / "split" / "checkpoints" / "step_0000006" / "train_state.pt", weights_only=False)
    (group,) = saved["optimizer"]["param_groups"]
    assert list(group["betas"]) == [0.5, 0.6] and group["eps"] == 1e-3 and group["weight_decay"] == 0.5

    # reference: no checkpoint, no load_state_dict; the param groups switched in place before step 4
    real_step = loop.train_step

    def switching_step(state, *a, **k):
        if state.step == 3:
            for g in state.optimizer.param_groups:
                g.update(betas=(0.5, 0.6), eps=1e-3, weight_decay=0.5)
        return real_step(state, *a, **k)
    monkeypatch.setattr(loop, "train_step", switching_step)
    ref = run(cache_dir, tmp_path / "ref", "train.steps=6")
    monkeypatch.setattr(loop, "train_step", real_step)
    plain = run(cache_dir, tmp_path / "plain", "train.steps=6")
    assert rest["losses"] == ref["losses"][3:]  # bit-exact in fp32 on CPU
    assert plain["losses"][4:] != ref["losses"][4:]  # the checkpoint's old values would give other losses


def test_resume_says_each_changed_training_option_once(cache_dir, tmp_path):
    """optim.lr, optim.grad_clip, optim.min_lr_ratio changed: one "[resume]" line each with both
    values, the new LR in effect (closed form, SPEC 4.2); cadence-only options (log, save, val
    intervals) and options with their own message (train.steps) get no "[resume]" line."""
    run(cache_dir, tmp_path, "train.steps=6", "train.stop_at=3")
    run(cache_dir, tmp_path, "train.steps=8", "train.stop_at=5", "train.log_interval=2", "train.save_interval=7",
        "train.val_interval=9", "train.keep_last=4", "optim.lr=1e-3", "optim.grad_clip=0.5", "optim.min_lr_ratio=0.2")
    assert log_lines(tmp_path, "[resume]") == [
        "[resume] optim.grad_clip: the checkpoint's run used 0.25, now 0.5",
        "[resume] optim.lr: the checkpoint's run used 0.003, now 0.001",
        "[resume] optim.min_lr_ratio: the checkpoint's run used 0.1, now 0.2"]
    assert len(log_lines(tmp_path, "[train] WARNING train.steps: 6")) == 1  # its own warning, once
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lr4 = [r["train/lr"] for r in recs if r.get("step") == 4 and "train/lr" in r]
    assert lr4 == [lr_at(3, 1e-3, 2, 8, 0.2, "cosine")]  # step 4's LR is set for optimiser step 3
    # the same options again: nothing changed since the step-5 checkpoint, nothing said
    run(cache_dir, tmp_path, "train.steps=8", "train.log_interval=2", "train.save_interval=7",
        "train.val_interval=9", "train.keep_last=4", "optim.lr=1e-3", "optim.grad_clip=0.5", "optim.min_lr_ratio=0.2")
    assert len(log_lines(tmp_path, "[resume]")) == 3


def test_resume_config_changes_policy():
    """Hand-built configs: a changed option, a removed one, one the checkpoint predates (at its
    default: nothing; set: said), cadence-only and own-message options left out."""
    stored = {"optim": {"lr": 0.003, "betas": [0.9, 0.999], "schedule": "cosine"},
              "train": {"batch_size": 8, "log_interval": 5, "steps": 30, "old_option": 1},
              "logger": {"progress": "auto"}, "model": {"d_model": 64}}
    now = {"optim": {"lr": 0.001, "betas": [0.5, 0.6], "schedule": "cosine"},
           "train": {"batch_size": 16, "log_interval": 1, "steps": 60, "aux_loss_scope": "step",
                     "final_eval": False, "precision": "bf16"},
           "logger": {"progress": "none"}, "model": {"d_model": 128}}
    assert resume_config_changes(stored, now) == [
        "[resume] optim.lr: the checkpoint's run used 0.003, now 0.001",
        "[resume] train.batch_size: the checkpoint's run used 8, now 16",
        "[resume] train.old_option: the checkpoint's run used 1; not an option now",
        "[resume] train.precision: the checkpoint's run predates this option, now bf16"]


def test_nothing_to_do_start_writes_nothing(cache_dir, tmp_path, caplog):
    """A start at train.steps (and one at train.stop_at) with other options: "nothing to do" on the
    console, and the run dir byte-for-byte as it was (.hydra/ files, train.log, provenance)."""
    caplog.set_level("INFO")
    files = {".hydra/overrides.yaml": "- train.steps=4\n", ".hydra/config.yaml": "train:\n  batch_size: 8\n"}
    run(cache_dir, tmp_path, "train.steps=4", "train.stop_at=2", run_files=files)
    before = tree(tmp_path)
    other = {".hydra/overrides.yaml": "- train.batch_size=16\n", ".hydra/config.yaml": "train:\n  batch_size: 16\n"}
    caplog.clear()
    res = run(cache_dir, tmp_path, "train.steps=4", "train.stop_at=2", "optim.lr=1e-3", run_files=other)
    assert res["step"] == 2 and res["losses"] == [] and res["checkpoint"] is None
    assert tree(tmp_path) == before
    assert any("nothing to do: the run is at step 2" in r.getMessage() and "nothing written" in r.getMessage()
               for r in caplog.records)
    run(cache_dir, tmp_path, "train.steps=4", run_files=files)  # finishes the run
    before = tree(tmp_path)
    res = run(cache_dir, tmp_path, "train.steps=4", "train.batch_size=16", run_files=other)
    assert res["step"] == 4 and res["losses"] == []
    assert tree(tmp_path) == before
    assert (tmp_path / ".hydra" / "overrides.yaml").read_text() == files[".hydra/overrides.yaml"]


def test_reapply_sets_every_restored_param_group_key_once_per_option():
    """Two param groups (router, other) restored from a state with other betas, router warm-up and
    amsgrad: every configured value is set again, one warning per option (not per group), naming
    optim.betas, optim.groups.router.warmup and amsgrad (no option: the code's value); lr is left
    to the schedule."""
    from moeut.train_lib.optim import reapply_group_settings
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))

    def make(betas, warmup, amsgrad, lr):
        return torch.optim.AdamW([{"params": [a], "name": "router", "lr_mult": 1.0, "warmup": warmup},
                                  {"params": [b], "name": "other", "lr_mult": 1.0, "warmup": 0}],
                                 lr=lr, betas=betas, amsgrad=amsgrad)
    saved = make((0.9, 0.999), 10, True, 0.5).state_dict()
    opt = make((0.5, 0.6), 0, False, 0.1)
    configured = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    opt.load_state_dict(saved)
    said = []
    reapply_group_settings(opt, configured, said.append)
    tail = "(the new value applies from the resumed step)"
    assert said == [  # in the order of the group's keys
        f"optim.groups.router.warmup: the checkpoint's optimiser was trained with 10, now 0 {tail}",
        f"optim.betas: the checkpoint's optimiser was trained with [0.9, 0.999], now [0.5, 0.6] {tail}",
        f"AdamW amsgrad (set by the code, not an option): the checkpoint's optimiser was trained with True, "
        f"now False {tail}"]
    for g, cfg in zip(opt.param_groups, configured):
        assert {k: v for k, v in g.items() if k not in ("params", "lr")} == {k: v for k, v in cfg.items() if k != "lr"}
        assert g["lr"] == 0.5  # the checkpoint's; train_step sets the schedule's before every step


@pytest.mark.slow
def test_nothing_to_do_under_two_processes_writes_nothing(cache_dir, tmp_path):
    """The same command again under torchrun (2 gloo processes, through train.py): every rank
    takes the no-op path, the processes exit 0 and the run dir's sha256 tree is unchanged."""
    from test_train import _cli, _subprocess_env, torchrun
    run(cache_dir, tmp_path / "warm", "train.steps=2")  # tokenizer + shards of this budget for the subprocesses
    run_dir = tmp_path / "ddp"
    args = ["train.py", *_cli(cache_dir, run_dir, "train.steps=2")]
    p = torchrun(args, _subprocess_env(cache_dir), timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    before = tree(run_dir)
    p = torchrun(args + ["optim.lr=1e-3"], _subprocess_env(cache_dir), timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "nothing to do: the run is at step 2" in p.stdout + p.stderr
    assert tree(run_dir) == before
