"""Compile the Triton CVMM kernels ahead of time for Hopper (sm_90) with Triton's real backend
and its bundled ptxas -- no GPU needed. The interpreter tests check numerics; this checks that
the kernels, in every variant and config the fp32 golden check needs (moeut.tools.footprint),
are valid for the GPU compiler (which the permissive interpreter is not) and fit shared memory.

Runs in a subprocess without TRITON_INTERPRET: in this process tests/conftest.py may have turned
the interpreter on before Triton was imported, and Triton's own library functions are then
interpreter functions that the real compiler cannot use."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

pytestmark = [pytest.mark.triton, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[3]


def _footprint_aot(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOEUT_TRITON_CONFIG")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "footprint.json"
    res = subprocess.run([sys.executable, "-m", "moeut.tools.footprint", *args, "aot=90", f"json={out}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(out.read_text())


def test_fp32_golden_footprint_compiles_for_sm90(tmp_path):
    rep = _footprint_aot(tmp_path, "preset=[golden_tiny,golden_small_g3]", "dtype=fp32", "batch=2", "seq_len=64",
                         "steps=[train,eval,decode]", "prefill=32")
    rows = rep["aot"]["rows"]
    assert len(rows) == rep["total"]["compiles"] > 0 and rep["total"]["autotuned_keys"] == 0
    assert all(r["shared_bytes"] <= 227 * 1024 for r in rows)  # H100/H200 shared memory per block


def test_bf16_training_footprint_compiles_for_sm90(tmp_path):
    """The 16-bit variants and all their configs (here at the `tiny` shapes: same kernels, flags
    and configs as moeut_44m; benchmarks/compile_cost.py times the 44M footprint itself)."""
    rep = _footprint_aot(tmp_path, "preset=tiny", "dtype=bf16", "batch=64", "seq_len=1024", "steps=[train]")
    rows = rep["aot"]["rows"]
    assert len(rows) == rep["total"]["compiles"] and rep["total"]["autotuned_keys"] > 0
    assert all(r["shared_bytes"] <= 227 * 1024 for r in rows)
