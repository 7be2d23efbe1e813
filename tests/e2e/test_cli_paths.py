"""Output paths, devices and checkpoint paths are checked before any work (docs/architecture.md,
"Errors"): an output option that names a file (or lies under one), `device=cuda` on a machine
without a GPU, and a checkpoint option naming a file outside any checkpoint are one line
`<tool>: error: <option>: ...`, exit status 1, and nothing is written.

The shared checks of moeut.cli (`check_out_dir`, `check_out_file`, `check_device_available`) and
moeut.checkpoint's `check_checkpoint_path` are tested in-process against the file system; every
tool's command line is run in-process (its `main()` with sys.argv set: the real Hydra app and
option checks), and train.py, whose run dir Hydra itself creates, in subprocesses.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeut import cli
from moeut.checkpoint import check_checkpoint_path

REPO = Path(__file__).resolve().parents[2]


def snapshot(root: Path) -> dict:
    """Every path under `root` -> sha256 of its bytes (None for a directory): what 'nothing was
    written' compares before and after."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = None if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def area(tmp_path):
    """A folder with a file `afile` (the wrong output target), an empty run-like dir `run` and a
    checkpoint-like dir `run/checkpoints/step_0000001` holding a model.pt."""
    (tmp_path / "afile").write_text("keep me\n")
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000001"
    ckpt.mkdir(parents=True)
    (ckpt / "model.pt").write_bytes(b"not read by the checks")
    return tmp_path


def no_gpu(monkeypatch):
    """Make torch see no GPU (so the test runs the same on a GPU machine)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ------------------------------------------------------------------------------------------
# The shared checks
# ------------------------------------------------------------------------------------------

def test_check_out_dir(area):
    before = snapshot(area)
    f = str(area / "afile")
    for ok in (None, str(area), str(area / "new"), str(area / "new" / "deeper"), str(area / "run")):
        assert cli.check_out_dir(ok, "out") == ok
    with pytest.raises(ValueError) as e:
        cli.check_out_dir(f, "out_dir")
    assert str(e.value) == f"out_dir: {f} is a file, not a directory"
    with pytest.raises(ValueError) as e:  # under a file: the file is named
        cli.check_out_dir(f + "/sub/deeper", "out")
    assert str(e.value) == f"out: {f} is a file, not a directory"
    os.chdir(area)  # a relative path is named as given
    with pytest.raises(ValueError) as e:
        cli.check_out_dir("afile", "out")
    assert str(e.value) == "out: afile is a file, not a directory"
    assert snapshot(area) == before


def test_check_out_file(area):
    before = snapshot(area)
    f = str(area / "afile")
    for ok in (None, str(area / "fig"), str(area / "new" / "fig"), f):  # an existing file is replaced
        assert cli.check_out_file(ok, "out") == ok
    assert cli.check_out_file(str(area / "run"), "out", prefix=True) == str(area / "run")  # run.md, run.csv
    with pytest.raises(ValueError) as e:
        cli.check_out_file(f + "/fig", "out", prefix=True)
    assert str(e.value) == f"out: {f} is a file, not a directory"
    with pytest.raises(ValueError) as e:
        cli.check_out_file(f + "/a/b.json", "json")
    assert str(e.value) == f"json: {f} is a file, not a directory"
    with pytest.raises(ValueError) as e:
        cli.check_out_file(str(area / "run"), "json")
    assert str(e.value) == f"json: {area / 'run'} is a directory, not a file"
    assert snapshot(area) == before


def test_check_device_available(monkeypatch):
    no_gpu(monkeypatch)
    for ok in ("auto", "cpu"):
        assert cli.check_device_available(ok) == ok
    for dev in ("cuda", "cuda:1"):
        with pytest.raises(ValueError) as e:
            cli.check_device_available(dev, "train.device")
        assert str(e.value) == f"train.device: {dev} requested but CUDA is not available"
    with pytest.raises(ValueError) as e:
        cli.check_device_available("gpu")
    assert str(e.value) == "device: must be auto | cpu | cuda | cuda:N, got 'gpu'"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli.check_device_available("cuda:1") == "cuda:1"
    with pytest.raises(ValueError) as e:
        cli.check_device_available("cuda:2")
    assert str(e.value) == "device: cuda:2 requested but this machine has 2 CUDA device(s)"


def test_check_checkpoint_path(area):
    ckpt = area / "run" / "checkpoints" / "step_0000001"
    check_checkpoint_path(area / "run")  # a run dir
    check_checkpoint_path(ckpt)  # one checkpoint
    check_checkpoint_path(ckpt / "model.pt")  # a file of a checkpoint: that checkpoint
    other = area / "x"
    other.mkdir()
    (other / "meta.json").write_text("{}")
    (other / "notes.txt").write_text("")
    check_checkpoint_path(other / "notes.txt")  # a dir holding a checkpoint's files is one
    with pytest.raises(ValueError) as e:
        check_checkpoint_path(area / "afile", "train.init_from")
    assert str(e.value) == f"train.init_from: {area / 'afile'} is a file, not a run or checkpoint directory"
    with pytest.raises(FileNotFoundError, match=r"checkpoint=.*nope does not exist"):
        check_checkpoint_path(area / "nope")


# ------------------------------------------------------------------------------------------
# Every tool's command line (in-process: the real Hydra app and checks)
# ------------------------------------------------------------------------------------------

def run_tool(module: str, argv, capsys, app: str):
    """Run `module.main()` with sys.argv = [app, *argv]; returns (exit status, stderr lines)."""
    mod = importlib.import_module(module)
    old = sys.argv
    sys.argv = [app, *argv]
    try:
        with pytest.raises(SystemExit) as e:
            mod.main()
    finally:
        sys.argv = old
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return e.value.code, err


def _cases(a: Path):
    f = str(a / "afile")
    run, ckpt = str(a / "run"), str(a / "run" / "checkpoints" / "step_0000001")
    file_dir = f"{f} is a file, not a directory"
    not_ckpt = f"{f} is a file, not a run or checkpoint directory"
    return [
        ("moeut.hf.export", "moeut.hf.export", [f"checkpoint={run}", f"out={f}"], f"out: {file_dir}"),
        ("moeut.hf.export", "moeut.hf.export", [f"checkpoint={f}", f"out={a / 'hf'}"], f"checkpoint: {not_ckpt}"),
        ("moeut.evaluate", "moeut.evaluate", [f"checkpoint={run}", f"out_dir={f}", "device=cpu"], f"out_dir: {file_dir}"),
        ("moeut.evaluate", "moeut.evaluate", [f"checkpoint={run}", "device=cuda"],
         "device: cuda requested but CUDA is not available"),
        ("moeut.evaluate", "moeut.evaluate", [f"checkpoint={f}", "device=cpu"], f"checkpoint: {not_ckpt}"),
        ("moeut.analysis.routing_command", "moeut.analysis routing", [f"checkpoint={run}", f"out_dir={f}/sub"],
         f"out_dir: {file_dir}"),
        ("moeut.analysis.routing_command", "moeut.analysis routing", [f"checkpoint={run}", "device=cuda"],
         "device: cuda requested but CUDA is not available"),
        ("moeut.analysis.routing_command", "moeut.analysis routing", [f"checkpoint={f}"], f"checkpoint: {not_ckpt}"),
        ("moeut.analysis.sources", "moeut.analysis sources", [f"checkpoint={ckpt}", f"out_dir={f}"],
         f"out_dir: {file_dir}"),
        ("moeut.analysis.knockout", "moeut.analysis knockout", [f"checkpoint={ckpt}", "device=cuda:0"],
         "device: cuda:0 requested but CUDA is not available"),
        ("moeut.analysis.depth", "moeut.analysis depth", [f"checkpoint={f}", "device=cpu"], f"checkpoint: {not_ckpt}"),
        ("moeut.analysis.compare", "moeut.analysis compare", [f"runs=[{run}]", f"out={f}"], f"out: {file_dir}"),
        ("moeut.analysis.compare", "moeut.analysis compare", [f"runs=[{run}]", f"out={a / 'cmp'}", "measure=true",
                                                              "device=cuda"],
         "device: cuda requested but CUDA is not available"),
        ("moeut.analysis.curves", "moeut.analysis curves", [f"runs=[{run}]", f"out={f}/fig"], f"out: {file_dir}"),
        ("moeut.analysis.summary", "moeut.analysis summary", [f"dir={run}", f"out={f}"], f"out: {file_dir}"),
        ("moeut.analysis.table", "moeut.analysis table", [f"results=[{f}]", f"out={f}/t"], f"out: {file_dir}"),
        ("moeut.analysis.lr_sweep", "moeut.analysis lr-sweep", [f"dir={run}", f"out={f}/r"], f"out: {file_dir}"),
        ("moeut.analysis.collapse", "moeut.analysis collapse", [f"runs=[{f}]", f"out={f}"], f"out: {file_dir}"),
        ("moeut.analysis.cpu_result", "moeut.analysis cpu-result", [f"root={run}", f"out={f}/fig"], f"out: {file_dir}"),
        ("moeut.analysis.cpu_result", "moeut.analysis cpu-result", [f"root={f}"], f"root: {f} is not a directory"),
        ("moeut.tools.footprint", "moeut.tools.footprint", ["preset=golden_tiny", f"json={run}"],
         f"json: {run} is a directory, not a file"),
        ("moeut.sweep", "moeut.sweep", ["action=dry-run", "sweep=cpu_smoke", f"root={f}"], f"root: {file_dir}"),
    ]


def test_every_tool_refuses_before_any_work(area, capsys, monkeypatch):
    no_gpu(monkeypatch)
    monkeypatch.chdir(area)
    before = snapshot(area)
    for module, app, argv, message in _cases(area):
        code, err = run_tool(module, argv, capsys, app)
        assert (code, err) == (1, [f"{app}: error: {message}"]), (app, argv)
        assert snapshot(area) == before, (app, argv)


def test_routing_notebooks_of_an_installed_wheel_refused_first(area, capsys, monkeypatch):
    """execute_notebooks=true where the notebooks are absent (an installed wheel): one line, before
    the statistics are redrawn or anything is written."""
    from moeut.analysis import notebooks
    monkeypatch.setattr(notebooks, "clone_root", lambda: None)
    before = snapshot(area)
    code, err = run_tool("moeut.analysis.routing_command", [f"checkpoint={area / 'run'}", "reuse_stats=true",
                                                             "execute_notebooks=true"], capsys, "moeut.analysis routing")
    assert (code, err) == (1, ["moeut.analysis routing: error: execute_notebooks: the notebooks ship with the "
                               "repository (analysis/), not with an installed wheel; run from a clone"])
    assert snapshot(area) == before


def test_cpu_result_default_out_is_under_the_sweep_root(tmp_path, capsys, monkeypatch):
    """Without out=, the figures go under the sweep root, never into the repository's
    docs/figures/ (whose committed files stay byte-identical), and the printed report names them."""
    sys.path.insert(0, str(REPO / "tests" / "unit" / "analysis"))
    try:
        import test_cpu_result as helpers
    finally:
        sys.path.pop(0)
    root = tmp_path / "sweep"
    helpers._job(root, "experiment=cpu_result_moeut,train.steps=150", 150, [400.0])
    figures = REPO / "docs" / "figures"
    before = snapshot(figures) if figures.is_dir() else {}
    monkeypatch.chdir(REPO)
    from moeut.analysis import cpu_result
    text = cpu_result.work(cpu_result.CpuResultOptions(root=str(root)))
    prefix = root / "figures" / "cpu_result"
    written = [Path(f"{prefix}_{k}.png") for k in ("budget", "stall", "runs")]
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)
    assert text.splitlines()[-1] == "figures: " + " ".join(map(str, written))
    assert (snapshot(figures) if figures.is_dir() else {}) == before


# ------------------------------------------------------------------------------------------
# train.py: Hydra creates the run dir itself (subprocesses)
# ------------------------------------------------------------------------------------------

def _train(args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR",)}
    env.update(PYTHONPATH=str(REPO), MPLBACKEND="Agg", WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")  # no GPU, also on a GPU machine
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "experiment=cpu_tiny", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    return r.returncode, [ln for ln in r.stderr.splitlines() if ln.strip()]


@pytest.mark.parametrize("args, message", [
    (["hydra.run.dir={f}"], "hydra.run.dir: {f} is a file, not a directory"),
    (["hydra.run.dir={f}/run"], "hydra.run.dir: {f} is a file, not a directory"),
    (["train.device=cuda", "hydra.run.dir={a}/r1"], "train.device: cuda requested but CUDA is not available"),
    (["train.init_from={f}", "hydra.run.dir={a}/r2"], "train.init_from: {f} is a file, not a run or checkpoint directory"),
    (["data.cache_dir={f}", "hydra.run.dir={a}/r3"], "data.cache_dir: {f} is a file, not a directory"),
])
def test_train_refuses_before_any_work(area, args, message):
    f = str(area / "afile")
    before = snapshot(area)
    code, err = _train([x.format(f=f, a=area) for x in args], area)
    assert (code, err) == (1, ["train.py: error: " + message.format(f=f)])
    assert snapshot(area) == before


def test_prepare_data_refuses_a_cache_dir_that_is_a_file(area):
    f = str(area / "afile")
    before = snapshot(area)
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR",)}
    env.update(PYTHONPATH=str(REPO), WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "moeut.prepare_data", "experiment=cpu_tiny", f"data.cache_dir={f}/c"],
                       cwd=area, env=env, capture_output=True, text=True, timeout=300)
    assert (r.returncode, [ln for ln in r.stderr.splitlines() if ln.strip()]) == \
        (1, [f"moeut.prepare_data: error: data.cache_dir: {f} is a file, not a directory"])
    assert snapshot(area) == before


def test_default_output_dirs_under_the_run_dir(tmp_path, capsys, monkeypatch):
    """The defaults out_dir = <run dir>/eval (moeut.evaluate) and <run dir>/analysis (routing, the
    expert analyses) are checked too, once the checkpoint names the run dir: one line, before the
    evaluation or analysis pass, nothing written."""
    from moeut.checkpoint import save_checkpoint
    from moeut.data.tokenizer import train_tokenizer
    from moeut.registry import build_model, get_preset
    words = "the cat sat on a mat and the dog ran over the old tree by a river".split()
    tok = train_tokenizer([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 4, vocab_size=60,
                          hard_vocab_limit=False)
    cfg = get_preset("tiny", vocab_size=tok.vocab_size)
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints", 1, build_model(cfg), cfg, tokenizer=tok, meta={})
    (run / "eval").write_text("a file where the results folder goes\n")
    (run / "analysis").write_text("a file where the analysis folder goes\n")
    lam = tmp_path / "lambada.jsonl"
    lam.write_text('{"text": "the cat sat on a mat"}\n')
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    for module, app, argv, folder in [
            ("moeut.evaluate", "moeut.evaluate", [f"checkpoint={run}", "tasks=[lambada]", f"paths.lambada={lam}",
                                                  "device=cpu"], "eval"),
            ("moeut.analysis.routing_command", "moeut.analysis routing", [f"checkpoint={run}", "device=cpu"],
             "analysis"),
            ("moeut.analysis.sources", "moeut.analysis sources", [f"checkpoint={run}", "device=cpu"], "analysis")]:
        code, err = run_tool(module, argv, capsys, app)
        assert (code, err) == (1, [f"{app}: error: out_dir: {run / folder} is a file, not a directory"]), app
        assert snapshot(tmp_path) == before, app
