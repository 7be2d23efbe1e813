"""End-to-end training on real text (CPU, preset `tiny`, vocab 512, T = 32): loss falls, exact
resume, SIGTERM checkpoint, corrupt-checkpoint fallback, DDP == single process, micro-batching,
wandb offline, no network, architecture mismatch."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from moeut.checkpoint import find_checkpoints, load_model
from moeut.train_lib.config import to_typed
from moeut.train_lib.loop import train
from moeut.train_lib.step import NonFiniteLossError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def tiny_cfg(cache_dir, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=cpu_tiny", "name=test", "print_config=false",
                                           f"data.cache_dir={cache_dir}", "train.log_interval=1",
                                           "logger.progress=none", "train.threads=1", *overrides])
    return to_typed(cfg)


def run(cache_dir, run_dir, *overrides):
    return train(tiny_cfg(cache_dir, *overrides), str(run_dir))


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_tiny_run_loss_falls_and_leaves_checkpoint(cache_dir, tmp_path):
    res = run(cache_dir, tmp_path, "train.steps=30")
    losses = res["losses"]
    assert len(losses) == 30 and all(map(lambda x: x == x, losses))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)  # ln(512) = 6.24 at init
    assert res["validation"]["validation/val/perplexity"] < 512
    recs = metrics(tmp_path)
    keys = set().union(*recs)
    for k in ("train/loss", "train/ce", "train/reg", "train/lr", "train/grad_norm", "train/tokens_per_s",
              "train/memory_mb", "validation/val/perplexity", "moe/g0/usage_rel_ppl", "moe/g0/dead_frac",
              "moe/g0/universal_score"):
        assert k in keys, k
    assert list((tmp_path / "routing").glob("moe_g0_usage_heatmap_step*.png"))
    # the checkpoint is what evaluation/analysis load
    loaded = load_model(str(tmp_path))
    assert loaded.meta["step"] == 30 and loaded.tokenizer is not None and loaded.config.vocab_size == 512
    assert (Path(loaded.path) / "train_state.pt").exists() and (Path(loaded.path) / "config.yaml").exists()
    assert (tmp_path / "tokenizer.model").exists()


# Wall-clock measurements differ between any two runs; everything else must be identical.
TIMING_KEYS = ("time", "train/tokens_per_s", "train/mfu", "train/memory_mb")


def logged(run_dir):
    """metrics.jsonl without the wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in metrics(run_dir)]


# The general case: dropout and expert dropout draw random numbers every step, the shuffled
# sampler, a log window (3), routing window (10, counts every 2nd step) and validation (every 4)
# that all straddle the interruption at step 5.
GENERAL = ("model.dropout=0.1", "model.expert_dropout=0.2", "data.sampler=shuffled", "train.log_interval=3",
           "train.val_interval=4")


def test_exact_resume(cache_dir, tmp_path):
    full = run(cache_dir, tmp_path / "full", "train.steps=12", *GENERAL)
    part = run(cache_dir, tmp_path / "split", "train.steps=12", "train.stop_at=5", *GENERAL)
    assert part["step"] == 5 and part["losses"] == full["losses"][:5]
    # as if written before two model options existed: the resume takes their defaults and says so
    cfg_file = next((tmp_path / "split" / "checkpoints").glob("step_*")) / "model_config.json"
    stored = json.loads(cfg_file.read_text())
    assert stored.pop("router_zloss") == 0.0 and stored.pop("bias_balance_rate") == 0.0
    cfg_file.write_text(json.dumps(stored))
    rest = run(cache_dir, tmp_path / "split", "train.steps=12", *GENERAL)
    assert ("predates model.bias_balance_rate, model.router_zloss; resuming with model.bias_balance_rate=0.0, "
            "model.router_zloss=0.0") in (tmp_path / "split" / "train.log").read_text()
    assert rest["step"] == 12 and len(rest["losses"]) == 7
    assert rest["losses"] == full["losses"][5:]  # bit-exact in fp32 on CPU
    want = logged(tmp_path / "full")
    assert {r["step"] for r in want if "moe/g0/usage_rel_ppl" in r} == {10}  # routing window spans the stop
    assert logged(tmp_path / "split") == want  # every logged value, exactly


def test_resume_after_crash_rewinds_metrics(cache_dir, tmp_path):
    """A crash after the step-3 checkpoint, with steps 4..6 already logged: the resume moves those
    records aside and logs them again, so metrics.jsonl equals an uninterrupted run's."""
    run(cache_dir, tmp_path / "full", "train.steps=8", *GENERAL)
    run(cache_dir, tmp_path / "crash", "train.steps=8", "train.stop_at=6", "train.save_interval=3",
        "train.keep_last=5", *GENERAL)
    import shutil
    shutil.rmtree(tmp_path / "crash" / "checkpoints" / "step_0000006")  # the crash came before this save
    run(cache_dir, tmp_path / "crash", "train.steps=8", *GENERAL)
    assert logged(tmp_path / "crash") == logged(tmp_path / "full")
    with open(tmp_path / "crash" / "metrics.rewound.jsonl") as f:
        assert sorted({json.loads(line)["step"] for line in f}) == [4, 6]  # train/ at 6, validation at 4


def test_fresh_start_in_used_run_dir_keeps_one_history(cache_dir, tmp_path):
    """train.resume=never over an old run: metrics.jsonl holds only the new history; the old
    records are moved to metrics.rewound.jsonl, not mixed in and not lost."""
    run(cache_dir, tmp_path / "a", "train.steps=3")
    old = metrics(tmp_path / "a")
    run(cache_dir, tmp_path / "a", "train.steps=3", "train.resume=never")
    run(cache_dir, tmp_path / "b", "train.steps=3")
    assert logged(tmp_path / "a") == logged(tmp_path / "b")
    with open(tmp_path / "a" / "metrics.rewound.jsonl") as f:
        assert [json.loads(line) for line in f] == old


def _messages(caplog):
    return [r.getMessage() for r in caplog.records]


def test_corrupt_newest_checkpoint_falls_back(cache_dir, tmp_path, caplog):
    caplog.set_level("INFO")
    run(cache_dir, tmp_path, "train.steps=12", "train.stop_at=4", "train.save_interval=2", "train.keep_last=5")
    ckpts = find_checkpoints(str(tmp_path))
    assert [os.path.basename(c) for c in ckpts] == ["step_0000002", "step_0000004"]
    model_pt = Path(ckpts[-1]) / "model.pt"
    data = model_pt.read_bytes()
    model_pt.write_bytes(data[: len(data) // 2])  # truncated write
    caplog.clear()
    res = run(cache_dir, tmp_path, "train.steps=12", "train.stop_at=6")
    msgs = _messages(caplog)
    # each fallback message once (log and console), naming the setting in effect (resume left at auto)
    assert sum("skipping unreadable checkpoint" in m and "step_0000004" in m for m in msgs) == 1, msgs
    assert sum("train.resume=auto (run dir " in m and "using " in m for m in msgs) == 1, msgs
    assert not any(f"train.resume={tmp_path}" in m for m in msgs), msgs
    assert len(res["losses"]) == 4  # resumed at step 2, ran steps 2..5


def test_resume_past_unreadable_checkpoint_sets_it_aside(cache_dir, tmp_path, caplog):
    """The new-user trial: checkpoints 4 and 6 (keep_last=2), 6's model.pt truncated; a resume
    to train.steps=5 falls back to 4 and saves 5. Step 6 belongs to the abandoned timeline: it is
    moved to checkpoints/unreadable/ unchanged (named in a warning), so rotation keeps the two
    valid checkpoints 4 and 5 (it used to delete 4 and keep the unreadable 6)."""
    from moeut.checkpoint import load_training_checkpoint
    caplog.set_level("INFO")
    run(cache_dir, tmp_path, "train.steps=12", "train.stop_at=6", "train.save_interval=2", "train.keep_last=2")
    model_pt = tmp_path / "checkpoints" / "step_0000006" / "model.pt"
    model_pt.write_bytes(model_pt.read_bytes()[:5000])
    cut = model_pt.read_bytes()
    caplog.clear()
    res = run(cache_dir, tmp_path, "train.steps=5", "train.save_interval=2", "train.keep_last=2")
    assert res["step"] == 5 and len(res["losses"]) == 1
    assert [os.path.basename(c) for c in find_checkpoints(str(tmp_path))] == ["step_0000004", "step_0000005"]
    for c in find_checkpoints(str(tmp_path)):
        load_training_checkpoint(c)  # both fully readable
    assert (tmp_path / "checkpoints" / "unreadable" / "step_0000006" / "model.pt").read_bytes() == cut
    moved = [m for m in _messages(caplog) if "moved checkpoint" in m and "step_0000006" in m]
    assert len(moved) == 1 and "newer than the resumed step 4" in moved[0], _messages(caplog)
    assert (tmp_path / "train.log").read_text().count("moved checkpoint") == 1  # in the run's log, once
    # a later resume never picks the set-aside checkpoint
    assert run(cache_dir, tmp_path, "train.steps=5")["step"] == 5


def test_resume_with_more_steps_warns_the_schedule_changes(cache_dir, tmp_path, caplog):
    """train.steps 6 -> 10 on resume re-spans the cosine: warned once with both values and the LR
    before/after at the resumed step (hand-computed from the closed form of SPEC 4.2)."""
    import math
    caplog.set_level("INFO")
    run(cache_dir, tmp_path, "train.steps=6", "train.stop_at=3")
    caplog.clear()
    tc = tiny_cfg(cache_dir, "train.steps=10", "train.stop_at=4")
    train(tc, str(tmp_path))
    lr, w, r = tc.optim.lr, tc.optim.warmup, tc.optim.min_lr_ratio
    assert tc.optim.schedule == "cosine" and w < 3
    def cos(S):
        return r * lr + (1 - r) * lr * (1 + math.cos(math.pi * (3 - w) / S)) / 2
    msgs = [m for m in _messages(caplog) if "train.steps: 6" in m]
    assert len(msgs) == 1 and "now 10" in msgs[0] and "re-computed over the new total" in msgs[0], _messages(caplog)
    assert f"from {cos(6):.4g} to {cos(10):.4g}" in msgs[0], (msgs[0], cos(6), cos(10))
    caplog.clear()
    train(tiny_cfg(cache_dir, "train.steps=10", "train.stop_at=5"), str(tmp_path))  # same total: no warning
    assert not any("train.steps: " in m and "re-computed" in m for m in _messages(caplog))


def test_resume_moves_a_cut_last_metrics_line_aside_saying_what_it_is(cache_dir, tmp_path, caplog):
    """A crash mid-write leaves a last line without newline: the resume moves it to
    metrics.rewound.jsonl and says it is a cut line (file:line), not "records of later steps"."""
    caplog.set_level("INFO")
    run(cache_dir, tmp_path, "train.steps=4", "train.stop_at=2")
    path = tmp_path / "metrics.jsonl"
    n_lines = len(path.read_text().splitlines())
    with open(path, "a") as f:
        f.write('{"step": 3, "train/lo')
    caplog.clear()
    run(cache_dir, tmp_path, "train.steps=4")
    assert (tmp_path / "metrics.rewound.jsonl").read_text() == '{"step": 3, "train/lo\n'
    msgs = _messages(caplog)
    assert any(f"metrics.jsonl:{n_lines + 1}:" in m and "cut short by a crash" in m for m in msgs), msgs
    assert not any("records of later steps" in m for m in msgs), msgs


def test_short_stream_warnings_name_the_limit_of_each_stream(cache_dir, tmp_path, caplog):
    """An explicit data.train_tokens above what the corpus holds is named as data.train_tokens, never
    as data.valid_tokens; a short validation set names data.valid_tokens. The default budget's
    100-step margin ((train.steps+100)*batch*seq_len) is not warned about: only real repetition is
    (steps per epoch < train.steps)."""
    import warnings
    caplog.set_level("INFO")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        run(cache_dir, tmp_path / "a", "train.steps=4", "train.stop_at=1", "data.train_tokens=1000000000",
            "data.valid_tokens=100000000", "train.final_eval=false", "train.val_interval=100000")
    short = [str(x.message) for x in w if "fewer than the" in str(x.message)]
    assert any("(data.train_tokens)" in m and "data.valid_tokens" not in m for m in short), short
    assert any("(data.valid_tokens, validation set 'val')" in m for m in short), short
    caplog.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        run(cache_dir, tmp_path / "b", "train.steps=100000", "train.stop_at=1",
            "train.final_eval=false", "train.val_interval=100000")
    assert not [str(x.message) for x in w if "fewer than the" in str(x.message)]
    assert any("data will repeat" in m for m in _messages(caplog)), _messages(caplog)


def test_rewind_refuses_a_damaged_middle_line(tmp_path):
    """rewind_metrics follows moeut.rundir's policy on its own too: a damaged line that is not the
    cut last line raises naming metrics.jsonl:LINE, and nothing is written."""
    from moeut.rundir import CorruptRunFile
    from moeut.train_lib.logging import rewind_metrics
    lines = [json.dumps({"step": s}) + "\n" for s in range(1, 6)]
    lines[2] = '{"step": 3, "tr\n'
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    with pytest.raises(CorruptRunFile, match=r"metrics\.jsonl:3: .*repair or delete this line"):
        rewind_metrics(str(tmp_path), 1)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines)
    assert not (tmp_path / "metrics.rewound.jsonl").exists()


def test_other_architecture_checkpoint_names_keys(cache_dir, tmp_path):
    run(cache_dir, tmp_path, "train.steps=3")
    with pytest.raises(ValueError, match=r"does not match the model architecture: .*(missing|unexpected|shape)"):
        run(cache_dir, tmp_path, "train.steps=6", "model.group_size=4", "model.att_n_experts=2")


def test_micro_batching_matches_full_batch(cache_dir, tmp_path):
    a = run(cache_dir, tmp_path / "a", "train.steps=4")
    b = run(cache_dir, tmp_path / "b", "train.steps=4", "train.micro_batch_size=2")
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-5)


def test_nonfinite_loss_aborts(cache_dir, tmp_path):
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses or gradients in a row"):
        run(cache_dir, tmp_path, "train.steps=10", "optim.lr=1e30", "optim.grad_clip=null", "train.max_nonfinite=3")


def test_nonfinite_gradients_with_a_finite_loss_stop_the_run(cache_dir, tmp_path, monkeypatch):
    """inf gradients with a finite loss (a backward hook from the second step on) are skipped like a
    non-finite loss: logged in train.log, counted, and train.max_nonfinite in a row stop the run."""
    import moeut.train_lib.loop as loop_mod
    real_step = loop_mod.train_step

    def step(state, *a, **k):
        if state.step == 1:
            state.model.lm_head.weight.register_hook(lambda g: g * float("inf"))
        return real_step(state, *a, **k)
    monkeypatch.setattr(loop_mod, "train_step", step)
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses or gradients in a row"):
        run(cache_dir, tmp_path, "train.steps=10", "train.max_nonfinite=3")
    log = (tmp_path / "train.log").read_text()
    assert log.count("non-finite gradients") == 3 and "weights and optimiser state unchanged" in log
    assert [r["train/loss"] for r in metrics(tmp_path) if "train/loss" in r][:1]  # step 1 was logged


def test_wandb_offline_writes_files(cache_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    res = run(cache_dir, tmp_path, "train.steps=3", "logger.wandb=offline")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(runs[0].glob("*.wandb"))
    meta = json.loads((Path(res["checkpoint"]) / "meta.json").read_text())
    assert meta["wandb_id"] and meta["wandb_id"] in runs[0].name


def _subprocess_env(cache_dir):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MOEUT_DATA", None)
    return env


def torchrun(args, env, timeout):
    """`python -m torch.distributed.run --standalone --nproc_per_node=2 *args` from the repository root.
    On timeout torchrun gets SIGTERM, which it passes to every rank's process group, so no hung rank
    outlives the test; the test then fails with the output so far."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"torchrun timed out after {timeout} s: {' '.join(args)}\n{out[-3000:]}{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _cli(cache_dir, run_dir, *overrides):
    return ["experiment=cpu_tiny", f"data.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", "print_config=false",
            "logger.progress=lines", "train.threads=1", *overrides]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_sigterm_saves_valid_checkpoint_offline(cache_dir, tmp_path, sig):
    """SIGTERM (pre-emption) or SIGINT (Ctrl-C) mid-run: the step finishes, a checkpoint is written
    and the process exits 0; the run is offline (HF_DATASETS_OFFLINE=1) and reads only the corpus
    carried in data/."""
    run(cache_dir, tmp_path / "warm", "train.steps=2")  # tokenizer + shards cached for the subprocess
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *_cli(cache_dir, run_dir, "train.steps=100000",
                                                                  "train.log_interval=1")],
                            cwd=REPO, env=_subprocess_env(cache_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 120
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[step 3]"):
            proc.send_signal(getattr(signal, sig))
            break
        assert time.time() < deadline, "".join(lines)
    out, _ = proc.communicate(timeout=120)
    lines.append(out)
    assert proc.returncode == 0, "".join(lines)
    ckpt = find_checkpoints(str(run_dir))[-1]
    loaded = load_model(ckpt)
    step = loaded.meta["step"]
    assert 3 <= step < 100000
    state = torch.load(Path(ckpt) / "train_state.pt", weights_only=False)
    assert state["step"] == step and state["sampler"]["position"] == step
    assert f"signal received ({sig})" in "".join(lines) and "Traceback" not in "".join(lines)


def test_ddp_two_processes_equal_one_process(cache_dir, tmp_path):
    """torchrun with 2 gloo processes x 4 sequences == 1 process x 8 sequences (same global batch)."""
    single = run(cache_dir, tmp_path / "single", "train.steps=4")
    run_dir = tmp_path / "ddp"
    p = torchrun(["train.py", *_cli(cache_dir, run_dir, "train.steps=4", "train.log_interval=1")],
                 _subprocess_env(cache_dir), timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ddp_losses = [r["train/loss"] for r in metrics(run_dir) if "train/loss" in r]
    assert ddp_losses == pytest.approx(single["losses"], rel=1e-5)
    assert len(find_checkpoints(str(run_dir))) == 1  # only rank 0 writes


@pytest.mark.skipif(not hasattr(os, "sched_setscheduler"), reason="needs Linux scheduling policies")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_run_ends_when_gloo_workers_are_starved(cache_dir, tmp_path, parallel):
    """The end of a 2-process gloo run whose gloo worker threads run only while the main thread
    blocks (tests/e2e/starved_gloo_train.py): freeing DDP after destroy_process_group hung there
    every time; the run must exit 0, three times in a row, under DDP and FSDP2
    (docs/architecture.md, "Process-group teardown")."""
    run(cache_dir, tmp_path / "warm", "train.steps=2")  # tokenizer + shards of this budget for the subprocesses
    for i in range(3):
        run_dir = tmp_path / f"run{i}"
        p = torchrun(["tests/e2e/starved_gloo_train.py",
                      *_cli(cache_dir, run_dir, "train.steps=2", f"train.parallel={parallel}")],
                     _subprocess_env(cache_dir), timeout=150)
        assert p.returncode == 0, f"run {i}: " + p.stdout[-3000:] + p.stderr[-3000:]
        assert "terminate called" not in p.stderr
        assert len(find_checkpoints(str(run_dir))) == 1


def test_ddp_interrupted_run_logs_what_uninterrupted_logs(cache_dir, tmp_path):
    """Issue 14.1: 2 gloo processes with dropout, expert dropout and the shuffled sampler. Each
    rank draws its own dropout masks; the checkpoint keeps every rank's RNG streams and routing
    accumulators, so stop at 4 + resume logs exactly the uninterrupted run's metrics."""
    run(cache_dir, tmp_path / "warm", "train.steps=8")  # tokenizer + shards of this budget for the subprocesses
    common = ("train.steps=8", "model.dropout=0.1", "model.expert_dropout=0.2", "data.sampler=shuffled",
              "train.log_interval=3", "train.routing_interval=6", "train.val_interval=4")

    def ddp_run(run_dir, *extra):
        p = torchrun(["train.py", *_cli(cache_dir, run_dir, *common, *extra)], _subprocess_env(cache_dir),
                     timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    ddp_run(tmp_path / "full")
    ddp_run(tmp_path / "split", "train.stop_at=4")
    state = torch.load(find_checkpoints(str(tmp_path / "split"))[-1] + "/train_state.pt", weights_only=False)
    assert len(state["ranks"]) == 2  # one RNG state per rank
    assert not torch.equal(state["ranks"][0]["rng"]["torch"], state["ranks"][1]["rng"]["torch"])
    ddp_run(tmp_path / "split")
    want = logged(tmp_path / "full")
    assert [r["step"] for r in want if "train/loss" in r] == [3, 6, 8]
    assert logged(tmp_path / "split") == want


def test_activation_checkpointing_gives_same_losses(cache_dir, tmp_path):
    import warnings
    a = run(cache_dir, tmp_path / "a", "train.steps=3")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = run(cache_dir, tmp_path / "b", "train.steps=3", "train.activation_checkpointing=true")
    # the option took effect through the model's own set_activation_checkpointing (not ignored)
    assert not [str(w.message) for w in caught if "train.activation_checkpointing" in str(w.message)]
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-6)


# ------------------------------------------------------------------------------------------
# Issue 18.1: a refused start leaves the run directory byte-for-byte as it was
# ------------------------------------------------------------------------------------------

def _tree(root):
    """{relative path: sha256} of every file, plus every directory (as None)."""
    import hashlib
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    return out


@pytest.fixture(scope="module")
def finished_run(cache_dir, tmp_path_factory):
    """A run made by the CLI (so it has .hydra/ and train.log), and another 512-piece tokenizer."""
    base = tmp_path_factory.mktemp("refuse")
    run(cache_dir, base / "warm", "train.steps=2")  # tokenizer + shards cached for the subprocess
    run_dir = base / "run"
    p = subprocess.run([sys.executable, "train.py", *_cli(cache_dir, run_dir, "train.steps=6", "train.stop_at=3",
                                                           "train.log_interval=1")],
                       cwd=REPO, env=_subprocess_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    import gzip
    from moeut.data.tokenizer import train_tokenizer
    from conftest import C4
    with gzip.open(C4 / "valid.jsonl.gz", "rt") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(300), f)]
    other = train_tokenizer(texts[::-1][:150], 512, hard_vocab_limit=False)
    other_path = base / "other_512.model"
    other.save(other_path)
    return run_dir, other_path


def test_cli_run_writes_train_log_and_hydra_files(finished_run):
    run_dir, _ = finished_run
    log = (run_dir / "train.log").read_text()
    assert "[step 3]" in log and "[ckpt] saved" in log and "parameters" in log  # incl. the start's messages
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "train.stop_at=3" in overrides and (run_dir / ".hydra" / "config.yaml").exists()
    assert (run_dir / ".hydra" / "hydra.yaml").exists()


REFUSALS = {
    # the run's tokenizer has 512 pieces (resume=never: even a fresh start may not replace it)
    "vocab_vs_tokenizer": (["model.vocab_size=1024", "data.vocab_size=1024", "train.resume=never"],
                           r"data.vocab_size is 1024 but the tokenizer .*tokenizer.model has 512 pieces"),
    "vocab_vs_checkpoint": (["model.vocab_size=1024", "data.vocab_size=1024"],
                            r"shape mismatches embedding.weight: checkpoint \(512, 64\)"),
    # issue 18.1's case: a tokenizer that is not the run's (was copied over R/tokenizer.model)
    "other_tokenizer": (["data.tokenizer_path={other}"], r"data.tokenizer_path: the tokenizer .* differs from the run's"),
    # the changed options are named first, then the key-by-key shape mismatch
    "model_vs_checkpoint": (["model.group_size=4", "model.att_n_experts=2"],
                            r"different model config: model.att_n_experts=.*model.group_size=.*"
                            r"does not match the model architecture"),
    "model_config_vs_checkpoint": (["model.dropout=0.1"], r"different model config: model.dropout=0.0"),
    "bad_option": (["train.batch_size=0"], r"train.batch_size: must be >= 1, got 0"),
    "bad_choice": (["train.precision=fp8"], r"train.precision: 'fp8' is not one of"),
    # every checkpoint unreadable: starting over would replace the run
    "all_checkpoints_corrupt": ([], r"no valid checkpoint in .*none readable.*train\.resume="),
    # a damaged middle line of metrics.jsonl (moeut.rundir's policy): not moved aside as "later steps"
    "metrics_middle_line_corrupt": ([], r"metrics\.jsonl:3: not valid JSON .*repair or delete this line"),
}


@pytest.mark.parametrize("kind", sorted(REFUSALS))
def test_refused_start_leaves_run_dir_untouched(cache_dir, finished_run, tmp_path, kind):
    import shutil
    src, other = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    if kind == "all_checkpoints_corrupt":
        for model_pt in run_dir.glob("checkpoints/step_*/model.pt"):
            model_pt.write_bytes(model_pt.read_bytes()[:100])
    if kind == "metrics_middle_line_corrupt":
        lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
        lines[2] = lines[2][: len(lines[2]) // 2] + "\n"
        (run_dir / "metrics.jsonl").write_text("".join(lines))
    before = _tree(run_dir)
    overrides, message = REFUSALS[kind]
    overrides = [o.format(other=other) for o in overrides]
    p = subprocess.run([sys.executable, "train.py", *_cli(cache_dir, run_dir, "train.steps=6", *overrides)],
                       cwd=REPO, env=_subprocess_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    import re
    assert re.search(message, p.stdout + p.stderr), p.stdout[-2000:] + p.stderr[-2000:]
    assert _tree(run_dir) == before  # no file written, changed, added or removed
    if kind == "other_tokenizer":  # and the plain resume still works afterwards
        res = run(cache_dir, run_dir, "train.steps=6")
        assert res["step"] == 6 and len(res["losses"]) == 3


@pytest.mark.parametrize("override", ["train.batch_size=0", "model.att_n_experts=0"])
def test_refused_start_into_a_new_run_dir_leaves_nothing(cache_dir, tmp_path, override):
    """Hydra creates the run dir before train.py runs: a refused start removes that empty folder."""
    run_dir = tmp_path / "new_run"
    p = subprocess.run([sys.executable, "train.py", *_cli(cache_dir, run_dir, "train.steps=2", override)],
                       cwd=REPO, env=_subprocess_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert override.split("=")[0] in p.stdout + p.stderr, p.stderr[-2000:]
    assert not run_dir.exists(), sorted(str(x) for x in run_dir.rglob("*"))
