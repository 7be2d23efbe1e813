"""Bad input or a missing environment found before the work is one line `<tool>: error: ...`, exit
1, nothing written; warnings are one line `<tool>: warning: ...`; a refused
resume prints its error line without the config dump (docs/architecture.md, "Errors").

Each case runs the real command line in a subprocess and checks its exact stderr lines, exit code
and that nothing was written. Runs offline and without ../shared (the embedded C4 sample only).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from moeut import cli

REPO = Path(__file__).resolve().parents[2]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "C4_MIRROR",
                        "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HYDRA_FULL_ERROR")}
    env.update(PYTHONPATH=str(REPO), MPLBACKEND="Agg", WANDB_MODE="disabled", OMP_NUM_THREADS="1", **extra)
    return env


def _run(args, cwd, timeout=300, **env):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def _lines(text):
    return [ln for ln in text.splitlines() if ln.strip()]


# ------------------------------------------------------------------------------------------
# Warnings: one line naming the tool
# ------------------------------------------------------------------------------------------

def test_warning_line_format():
    own = str(REPO / "moeut" / "analysis" / "collect.py")
    assert cli.warning_line("moeut.analysis routing", "seq_len: null ...", UserWarning, own, 12) == \
        "moeut.analysis routing: warning: seq_len: null ...\n"
    assert cli.warning_line("train.py", "x", DeprecationWarning, str(REPO / "train.py"), 3) == \
        "train.py: warning: DeprecationWarning: x\n"
    other = str(Path(torch.__file__))
    assert cli.warning_line("train.py", "y", UserWarning, other, 7) == f"train.py: warning: UserWarning: y ({other}:7)\n"


def test_install_warning_format_sets_the_one_formatter():
    import logging
    old = warnings.formatwarning
    try:
        cli.install_warning_format("mytool")
        own = str(REPO / "moeut" / "cli.py")
        assert warnings.formatwarning("data.x: something", UserWarning, own, 5) == "mytool: warning: data.x: something\n"
        # logging.captureWarnings (train.py) logs the same line, without a blank line after it
        rec = logging.LogRecord("py.warnings", logging.WARNING, own, 5, "%s", ("mytool: warning: m\n",), None)
        assert logging.getLogger("py.warnings").filter(rec) and rec.getMessage() == "mytool: warning: m"
        # and through logging.captureWarnings itself (which passes the text as the record's msg)
        import io
        buf = io.StringIO()
        handler = logging.StreamHandler(buf)
        logging.getLogger("py.warnings").addHandler(handler)
        logging.captureWarnings(True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                logging.captureWarnings(True)  # catch_warnings restored showwarning: capture again inside it
                warnings.warn_explicit("data.y: short", UserWarning, own, 6)
        finally:
            logging.captureWarnings(False)
            logging.getLogger("py.warnings").removeHandler(handler)
        assert buf.getvalue() == "mytool: warning: data.y: short\n"
    finally:
        warnings.formatwarning = old


def test_routing_analysis_prints_its_warning_as_one_line(tmp_path):
    """A project warning of a tool (moeut.analysis routing: no saved training config, so seq_len falls
    back) is one line `moeut.analysis routing: warning: <message>`, no source path and no `UserWarning:`."""
    import random

    from moeut.checkpoint import save_checkpoint
    from moeut.data.tokenizer import train_tokenizer
    from moeut.registry import build_model, get_preset
    words = "the cat dog bird sat ran over under a mat tree house river red green small big old".split()
    rng = random.Random(0)
    text = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(60)]
    tok = train_tokenizer(text, vocab_size=120, hard_vocab_limit=False)
    torch.manual_seed(0)
    cfg = get_preset("tiny", vocab_size=tok.vocab_size)
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, build_model(cfg), cfg, tokenizer=tok)
    (tmp_path / "valid.txt").write_text("\n\n".join(text))
    r = _run(["-m", "moeut.analysis", "routing", f"checkpoint={tmp_path / 'run'}", f"data.path={tmp_path / 'valid.txt'}",
              "max_tokens=2048", "batch_size=2", "device=cpu", "report=false", "figures.formats=[png]",
              "figures.dpi=20"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    warned = [ln for ln in r.stderr.splitlines() if "warning" in ln.lower()]
    assert warned == [f"moeut.analysis routing: warning: seq_len: null, but the run {tmp_path / 'run'} has no saved training "
                      f"config with data.seq_len; analysing at seq_len=1024 (pass seq_len=<T> to choose)"], r.stderr


# ------------------------------------------------------------------------------------------
# Data: bad data, an unreachable hub
# ------------------------------------------------------------------------------------------

def test_prepare_data_bad_json_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello world"}\nnot json\n')
    r = _run(["-m", "moeut.prepare_data", "data=local", f"data.path={bad}", f"data.valid_path={bad}",
              f"data.cache_dir={tmp_path / 'cache'}", "prepare.workers=0"], tmp_path)
    assert r.returncode == 1
    assert _lines(r.stderr) == [f"moeut.prepare_data: error: DataError: {bad}:2: not valid JSON (Expecting value)"]
    assert not (tmp_path / "cache").exists()


def test_tokenizer_training_raises_the_readers_error():
    """SentencePiece wraps an error of the sentence iterator in a RuntimeError; the reader's own
    error (naming file:line) is what comes out."""
    from moeut.data.sources import DataError
    from moeut.data.tokenizer import train_tokenizer

    def texts():
        yield "a first document"
        raise DataError("f.jsonl:2: not valid JSON (Expecting value)")
    with pytest.raises(DataError, match=r"^f\.jsonl:2: not valid JSON"):
        train_tokenizer(texts(), vocab_size=50, hard_vocab_limit=False)


def test_hub_unreachable_check(monkeypatch):
    from moeut.data.sources import hub_unreachable
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.delenv("ALL_PROXY", raising=False)
    monkeypatch.delenv("all_proxy", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 2606)
    assert hub_unreachable().startswith("hub.invalid: ")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # the proxy resolves names
    assert hub_unreachable() is None


def test_hub_connection_error_names_the_file(monkeypatch):
    """The hub answered the look-up but the download failed: still one DataError naming the file."""
    datasets = pytest.importorskip("datasets")
    from moeut.data import sources
    monkeypatch.setattr(sources, "hub_unreachable", lambda timeout=10.0: None)

    def load_dataset(*a, **k):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    ref = sources.FileRef("en/c4-train.00000-of-01024.json.gz", hub_repo="allenai/c4", revision="abc")
    with pytest.raises(sources.DataError, match=r"^hf://allenai/c4@abc/en/c4-train.00000-of-01024.json.gz: cannot "
                                                r"stream from the Hugging Face hub, unreachable \(Couldn't reach"):
        list(sources.read_documents(ref))


def test_train_from_an_unreachable_hub_fails_at_once(tmp_path):
    """`python train.py data=c4` without network (here: a hub host that never resolves): one line
    naming the hub file and the local-mirror option, within seconds, no run dir."""
    t0 = time.time()
    r = _run(["train.py", "data=c4", f"hydra.run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"],
             REPO, HF_ENDPOINT="https://hub.invalid")
    assert r.returncode == 1, r.stderr[-3000:]
    err = _lines(r.stderr)
    assert len(err) == 1 and err[0].startswith(
        "train.py: error: DataError: hf://allenai/c4@1ddc917116b730e1859edef32896ec5c16be51d0/en/"
        "c4-train.00000-of-01024.json.gz: cannot stream from the Hugging Face hub, unreachable (hub.invalid: "), err
    assert err[0].endswith("point data.path at a local mirror (docs/training.md, \"Data\")")
    assert time.time() - t0 < 120
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------
# Devices and launchers that are not there
# ------------------------------------------------------------------------------------------

def test_named_device():
    from moeut.eval.harness_cli import named_device
    assert named_device(["run", "--model", "moeut", "--device", "cuda"]) == "cuda"
    assert named_device(["run", "--device=cuda:1"]) == "cuda:1"
    assert named_device(["run", "--model_args", "checkpoint=x,device=cuda"]) == "cuda"
    assert named_device(["run", "--model_args=checkpoint=x,device=cpu", "--device", "cuda"]) == "cuda"
    assert named_device(["run", "--model_args", "checkpoint=x"]) is None


@NO_GPU
def test_harness_cli_cuda_without_gpu(tmp_path):
    t0 = time.time()
    r = _run(["-m", "moeut.eval.harness_cli", "run", "--model", "moeut", "--model_args", "checkpoint=runs/x",
              "--tasks", "lambada_openai", "--device", "cuda"], tmp_path)
    assert r.returncode == 1
    assert _lines(r.stderr) == ["moeut.eval.harness_cli: error: --device cuda: torch sees no CUDA GPU on this "
                                "machine; use --device cpu (or leave --device out: the wrapper then picks cpu)"]
    assert time.time() - t0 < 60  # before lm-eval is imported and the model loaded
    assert list(tmp_path.iterdir()) == []


@NO_GPU
def test_kernels_warmup_without_gpu(tmp_path):
    r = _run(["-m", "moeut.tools.warmup"], tmp_path, TRITON_CACHE_DIR=str(tmp_path / "triton"))
    assert r.returncode == 1 and r.stdout == ""
    assert _lines(r.stderr) == [
        "moeut.tools.warmup: error: device: cuda requested but CUDA is not available: nothing to "
        "compile or autotune (the Triton kernels run on GPUs only); device=cpu runs a dry run of the PyTorch "
        "implementation, which compiles nothing"]
    assert list(tmp_path.iterdir()) == []


def test_kernels_warmup_cpu_dry_run_is_announced(capsys, monkeypatch):
    from moeut.tools import warmup
    monkeypatch.setenv("MOEUT_CVMM_BACKEND", "grouped_mm")
    warmup.run(warmup.WarmupOptions(preset="golden_tiny", dtype="fp32", batch=1, seq_len=8, steps=1, decode=False,
                                    device="cpu"))
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[warmup] device=cpu: a dry run of the PyTorch implementation; nothing is compiled or cached"


def test_sweep_launch_without_slurm(tmp_path):
    bare = tmp_path / "bin"
    bare.mkdir()
    path = os.pathsep.join([str(Path(sys.executable).parent), str(bare)])
    assert shutil.which("sbatch", path=path) is None
    r = _run(["-m", "moeut.sweep", "action=launch", "sweep=cpu_smoke", f"root={tmp_path / 'sweeps'}"], tmp_path,
             PATH=path)
    assert r.returncode == 1
    assert _lines(r.stderr) == [
        "moeut.sweep: error: launcher=submitit_slurm_1gpu (grid 0 of sweep cpu_smoke): sbatch and srun not found on "
        "PATH, so this machine cannot submit SLURM jobs; launch from a SLURM login node, or pass local=true to run "
        "the jobs here one after another"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]
    # with SLURM's commands on PATH the check passes (they are not run here)
    from moeut import sweep as sw
    for name in ("sbatch", "srun"):
        (bare / name).write_text("#!/bin/sh\nexit 0\n")
        (bare / name).chmod(0o755)
    sw.check_slurm(sw.load_sweep(sw.resolve_sweep_path("cpu_smoke")), env={"PATH": str(bare)})
    assert not sw.is_slurm_launcher("basic")


def test_failed_grid_reports_its_last_log_line(tmp_path):
    from moeut import sweep as sw
    log = tmp_path / "launch_grid0.log"
    log.write_text("Traceback (most recent call last):\n  ...\nRuntimeError: Could not detect \"srun\"\n\n")
    assert sw._last_line(log) == "RuntimeError: Could not detect \"srun\""
    assert sw._last_line(tmp_path / "none.log") == ""


# ------------------------------------------------------------------------------------------
# train.py: warnings as one line; a refused resume is its error line only
# ------------------------------------------------------------------------------------------

def test_train_warning_line_and_refused_resume_without_config(tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    common = ["train.py", "experiment=cpu_tiny", f"hydra.run.dir={run}", f"data.cache_dir={cache}",
              "train.log_interval=1", "train.val_interval=1000", "train.routing_interval=1000", "optim.warmup=1"]
    # data.valid_tokens beyond what the C4 sample's validation split holds: a warning naming it
    r = _run([*common, "train.steps=2", "data.valid_tokens=10000000", "print_config=false"], REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    warned = [ln for ln in out.splitlines() if "warning:" in ln.lower() or "Warning" in ln]
    assert warned and all(ln.startswith("train.py: warning: ") for ln in warned), warned
    assert any("data.valid_tokens" in ln for ln in warned), warned
    assert "UserWarning" not in out and ".py:" not in out.replace("train.py:", "")
    assert not any(ln.strip() == "" for ln in r.stdout.splitlines()[:-1] if "warning" in ln)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    # a refused resume (another architecture than the checkpoint's): its error line only, no config dump
    r = _run([*common, "train.steps=4", "model.d_model=32", "print_config=true"], REPO, timeout=600)
    assert r.returncode == 1
    err = _lines(r.stderr)
    assert len(err) == 1 and err[0].startswith("train.py: error: train.resume: checkpoint ") and \
        "model.d_model=64 (now 32)" in err[0], err
    assert "print_config" not in r.stdout and "optim:" not in r.stdout, r.stdout
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # the run is untouched


# ------------------------------------------------------------------------------------------
# Progress off a terminal: plain lines, no `\r` frames
# ------------------------------------------------------------------------------------------

def test_scoring_progress_in_a_log_file_has_no_carriage_returns(tmp_path):
    """Evaluation's progress with stderr going to a file (not a TTY): a plain line per interval,
    never tqdm's `\\r` frames; the same code on a terminal shows the bar."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(REPO / 'tests')!r})
from eval_fakes import BigramLM
from moeut.eval import scoring
scoring.PROGRESS_EVERY_S = 0.0
probs = torch.full((5, 5), 0.2)
s = scoring.Scorer(BigramLM(probs.log()), device="cpu", batch_size=1, progress=True)
s.score([scoring.ScoreRequest(ids=[1, 2, 3], score_from=1) for _ in range(3)], desc="demo")
"""
    log = tmp_path / "eval.log"
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-c", code], env=_env(), stderr=f, stdout=subprocess.PIPE, timeout=300)
    assert r.returncode == 0, log.read_text()[-2000:]
    text = log.read_text()
    assert "\r" not in text
    assert _lines(text) == [f"[eval] demo: {k}/3 batches" for k in (1, 2, 3)]


def test_hf_export_in_a_log_file_has_no_progress_frames(tmp_path):
    """transformers' "Writing model shards" bar is off when stderr is a file (moeut.cli.plain_progress_off_tty)."""
    pytest.importorskip("transformers")
    from moeut.checkpoint import save_checkpoint
    from moeut.data.tokenizer import train_tokenizer
    from moeut.registry import build_model, get_preset
    tok = train_tokenizer(["the cat sat on the mat and the dog ran over the red tree"] * 20, vocab_size=40,
                          hard_vocab_limit=False)
    cfg = get_preset("tiny", vocab_size=tok.vocab_size)
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, build_model(cfg), cfg, tokenizer=tok)
    log = tmp_path / "export.log"
    env = {k: v for k, v in _env().items() if not k.startswith(("HF_HUB_DISABLE", "HF_DATASETS_DISABLE"))}
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "moeut.hf.export", f"checkpoint={tmp_path / 'run'}",
                            f"out={tmp_path / 'hf'}"], cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT,
                           timeout=300)
    text = log.read_text()
    assert r.returncode == 0, text[-2000:]
    assert "\r" not in text and "Writing model shards" not in text
    assert (tmp_path / "hf" / "config.json").is_file()


# ------------------------------------------------------------------------------------------
# Errors Hydra finds in the command line (before any tool code runs): one line, exit 1
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,line", [
    (["train.py", "train.stepz=5"], "train.py: error: train.stepz: no such option (--help lists the options)"),
    (["train.py", "optim.lr=abc"],
     "train.py: error: optim.lr: Value 'abc' of type 'str' could not be converted to Float"),
    (["-m", "moeut.evaluate", "checkpoint=x", "limitt=3"],
     "moeut.evaluate: error: limitt: no such option (--help lists the options)"),
])
def test_hydra_composition_errors_are_one_line(tmp_path, args, line):
    if args[0] == "train.py":
        args = [str(REPO / "train.py"), *args[1:]]
    r = _run(args, tmp_path, timeout=120)
    assert (r.returncode, _lines(r.stderr)) == (1, [line]), r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_hydra_error_line_unknown_group_option_lists_the_choices():
    from hydra.errors import MissingConfigException
    err = MissingConfigException("In 'config': Could not find 'experiment/nosuch'\n\n"
                                 "Available options in 'experiment':\n\tcpu_small\n\tcpu_tiny\n"
                                 "Config search path:\n\tprovider=hydra, path=pkg://hydra.conf")
    assert cli.hydra_error_line(err) == ("In 'config': Could not find 'experiment/nosuch'; "
                                         "Available options in 'experiment': cpu_small, cpu_tiny")


def test_one_line_hydra_errors_lets_the_tools_own_errors_through():
    """An error raised inside the tool's function keeps its traceback (a crash is not bad input)."""
    from omegaconf.errors import ValidationError

    def main():
        raise ValidationError("inside the tool")
    wrapped = cli.one_line_hydra_errors("t")(main)
    with pytest.raises(ValidationError, match="inside the tool"):
        wrapped()
    assert cli.one_line_hydra_errors("t")(lambda cfg: cfg * 2)(21) == 42  # a composed config passes through


def test_an_unquoted_value_holding_equals_is_named_with_the_quoting_rule(monkeypatch):
    """A run dir like `.../model=tiny` unquoted in a list breaks Hydra's override grammar: the line
    names the option and says to quote (the parser's real exception, hand-written expected line)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from moeut.cli import hydra_error_line
    arg = "runs=[/tmp/x/model=tiny,/tmp/y]"
    monkeypatch.setattr(sys, "argv", ["curves", arg])
    with pytest.raises(Exception) as e:
        OverridesParser.create().parse_overrides([arg])
    assert hydra_error_line(e.value) == (
        "runs: cannot parse '[/tmp/x/model='...: quote every value that holds '=' or ',', e.g. "
        "\"runs=['/runs/experiment=x,optim.lr=0.001',/runs/y]\" (Hydra's override grammar)")
