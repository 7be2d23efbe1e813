"""`python -m moeut.analysis summary` on hand-made run dirs (no training): parameter counts
against SPEC 2's closed forms, the last/best validation perplexity, lm-eval results, the
G-ablation groups, one number format per column, and the command line's errors."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from moeut.analysis import summary as summ

REPO = Path(__file__).resolve().parents[3]



def _fake_run(run_dir: Path, preset: str, ppl_by_step: Dict[int, float], overrides: List[str],
              data: str = "c4", eval_json: dict | None = None, corrupt_line: bool = False) -> None:
    from moeut.registry import get_preset
    run_dir.mkdir(parents=True)
    lines = [json.dumps({"step": s, "train/loss": math.log(p) + 0.1}) for s, p in ppl_by_step.items()]
    lines += [json.dumps({"step": s, "validation/val/perplexity": p}) for s, p in ppl_by_step.items()]
    text = "\n".join(lines) + "\n"
    if corrupt_line:
        text += '{"step": 99, "validation/val/perpl'  # killed mid-write: a cut last line, no newline
    (run_dir / "metrics.jsonl").write_text(text)
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run_dir / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    choices:\n      data: {data}\n")
    ck = run_dir / "checkpoints" / f"step_{max(ppl_by_step):07d}"
    ck.mkdir(parents=True)
    (ck / "model_config.json").write_text(json.dumps(dataclasses.asdict(get_preset(preset))))
    if eval_json is not None:
        (run_dir / "eval").mkdir()
        (run_dir / "eval" / "zeroshot.json").write_text(json.dumps(eval_json))


def test_summary_table_and_plots_from_run_dirs(tmp_path):
    sweep = tmp_path / "g"
    # G ablation at 244M: SPEC 2.1/2.3 parameter counts are the independent reference
    _fake_run(sweep / "experiment=c4_moeut_244m", "moeut_244m", {1000: 20.0, 2000: 15.0},
              ["experiment=c4_moeut_244m"], eval_json={"results": {"lambada": {"acc": 0.25}}})
    _fake_run(sweep / "experiment=c4_moeut_244m_g3", "moeut_244m_g3", {2000: 15.5},
              ["experiment=c4_moeut_244m_g3"], corrupt_line=True)
    _fake_run(sweep / "experiment=c4_moeut_244m_g18", "moeut_244m_g18", {2000: 16.5},
              ["experiment=c4_moeut_244m_g18"])
    _fake_run(sweep / "experiment=c4_dense_244m", "dense_244m", {2000: 17.0}, ["experiment=c4_dense_244m"])
    (sweep / ".submitit" / "123").mkdir(parents=True)  # never mistaken for a run

    with pytest.warns(UserWarning, match=r"c4_moeut_244m_g3/metrics\.jsonl:3: skipping unparsable"):
        res = summ.write_summary(sweep, tmp_path / "out")
    rows = {r["experiment"]: r for r in res["rows"]}
    assert set(rows) == {"c4_moeut_244m", "c4_moeut_244m_g3", "c4_moeut_244m_g18", "c4_dense_244m"}
    assert rows["c4_moeut_244m"]["params"] == 243_326_784      # SPEC 2.1
    assert rows["c4_dense_244m"]["params"] == 243_568_700      # SPEC 2.2
    assert round(rows["c4_moeut_244m_g3"]["params"] / 1e4) == 24384  # SPEC 2.3: 243.84M
    assert rows["c4_moeut_244m"]["val_ppl"] == 15.0 and rows["c4_moeut_244m"]["best_val_ppl"] == 15.0
    assert rows["c4_moeut_244m"]["step"] == 2000 and rows["c4_moeut_244m"]["dataset"] == "c4"
    assert rows["c4_moeut_244m"]["lm_eval/lambada/acc"] == 0.25  # an lm-eval results layout
    assert rows["c4_moeut_244m_g3"]["G"] == 3 and rows["c4_moeut_244m_g3"]["val_ppl"] == 15.5
    assert "K" not in rows["c4_dense_244m"]
    # the G-ablation group holds the three MoEUT runs (G = 2, 3, 18), sorted by G; dense is not in it
    groups = summ.g_ablation_groups(res["rows"])
    assert [[r["G"] for r in rs] for rs in groups.values()] == [[2, 3, 18]]
    assert (tmp_path / "out" / "g_ablation.png").stat().st_size > 1000
    assert (tmp_path / "out" / "ppl_vs_params.png").stat().st_size > 1000
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| experiment=c4_moeut_244m |" in md and "243.33M" in md


def test_summary_cli_errors_on_empty_dir(tmp_path):
    """The command line: exit status 1 and the reason for an empty or missing dir, and no
    stray outputs/ or .hydra/ folder in the working directory."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for arg, msg in ((f"dir={tmp_path}", "no runs under"), ("dir=" + str(tmp_path / "nope"), "does not exist"),
                     (None, "dir: required")):
        r = subprocess.run([sys.executable, "-m", "moeut.analysis", "summary"] + ([arg] if arg else []), cwd=tmp_path,
                           env=env, capture_output=True, text=True)
        assert r.returncode == 1 and msg in r.stderr, (arg, r.returncode, r.stderr)
        assert r.stderr.startswith("moeut.analysis summary: error: ") and "Traceback" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == []


def test_summary_one_number_format_per_column():
    """The params column is always in millions (3.28M and 0.24M, never 3.28M next to 242816); any
    other integer column that reaches 10^6 is in millions in every row; small counts stay plain."""
    rows = [{"run": "a", "params": 3_280_000, "tokens": 2_000_000, "n_layers": 4},
            {"run": "b", "params": 242_816, "tokens": 500_000, "n_layers": 2}]
    md = summ.to_markdown(rows, columns=["run", "params", "tokens", "n_layers"])
    assert "| a | 3.28M | 2.00M | 4 |" in md and "| b | 0.24M | 0.50M | 2 |" in md, md
    assert "242816" not in md and "500000" not in md
