"""moeut.analysis lr-sweep: the table, best learning rates, ratios and target verdicts of a
hand-made sweep dir with a known answer; adopting recorded runs only when the config is the job's."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from moeut.analysis import lr_sweep as lrs

REPO = Path(__file__).resolve().parents[3]
GRID = [5e-4, 1e-3, 2e-3, 4e-3]


def fake_run(root: Path, exp: str, lr: float, seed: int, ppl=None, last_step=610, steps=610, name=None):
    d = root / (name or f"experiment={exp},optim.lr={lr},train.seed={seed}")
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(f"- experiment={exp}\n- optim.lr={lr}\n- train.seed={seed}\n")
    (d / ".hydra" / "config.yaml").write_text(f"optim:\n  lr: {lr}\ntrain:\n  seed: {seed}\n  steps: {steps}\n")
    recs = [{"step": s, "train/loss": 7.0} for s in range(10, last_step + 1, 10)]
    if ppl is not None:
        recs.append({"step": steps, "validation/val/perplexity": ppl})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


# known table: dense best 1e-3 (inside) in both seeds; paper MoEUT best at 5e-4 (the low edge) in seed 0
DENSE = {0: [230.0, 200.0, 215.0, 243.0], 1: [232.0, 205.0, 220.0, 250.0]}
MOEUT = {0: [150.0, 160.0, 420.0, 1060.0], 1: [155.0, 150.0, 440.0, None]}  # seed 1 lr 4e-3: still running


def make_sweep(root: Path) -> Path:
    for seed in (0, 1):
        for i, lr in enumerate(GRID):
            fake_run(root, lrs.DENSE, lr, seed, DENSE[seed][i])
            p = MOEUT[seed][i]
            fake_run(root, lrs.PAPER, lr, seed, p, last_step=610 if p else 380)
    (root / "sweep.yaml").write_text("name: x\n")  # not a run dir: ignored
    (root / "stray").mkdir()
    return root


def test_report_on_a_hand_made_sweep(tmp_path):
    runs = lrs.collect([make_sweep(tmp_path)])
    assert len(runs) == 16
    text, num = lrs.report(runs, GRID, [0, 1], 610)
    assert num["best"][(lrs.DENSE, 0)] == (1e-3, "inside")
    assert num["best"][(lrs.DENSE, 1)] == (1e-3, "inside")
    assert num["best"][(lrs.PAPER, 0)] == (5e-4, "at the low edge")
    assert num["best"][(lrs.PAPER, 1)] == (None, "not yet measured")  # 4e-3 unfinished
    assert num["best"][(lrs.OPTIONS, 0)] == (None, "not yet measured")  # no runs at all
    assert num["ratio_best"][(lrs.PAPER, 0)] == pytest.approx(150.0 / 200.0)
    assert num["ratio_best"][(lrs.PAPER, 1)] is None
    t = num["targets"]
    assert t["every best lr inside the grid"].startswith("NOT met (MoEUT (paper) seed 0: at the low edge")
    assert t["MoEUT + options no worse than dense wherever dense trains"] == "not yet measured"
    assert t["MoEUT + options best <= 0.85 x dense best, every seed"] == "not yet measured"
    assert "running/stopped at step 380" in text
    assert "| MoEUT (paper) | 0 | 150.0 | 160.0 | 420.0 | 1060.0 | 0.0005 (at the low edge) | 150.0 |" in text
    assert "| MoEUT (paper) | 0 | 0.652 | 0.800 | 1.953 | 4.362 | 0.750 |" in text  # 150/230, 160/200, ...


def test_targets_met_and_not_met_for_the_options_model(tmp_path):
    root = make_sweep(tmp_path)
    opt = {0: [170.0, 160.0, 168.0, 240.0], 1: [175.0, 165.0, 170.0, 260.0]}  # best 1e-3: 160/200, 165/205
    for seed in (0, 1):
        for i, lr in enumerate(GRID):
            fake_run(root, lrs.OPTIONS, lr, seed, opt[seed][i])
    _, num = lrs.report(lrs.collect([root]), GRID, [0, 1], 610)
    t = num["targets"]
    assert t["MoEUT + options best <= 0.85 x dense best, every seed"] == "met"  # 0.80, 0.805
    # seed 1 lr 4e-3: 260 > dense 250 while dense trains there (250 <= 2 x 205)
    assert t["MoEUT + options no worse than dense wherever dense trains"] == "NOT met (lr 0.004 seed 1: 260.0 > 250.0)"


def test_same_configuration_twice_is_refused(tmp_path):
    fake_run(tmp_path / "a", lrs.DENSE, 1e-3, 0, 200.0)
    fake_run(tmp_path / "b", lrs.DENSE, 1e-3, 0, 201.0)
    with pytest.raises(ValueError, match="the same configuration"):
        lrs.collect([tmp_path / "a", tmp_path / "b"])


def test_cli_prints_the_table_and_rejects_a_missing_dir(tmp_path):
    make_sweep(tmp_path / "s")
    r = subprocess.run([sys.executable, "-m", "moeut.analysis", "lr-sweep", f"dir={tmp_path / 's'}",
                        f"out={tmp_path / 'rep'}"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "not yet measured" in r.stdout and (tmp_path / "rep.md").read_text() == r.stdout
    r = subprocess.run([sys.executable, "-m", "moeut.analysis", "lr-sweep", f"dir={tmp_path / 'nope'}"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"moeut.analysis lr-sweep: error: dir={tmp_path / 'nope'}: no such directory"


def test_adopt_copies_only_runs_with_the_jobs_config(tmp_path):
    sweep = tmp_path / "tiny_lr.yaml"
    sweep.write_text("name: tiny_lr\nexpected_jobs: 2\ncommon: [experiment=cpu_tiny, train.threads=1]\n"
                     "grids:\n  - overrides:\n      - optim.lr=3e-3,1e-3\n")
    recorded = tmp_path / "recorded"
    # the same configuration spelt differently (cpu_tiny's lr is 3e-3: no optim.lr override)
    same = recorded / "experiment=cpu_tiny"
    (same / ".hydra").mkdir(parents=True)
    (same / ".hydra" / "overrides.yaml").write_text("- train.threads=1\n- experiment=cpu_tiny\n")
    (same / "metrics.jsonl").write_text('{"step": 30, "validation/val/perplexity": 99.0}\n')
    other = recorded / "other"  # another thread count: not the job's configuration
    (other / ".hydra").mkdir(parents=True)
    (other / ".hydra" / "overrides.yaml").write_text("- train.threads=2\n- experiment=cpu_tiny\n- optim.lr=1e-3\n")
    (other / "metrics.jsonl").write_text('{"step": 30}\n')
    sweep_dir = tmp_path / "out" / "tiny_lr"
    done = lrs.adopt(sweep, sweep_dir, recorded, say=lambda m: None)
    assert [(s.name, d.name) for s, d in done] == [("experiment=cpu_tiny", "optim.lr=0.003")]
    dst = sweep_dir / "optim.lr=0.003"
    assert (dst / "metrics.jsonl").read_text() == (same / "metrics.jsonl").read_text()
    assert "experiment=cpu_tiny" in (dst / "ADOPTED.txt").read_text()
    assert not (sweep_dir / "optim.lr=0.001").exists()
    assert lrs.adopt(sweep, sweep_dir, recorded, say=lambda m: None) == []  # never overwrites


def test_early_table_by_hand(tmp_path, capsys):
    """The early-routing table of a run stopped at step 40 and a reference run, against hand-computed
    numbers: CE is the mean of the three records up to the step; usage and dead fractions are the step's."""
    a = tmp_path / "screens" / "a"
    a.mkdir(parents=True)
    recs = [{"step": s, "train/ce": ce} for s, ce in [(10, 8.0), (20, 7.0), (30, 6.5), (40, 6.0)]]
    recs += [{"step": 20, "moe/g0/usage_rel_ppl": 0.8, "moe/g1/usage_rel_ppl": 0.55, "moe/dead_frac_all": 0.0},
             {"step": 40, "moe/g0/usage_rel_ppl": 0.9, "moe/g1/usage_rel_ppl": 0.75, "moe/dead_frac_all": 0.125}]
    (a / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    ref = fake_run(tmp_path / "recorded", lrs.PAPER, 1e-3, 0, 160.0, last_step=60, steps=60)  # train/loss only
    dirs = lrs.early_run_dirs([tmp_path / "screens", ref])
    assert dirs == [a, ref]
    rows = lrs.early_rows(a, [20, 40, 60])
    assert rows[20] == {"ce": None, "dead": 0.0, "g0": 0.8, "g1": 0.55}  # only 2 of the 3 window records
    assert rows[40]["ce"] == pytest.approx((7.0 + 6.5 + 6.0) / 3) and rows[40]["dead"] == 0.125
    assert rows[60] == {"ce": None, "dead": None}  # the run stopped at 40
    text = lrs.early_report(dirs, [20, 40])
    assert "| a | –, 0.80 0.55, 0.00 | 6.500, 0.90 0.75, 0.12 |" in text
    assert f"| {ref.name} | –, – –, – | –, – –, – |" in text
    # a run without routing records alone in the table: one dash for the usage, not an empty cell
    assert f"| {ref.name} | –, –, – |" in lrs.early_report([ref], [20])
    r = subprocess.run([sys.executable, "-m", "moeut.analysis", "lr-sweep", f"early=[{tmp_path / 'screens'}]",
                        "early_steps=[40]"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "| a | 6.500, 0.90 0.75, 0.12 |" in r.stdout, r.stderr
    for opts, msg in [(dict(early=[str(a)], early_steps=[45]), "early_steps: [45] not multiples of 10"),
                      (dict(early=[str(tmp_path / "nope")]), f"early: {tmp_path / 'nope'}: no such directory"),
                      (dict(lrs=[1e-3]), "dir: required")]:  # bad input: one line naming the option, exit 1
        with pytest.raises(SystemExit) as e:
            lrs.work(lrs.LrSweepOptions(**opts))
        assert e.value.code == 1 and msg in capsys.readouterr().err.strip().splitlines()[-1]


def test_results_page_screens_table_is_the_documented_commands_output():
    """docs/results.md's screens block is exactly what its documented `lr-sweep early=...` command
    prints for the run logs kept in docs/results_runs/ (the table the options were chosen from)."""
    import re
    import shlex
    page = (REPO / "docs" / "results.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- screens:start -->\n(.*?)<!-- screens:end -->", page, re.S).group(1)
    command = next(line.strip() for line in page.splitlines()
                   if line.strip().startswith("python -m moeut.analysis lr-sweep \"early="))
    argv = shlex.split(command)
    r = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout == block
    assert "| warm75_zloss1e-2_lr4e-3 |" in block  # the chosen option set's screen is in it


def test_runs_of_another_configuration_are_left_out_and_an_empty_dir_is_refused(tmp_path, capsys):
    """A run whose overrides go beyond its experiment's (here a z-loss) is not counted as that
    experiment's row; a folder without run dirs (e.g. the launch root instead of the sweep dir) is an
    error, not an empty table; adopt's refusals are one line too."""
    root = tmp_path / "sweep"
    fake_run(root, lrs.PAPER, 2e-3, 0, 420.0)
    other = fake_run(root, lrs.PAPER, 2e-3, 0, 180.0, name="zloss")
    (other / ".hydra" / "overrides.yaml").write_text(
        "- experiment=cpu_result_moeut\n- optim.lr=0.002\n- train.seed=0\n- train.threads=1\n- model.router_zloss=0.01\n")
    said = []
    runs = lrs.collect([root], say=said.append)
    assert [r.path.name for r in runs] == ["experiment=cpu_result_moeut,optim.lr=0.002,train.seed=0"]
    assert len(said) == 1 and said[0].startswith(f"left out {other}: overrides beyond experiment=cpu_result_moeut: "
                                                 "model.router_zloss=0.01")
    _, num = lrs.report(runs, GRID, [0], 610)
    assert num["ppl"][(lrs.PAPER, 2e-3, 0)] == 420.0  # not the z-loss run's 180
    for opts, msg in [(dict(dir=str(tmp_path)), f"dir={tmp_path}: no training run dirs in it"),
                      (dict(dir=str(root), adopt=str(root), sweep="lr_stability"),
                       "the sweep dir of"),  # adopt into a dir not named after the sweep
                      (dict(early=[str(root)], early_steps=[]), "early_steps: empty")]:
        with pytest.raises(SystemExit) as e:
            lrs.work(lrs.LrSweepOptions(**opts))
        assert e.value.code == 1 and msg in capsys.readouterr().err.strip().splitlines()[-1]
    # the early table alone writes the json its --help promises
    lrs.work(lrs.LrSweepOptions(early=[str(root)], early_steps=[40], out=str(tmp_path / "e")))
    assert json.loads((tmp_path / "e.json").read_text())["zloss"]["40"]["ce"] is None
