"""The CPU dry run of benchmarks/gpu_suite.sh (issue 13 item 3), so the GPU suite cannot rot
between GPU sessions: every step (versions, compile footprint, cold start, pytest -m gpu,
train.py with a checkpoint + SIGTERM + resume, moeut.evaluate, moeut.analysis routing, the benchmarks)
runs at tiny sizes on CPU and writes its markdown section to a temp file, not docs/benchmarks.md."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_suite_dry_run(tmp_path):
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils timeout")
    doc = REPO / "docs" / "benchmarks.md"
    before = doc.read_bytes() if doc.exists() else None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOEUT_", "GPU_SUITE_"))}
    env.update(GPU_SUITE_WORK=str(tmp_path / "work"), OMP_NUM_THREADS="1")
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1200)
    work = tmp_path / "work"
    steps = [ln.split("\t") for ln in (work / "steps.tsv").read_text().splitlines()]
    assert res.returncode == 0, (steps, res.stdout[-6000:], res.stderr[-2000:])
    names = [s[0] for s in steps]
    assert names == ["versions", "rank_candidates", "footprint", "cold_start", "pytest_gpu", "train", "evaluate", "analyze",
                     "bench_train_step", "bench_moe_layer", "bench_cvmm"], names
    assert all(s[1] == "PASS" for s in steps), steps
    section = (work / "benchmarks.md").read_text()
    assert "CPU DRY RUN" in section and "| train | PASS |" in section
    assert "CVMM candidate ranking" in section and (work / "rank" / "rank.json").is_file()
    train_log = (work / "train.log").read_text()
    assert "signal received" in train_log and "resumed from" in train_log
    assert (doc.read_bytes() if doc.exists() else None) == before, "the dry run must not touch docs/benchmarks.md"


def test_gpu_suite_steps_filter(tmp_path):
    """GPU_SUITE_STEPS runs only the named steps (to fit a short GPU lease); the others are recorded
    as SKIPPED, in order, and the suite still passes and writes its section."""
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils timeout")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOEUT_", "GPU_SUITE_"))}
    env.update(GPU_SUITE_WORK=str(tmp_path / "work"), OMP_NUM_THREADS="1", GPU_SUITE_STEPS="versions")
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    steps = [ln.split("\t") for ln in (tmp_path / "work" / "steps.tsv").read_text().splitlines()]
    assert [s[0] for s in steps][:2] == ["versions", "rank_candidates"] and len(steps) == 11
    assert steps[0][1] == "PASS" and all(s[1] == "SKIPPED" for s in steps[1:]), steps
    assert "| rank_candidates | SKIPPED |" in (tmp_path / "work" / "benchmarks.md").read_text()
