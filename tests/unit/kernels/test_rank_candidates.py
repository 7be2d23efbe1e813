"""benchmarks/rank_candidates.py, the one-run GPU ranking of the CVMM candidates, in its CPU dry
run (tiny shapes, PyTorch implementation behind every backend): it must run end to end, rank
every variant against the dense-active MLP in both phases, find every candidate's output and
gradients equal to the reference backend's, and write rank.json, rank.md and the profiler kernel
tables. Timings are not asserted (meaningless on a shared CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "benchmarks" / "rank_candidates.py"


def _run(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOEUT_") and k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run(tmp_path):
    out = tmp_path / "rank"
    res = _run("--dry-run", "--out", str(out), "--budget-s", "20")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rep = json.loads((out / "rank.json").read_text())
    want = ["triton", "triton_pad", "triton_buffer", "triton_pad_buffer", "grouped_mm", "grouped_mm_pad"]
    assert rep["dry_run"] and rep["variants"] == want
    (layer,) = rep["layers"]
    assert layer["shape"] == "tiny" and layer["dims"]["d"] % 16 != 0  # the padding path is exercised
    names = {r["variant"] for r in layer["rows"]}
    assert names == set(want) | {"dense"}
    for r in layer["rows"]:
        assert r["ms"] > 0 and r["ratio_min"] <= r["ratio_vs_dense"] <= r["ratio_max"]
        if r["variant"] != "dense":
            # same weights and batch: every candidate computes the reference's numbers (fp32 on CPU)
            assert r["max_rel_err"] < 1e-5 and r["flag"] == "", r
    assert {r["variant"] for r in rep["train"]["rows"]} == set(want) | {"dense"}
    md = (out / "rank.md").read_text()
    assert "CPU DRY RUN" in md and "Training step" in md and "Best per table" in md
    for v in want + ["dense"]:
        assert (out / f"profile_tiny_{v}.txt").read_text().strip()
        assert (out / f"profile_train_{v}.txt").read_text().strip()


def test_bad_variant_is_one_line_error(tmp_path):
    res = _run("--dry-run", "--out", str(tmp_path / "r"), "--variants", "triton,nope")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("rank_candidates: error: --variants")
    assert not (tmp_path / "r").exists()


def test_failing_candidate_is_reported_not_fatal(tmp_path, monkeypatch):
    """A backend that raises (e.g. a kernel that does not compile on the GPU) is listed as FAILED
    with its error and left out of the timing; the other variants are still ranked."""
    import argparse
    import importlib.util
    import torch
    from moeut.kernels import cvmm as cv
    monkeypatch.delenv("MOEUT_CVMM_BACKEND", raising=False)
    spec = importlib.util.spec_from_file_location("rank_candidates", SCRIPT)
    rc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rc)

    def broken(*a, **k):
        raise RuntimeError("ptxas died")
    monkeypatch.setitem(cv._BACKENDS, "broken_for_test", broken)
    args = argparse.Namespace(warmup=1, min_rounds=1, max_rounds=1, profile=False, out=tmp_path)
    res = rc.layer_phase("tiny", 16, ["grouped_mm", "broken_for_test", "grouped_mm_pad"], torch.device("cpu"),
                         torch.float32, 5.0, args, lambda m: None)
    assert res["failed"] == {"broken_for_test": "RuntimeError: ptxas died"}
    assert {r["variant"] for r in res["rows"]} == {"grouped_mm", "grouped_mm_pad", "dense"}
    md = rc.to_markdown(dict(layers=[res], train=None, best=[]), [])
    assert "FAILED broken_for_test: RuntimeError: ptxas died" in md
