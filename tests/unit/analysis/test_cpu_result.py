"""`python -m moeut.analysis cpu-result` (docs/results.md's tables) on hand-written sweep job directories:
which run is "complete", the MoEUT / dense ratio per budget, each model's best learning rate, the
seed spread, and that an unfinished run never enters a ratio."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
COMMAND = [sys.executable, "-m", "moeut.analysis", "cpu-result"]


@pytest.fixture(scope="module")
def rep():
    from moeut.analysis import cpu_result
    return cpu_result


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
    assert "Crossover: before 150 steps: MoEUT is ahead at every budget measured (150, 610 steps)." in budget
    best = rep.best_lr_table(runs)
    assert "| MoEUT | 100.0 | 120.0 | – | 100.0 (lr 0.001) |" in best
    assert "| dense (param-matched) | – | 200.0 | 250.0 | 200.0 (lr 0.002) |" in best
    assert "each at its best learning rate: **0.500** (best of 2 MoEUT and 2 dense" in best   # 100 / 200
    seeds = rep.seed_table(runs)
    assert "| dense (param-matched) | 200.0 | – | 200.0 | – |" in seeds   # seed 1 unfinished: left out
    assert "| MoEUT / dense | 0.600 | – | | |" in seeds
    assert "not finished (stopped at step 400)" in rep.table(runs)
    curves = rep.curve_table(runs)   # every validation point of the 610-step runs, unfinished too
    assert "| dense (param-matched) | 0.002 | 1 | 330.0 | 250.0 | – | – |" in curves
    assert "| MoEUT | 0.001 | 0 | 280.0 | 190.0 | 140.0 | 100.0 |" in curves


def test_cli_writes_figures_and_rejects_bad_root(tmp_path):
    _job(tmp_path / "sweep", "experiment=cpu_result_moeut,train.steps=150", 150, [400.0])
    env = {**os.environ, "MPLBACKEND": "Agg"}
    out = subprocess.run([*COMMAND, f"root={tmp_path / 'sweep'}", f"out={tmp_path / 'fig'}"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for fig in ("fig_budget.png", "fig_stall.png", "fig_runs.png"):
        assert (tmp_path / fig).stat().st_size > 0
    doc = tmp_path / "page.md"
    doc.write_text("x\n<!-- report:start -->\n<!-- report:end -->\n")
    out = subprocess.run([*COMMAND, f"root={tmp_path / 'sweep'}", f"out={tmp_path / 'fig'}",
                          f"doc={doc}"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "| MoEUT | 150 | 0.61M | 0.002 | 30 | 0 | 400.0 | 800.0 | complete |" in doc.read_text()
    bad = subprocess.run([*COMMAND, f"root={tmp_path / 'nope'}"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 1 and "root:" in bad.stderr
    assert not (tmp_path / "outputs").exists()


def test_crossover_sentence(rep, tmp_path):
    """Ratios 1.2 (150), 0.9 (300), 0.8 (610): the crossover lies between 150 and 300 steps;
    with the 300 and 610 budgets unfinished there is none among the finished budgets."""
    M, D = "experiment=cpu_result_moeut", "experiment=cpu_result_dense_params"
    for steps, m, d in ((150, 600.0, 500.0), (300, 360.0, 400.0), (610, 160.0, 200.0)):
        _job(tmp_path / "a", f"{M},train.steps={steps}", steps, [m] * (len(range(200, steps, 200)) + 1))
        _job(tmp_path / "a", f"{D},train.steps={steps}", steps, [d] * (len(range(200, steps, 200)) + 1))
    assert rep.crossover(rep.collect(str(tmp_path / "a"))) == (
        "Crossover: between 150 and 300 steps (MoEUT overtakes dense: ratio 1.200 -> 0.900).")
    for steps, m, d in ((150, 600.0, 500.0), (300, 360.0, 400.0), (610, 300.0, 200.0)):   # 1.2, 0.9, 1.5
        _job(tmp_path / "c", f"{M},train.steps={steps}", steps, [m] * (len(range(200, steps, 200)) + 1))
        _job(tmp_path / "c", f"{D},train.steps={steps}", steps, [d] * (len(range(200, steps, 200)) + 1))
    assert rep.crossover(rep.collect(str(tmp_path / "c"))) == (
        "Crossover: none that holds: the ratio changes side 2 times (1.200 at 150, 0.900 at 300, 1.500 at 610 "
        "steps), so the budget is not what decides it.")
    _job(tmp_path / "b", f"{M},train.steps=150", 150, [600.0])
    _job(tmp_path / "b", f"{D},train.steps=150", 150, [500.0])
    _job(tmp_path / "b", f"{M},train.steps=300", 300, [100.0, 100.0], last_step=200)   # unfinished
    assert rep.crossover(rep.collect(str(tmp_path / "b"))) == (
        "Crossover: none at the budgets measured (150 steps): MoEUT is behind at every one.")


def test_stall_numbers_first_step_below(rep, tmp_path):
    """train/ce = 9 - step/100 in the hand-written runs: first below 6.5 at step 260; a 150-step run
    never gets there."""
    _job(tmp_path, "experiment=cpu_result_moeut,train.steps=610", 610, [1.0, 1.0, 1.0, 1.0])
    _job(tmp_path, "experiment=cpu_result_moeut,train.steps=150,optim.warmup=75", 150, [1.0])
    rows = rep.stall_numbers(rep.collect(str(tmp_path))).splitlines()
    assert rows[2].startswith("| 150 steps, lr 0.002, warm-up 75 | 8.6 |") and rows[2].endswith("| not by step 150 |")
    assert rows[3].startswith("| 610 steps, lr 0.002 | 8.6 |") and rows[3].endswith("| 260 |")


def test_splice_replaces_only_the_marked_block(rep, tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text("# Page\nbefore\n<!-- report:start -->\nold tables\n<!-- report:end -->\nafter\n")
    rep.splice(str(doc), "## All runs\n\n| a |\n\n## Seeds\n\n| b |\n\nfigures: x_budget.png", "2026-11-30 06:00 UTC")
    assert doc.read_text() == ("# Page\nbefore\n<!-- report:start -->\nState of the runs at 2026-11-30 06:00 UTC "
                               "(output of the command above; \"not finished\" = still running or stopped when this "
                               "page was written).\n\n### All runs\n\n| a |\n\n### Seeds\n\n| b |\n"
                               "<!-- report:end -->\nafter\n")
    bad = tmp_path / "nomarkers.md"
    bad.write_text("<!-- report:end -->\n<!-- report:start -->\n")
    with pytest.raises(ValueError, match="nomarkers.md has no"):
        rep.splice(str(bad), "## x", "now")
    assert bad.read_text() == "<!-- report:end -->\n<!-- report:start -->\n"


def test_results_page_is_the_report_of_its_run_logs(tmp_path):
    """docs/results.md's report block is exactly what the documented command prints for the run
    logs kept in docs/results_runs/ (`python -m moeut.analysis cpu-result root=docs/results_runs
    out=... doc=...`): only the time stamp of the block's first line differs."""
    page = REPO / "docs" / "results.md"
    doc = tmp_path / "results.md"
    doc.write_text(page.read_text(encoding="utf-8"), encoding="utf-8")
    out = subprocess.run([*COMMAND, f"root={REPO / 'docs' / 'results_runs'}", f"out={tmp_path / 'fig' / 'cpu_result'}",
                          f"doc={doc}"], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "MPLBACKEND": "Agg"})
    assert out.returncode == 0, out.stderr
    stamp = re.compile(r"State of the runs at \d{4}-\d\d-\d\d \d\d:\d\d UTC")
    assert stamp.sub("STAMP", doc.read_text(encoding="utf-8")) == stamp.sub("STAMP", page.read_text(encoding="utf-8"))
    assert "## All runs" in out.stdout and (tmp_path / "fig" / "cpu_result_budget.png").stat().st_size > 1000
