"""analysis/cpu_result_report.py (docs/results.md's tables) on hand-written sweep job directories:
which run is "complete", the MoEUT / dense ratio per budget, each model's best learning rate, the
seed spread, and that an unfinished run never enters a ratio."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "analysis" / "cpu_result_report.py"


@pytest.fixture(scope="module")
def rep():
    spec = importlib.util.spec_from_file_location("cpu_result_report", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _job(root: Path, name: str, steps: int, finals, last_step=None):
    """A job dir with validation records at 200, 400, ... and the final step (finals: list of ppl
    at those steps); last_step < steps makes an unfinished run."""
    d = root / name
    d.mkdir(parents=True)
    val_steps = [s for s in range(200, steps, 200)] + [steps]
    end = steps if last_step is None else last_step
    with open(d / "metrics.jsonl", "w") as f:
        for s in range(10, end + 1, 10):
            f.write(json.dumps({"step": s, "train/ce": 9.0 - s / 100, "train/grad_norm": 1.0}) + "\n")
            if s in val_steps:
                ppl = finals[val_steps.index(s)]
                f.write(json.dumps({"step": s, "validation/val/perplexity": ppl,
                                    "validation/c4/perplexity": 2 * ppl}) + "\n")


def test_job_overrides_fill_defaults(rep):
    assert rep.job_overrides("experiment=cpu_result_moeut,optim.lr=0.001,train.steps=150") == {
        "experiment": "cpu_result_moeut", "optim.lr": "0.001", "train.steps": "150", "train.seed": "0",
        "optim.warmup": "30"}
    assert rep.job_overrides("experiment=cpu_result_dense_params")["optim.lr"] == "0.002"
    with pytest.raises(ValueError, match="not a sweep job"):
        rep.job_overrides("outputs")


def test_tables_from_hand_written_runs(rep, tmp_path):
    M, D = "experiment=cpu_result_moeut", "experiment=cpu_result_dense_params"
    _job(tmp_path, f"{M},train.steps=150", 150, [400.0])
    _job(tmp_path, f"{D},train.steps=150", 150, [500.0])
    _job(tmp_path, f"{M},train.steps=610", 610, [300.0, 200.0, 150.0, 120.0])
    _job(tmp_path, f"{D},train.steps=610", 610, [330.0, 250.0, 210.0, 200.0])
    _job(tmp_path, f"{M},optim.lr=0.001", 610, [280.0, 190.0, 140.0, 100.0])       # MoEUT's best lr
    _job(tmp_path, f"{D},optim.lr=0.004", 610, [330.0, 250.0, 210.0, 250.0])
    _job(tmp_path, f"{D},train.seed=1", 610, [330.0, 250.0, 210.0, 300.0], last_step=400)  # unfinished
    runs = rep.collect(str(tmp_path))
    assert {r["name"]: r["done"] for r in runs}[f"{D},train.seed=1"] is False
    budget = rep.budget_table(runs)
    assert "| 150 | 0.61M | 400.0 | 500.0 | 0.800 |" in budget          # 400 / 500
    assert "| 610 | 2.50M | 120.0 | 200.0 | 0.600 |" in budget          # 120 / 200
    assert "| 300 | 1.23M | – | – | – |" in budget                     # not run
    best = rep.best_lr_table(runs)
    assert "| MoEUT | 100.0 | 120.0 | – | 100.0 (lr 0.001) |" in best
    assert "| dense (param-matched) | – | 200.0 | 250.0 | 200.0 (lr 0.002) |" in best
    seeds = rep.seed_table(runs)
    assert "| dense (param-matched) | 200.0 | – | 200.0 | – |" in seeds   # seed 1 unfinished: left out
    assert "not finished (stopped at step 400)" in rep.table(runs)
    curves = rep.curve_table(runs)   # every validation point of the 610-step runs, unfinished too
    assert "| dense (param-matched) | 0.002 | 1 | 330.0 | 250.0 | – | – |" in curves
    assert "| MoEUT | 0.001 | 0 | 280.0 | 190.0 | 140.0 | 100.0 |" in curves


def test_cli_writes_figures_and_rejects_bad_root(tmp_path):
    _job(tmp_path / "sweep", "experiment=cpu_result_moeut,train.steps=150", 150, [400.0])
    env = {**os.environ, "MPLBACKEND": "Agg"}
    out = subprocess.run([sys.executable, str(SCRIPT), f"root={tmp_path / 'sweep'}", f"out={tmp_path / 'fig'}"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "fig_budget.png").stat().st_size > 0 and (tmp_path / "fig_stall.png").stat().st_size > 0
    bad = subprocess.run([sys.executable, str(SCRIPT), f"root={tmp_path / 'nope'}"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 1 and "root:" in bad.stderr
    assert not (tmp_path / "outputs").exists()
