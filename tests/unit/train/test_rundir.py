"""moeut.rundir: the one run-directory reader (issue 16 item 4), on hand-written files.

- the corrupt-line policy, once, for every reader of metrics.jsonl (moeut.rundir, the analysis
  subcommands summary / compare / curves / routing, moeut.analysis.stats, moeut.eval.zeroshot):
  a cut last line (no newline) is skipped with a warning naming file:line, anything else damaged
  is a CorruptRunFile naming file:line;
- metrics.rewound.jsonl (what a resume moves aside) is never counted;
- run_dir_of for each kind of path it takes; the two former copies are this one;
- find_runs, the saved config, evaluation results and the model config of a run dir;
- the one validation-perplexity rule (`val_ppl_key`) on a run where the former five rules disagreed,
  and the run facts (corpus name, seq_len).
"""
from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import pytest

from moeut import results_files as RF
from moeut import rundir as R
from moeut.rundir import CorruptRunFile, RunDir, TruncatedLineWarning, read_jsonl, run_dir_of

REPO = Path(__file__).resolve().parents[3]


GOOD = [{"step": 1, "train/loss": 5.0, "train/tokens_seen": 64},
        {"step": 2, "train/loss": 4.0, "train/tokens_seen": 128},
        {"step": 2, "validation/val/perplexity": 60.0}]


def _write(path: Path, text) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def _lines(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


# ------------------------------------------------------------------------------------------
# The policy, on the low-level reader
# ------------------------------------------------------------------------------------------

def test_clean_file_blank_lines_nan_and_unterminated_complete_record(tmp_path):
    # the logger writes NaN/Infinity (json.dumps(allow_nan=True)); blank lines are ignored; a
    # complete record that lost only its newline is kept, without a warning
    text = _lines(GOOD[:2]) + "\n  \n" + '{"step": 3, "train/loss": NaN, "x": Infinity}\n' + json.dumps(GOOD[2])
    p = _write(tmp_path / "metrics.jsonl", text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = read_jsonl(p)
    assert got.skipped_lines == []
    assert [r["step"] for r in got.records] == [1, 2, 3, 2]
    assert math.isnan(got.records[2]["train/loss"]) and got.records[2]["x"] == math.inf
    assert got.records[3] == GOOD[2]


@pytest.mark.parametrize("tail", [b'{"step": 3, "train/lo', b'{"step": 3, "name": "\xc3'])  # cut JSON; cut UTF-8
def test_cut_last_line_is_skipped_counted_and_named(tmp_path, tail):
    p = _write(tmp_path / "metrics.jsonl", _lines(GOOD).encode() + tail)
    with pytest.warns(TruncatedLineWarning, match=rf"{p}:4: skipping unparsable last line .*no newline.*"
                                                   r"1 line skipped, 3 records read"):
        got = read_jsonl(p)
    assert got.records == GOOD and got.skipped_lines == [4]


@pytest.mark.parametrize("text, line, what", [
    (_lines(GOOD[:1]) + '{"step": 2, "train/lo\n' + _lines(GOOD[1:]), 2, "not valid JSON"),  # mid-file
    (_lines(GOOD) + "not json\n", 4, "not valid JSON"),            # terminated last line: not a cut
    (_lines(GOOD[:2]) + "[1, 2]\n" + _lines(GOOD[2:]), 3, "expected a JSON object, got list"),
    (_lines(GOOD) + "7", 4, "expected a JSON object, got int"),   # parses: not a cut either
])
def test_any_other_damage_is_an_error_naming_file_and_line(tmp_path, text, line, what):
    p = _write(tmp_path / "metrics.jsonl", text)
    with pytest.raises(CorruptRunFile, match=rf"{p}:{line}: {what}"):
        read_jsonl(p)
    assert issubclass(CorruptRunFile, ValueError)


def test_whole_files_json_and_yaml_name_line_and_column(tmp_path):
    p = _write(tmp_path / "eval" / "results_step_0000002.json", '{"tasks": {\n  "piqa": {"accuracy": 0.5,}\n}}')
    with pytest.raises(CorruptRunFile, match=rf"{p}:2:\d+: not valid JSON"):
        R.read_json(p)
    y = _write(tmp_path / ".hydra" / "config.yaml", "data:\n  source: c4\n  seq_len: [1, 2\nmodel: x\n")
    with pytest.raises(CorruptRunFile, match=rf"{y}:\d+:\d+: not valid YAML"):
        R.read_yaml(y)


# ------------------------------------------------------------------------------------------
# The same policy in every reader of metrics.jsonl
# ------------------------------------------------------------------------------------------

def _readers():
    """(name, read(run_dir) -> list of the steps it saw) for every reader of metrics.jsonl."""
    from moeut.analysis import stats as A
    from moeut.analysis import curves as plot, summary as S
    from moeut.eval.zeroshot import read_val_perplexity

    return [
        ("RunDir.metrics", lambda d: [r["step"] for r in RunDir(d).metrics()]),
        ("rundir.read_metrics", lambda d: [r["step"] for r in R.read_metrics(d)]),
        ("summary.read_metrics", lambda d: [r["step"] for r in S.read_metrics(d / "metrics.jsonl")]),
        ("summary.summarize_run", lambda d: [S.summarize_run(d, d.parent).row["step"]]),
        ("analysis.read_metrics_jsonl", lambda d: [r["step"] for r in A.read_metrics_jsonl(str(d / "metrics.jsonl"))]),
        ("curves.read_metrics", lambda d: [r["step"] for r in plot.read_metrics(str(d))]),
        ("zeroshot.read_val_perplexity", lambda d: [read_val_perplexity(str(d))]),
    ]


@pytest.mark.parametrize("which", range(7))
def test_every_reader_applies_the_one_policy(tmp_path, which):
    name, read = _readers()[which]
    ok = tmp_path / "ok"
    _write(ok / "metrics.jsonl", _lines(GOOD) + '{"step": 9, "validation/val/perplexity": 123.5')  # cut tail
    with pytest.warns(TruncatedLineWarning, match=r"ok/metrics\.jsonl:4: skipping unparsable last line"):
        seen = read(ok)
    assert 9 not in seen and 123.5 not in seen and seen, (name, seen)  # the cut record contributed nothing
    bad = tmp_path / "bad"
    _write(bad / "metrics.jsonl", _lines(GOOD[:1]) + '{"step": 9, "validation/val/perplexity": 1\n' + _lines(GOOD[1:]))
    with pytest.raises(CorruptRunFile, match=r"bad/metrics\.jsonl:2: not valid JSON"):
        read(bad)


def test_compare_applies_the_one_policy(tmp_path):
    """moeut.analysis compare reads a run with a model config: same warning, same error."""
    from moeut.analysis import compare as cmp
    from moeut.registry import get_preset
    cfg = dict(vars(get_preset("cpu_dense", vocab_size=512)))
    for name, tail in (("ok", '{"step": 9, "validation/val/perplexity": 1'),
                       ("bad", '{"step": 9}\n{"step": 10, "validation/val/perp\n{"step": 11}\n')):
        _write(tmp_path / name / "model_config.json", json.dumps(cfg))  # a bare checkpoint dir as run
        _write(tmp_path / name / "metrics.jsonl", _lines(GOOD) + tail)
    with pytest.warns(TruncatedLineWarning, match=r"ok/metrics\.jsonl:4: skipping unparsable last line"):
        run = cmp.load_run(str(tmp_path / "ok"), seq_len=32)
    assert run.val == [(2, 60.0)] and run.steps == 2
    with pytest.raises(CorruptRunFile, match=r"bad/metrics\.jsonl:5: not valid JSON"):
        cmp.load_run(str(tmp_path / "bad"), seq_len=32)


# ------------------------------------------------------------------------------------------
# metrics.rewound.jsonl: never counted
# ------------------------------------------------------------------------------------------

def _resumed_run(run: Path) -> None:
    """A run that logged steps 1-4 (and a cut line), crashed, and resumed from the step-2
    checkpoint: rewind_metrics (what train.py runs on resume) moves steps 3, 4 and the cut line
    to metrics.rewound.jsonl; the resumed start logs steps 3, 4 again with new values."""
    from moeut.train_lib.logging import rewind_metrics
    first = [{"step": s, "train/loss": 10.0 - s} for s in (1, 2, 3, 4)]
    first += [{"step": 2, "validation/val/perplexity": 50.0}, {"step": 4, "validation/val/perplexity": 5.0}]
    first.sort(key=lambda r: r["step"])
    _write(run / "metrics.jsonl", _lines(first) + '{"step": 5, "train/lo')
    # later steps: two of step 3/4 and the step-4 validation; the cut line (line 7) counted apart
    assert rewind_metrics(str(run), 2) == (3, [7])
    with open(run / "metrics.jsonl", "a") as f:  # the resumed start
        f.write(_lines([{"step": 3, "train/loss": 6.5}, {"step": 4, "train/loss": 6.0},
                        {"step": 4, "validation/val/perplexity": 40.0}]))


def test_rewound_records_are_not_counted(tmp_path):
    from moeut.analysis import curves as plot, summary as S
    from moeut.eval.zeroshot import read_val_perplexity
    run = tmp_path / "sweep" / "run"
    _resumed_run(run)
    rewound = (run / R.REWOUND_METRICS_FILE).read_text()
    assert '"validation/val/perplexity": 5.0' in rewound and '"train/lo' in rewound  # the data is there ...
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ... and nobody reads it (its cut line would warn)
        recs = RunDir(run).metrics()
        steps = [r["step"] for r in recs if "train/loss" in r]
        assert steps == [1, 2, 3, 4]  # one history, each step once
        assert [r["train/loss"] for r in recs if "train/loss" in r] == [9.0, 8.0, 6.5, 6.0]
        row = S.summarize_run(run, tmp_path / "sweep").row
        # the rewound step-4 perplexity 5.0 would be the best and the last if it were counted
        assert (row["val_ppl"], row["best_val_ppl"], row["step"], row["train/loss"]) == (40.0, 40.0, 4, 6.0)
        assert read_val_perplexity(str(run)) == 40.0 and read_val_perplexity(str(run), 4) == 40.0
        assert S.find_runs(tmp_path / "sweep") == [run]
        assert [r["step"] for r in plot.read_metrics(str(run))] == [r["step"] for r in recs]


# ------------------------------------------------------------------------------------------
# run_dir_of
# ------------------------------------------------------------------------------------------

def test_run_dir_of_each_kind_of_path(tmp_path):
    run = tmp_path / "runs" / "a"
    step = run / "checkpoints" / "step_0000100"
    _write(step / "model.pt", b"x")
    _write(run / "metrics.jsonl", "")
    flat = tmp_path / "flat"  # step dirs kept directly in the run dir (find_checkpoints allows it)
    _write(flat / "step_0000007" / "meta.json", "{}")
    bare = tmp_path / "exported"  # a checkpoint outside any run: its own run dir
    _write(bare / "model_config.json", "{}")
    a = str(run.resolve())
    assert run_dir_of(run) == a                                   # a run dir
    assert run_dir_of(str(run) + "/") == a
    assert run_dir_of(run / "checkpoints") == a                   # its checkpoints/ dir
    assert run_dir_of(step) == a                                  # a checkpoint step dir
    assert run_dir_of(step / "model.pt") == a                     # a checkpoint file
    assert run_dir_of(run / "metrics.jsonl") == a                 # a run file
    assert run_dir_of(tmp_path / "runs" / "a" / "checkpoints" / ".." / "checkpoints" / "step_0000100") == a
    assert run_dir_of(flat / "step_0000007") == str(flat.resolve())
    assert run_dir_of(flat / "step_0000007" / "meta.json") == str(flat.resolve())
    assert run_dir_of(bare) == str(bare.resolve())
    assert run_dir_of(bare / "model_config.json") == str(bare.resolve())
    link = tmp_path / "link"
    link.symlink_to(step)
    assert run_dir_of(link) == a                                  # symlinks resolved first
    with pytest.raises(FileNotFoundError, match="nothing: no such file or directory"):
        run_dir_of(tmp_path / "nothing")
    assert RunDir(step).path == Path(a) and RunDir(step).metrics_path == Path(a) / "metrics.jsonl"


def test_one_run_dir_of_everywhere():
    """The analysis (moeut.analysis) and moeut.eval.zeroshot had their own, disagreeing copies; now there is one."""
    import moeut.analysis.routing_command as Z
    import moeut.eval.zeroshot as E
    assert Z.run_dir_of is R.run_dir_of and E.run_dir_of is R.run_dir_of


# ------------------------------------------------------------------------------------------
# Finding runs, config, eval results, model config
# ------------------------------------------------------------------------------------------

def test_find_runs_prunes_what_is_not_a_run(tmp_path):
    sweep = tmp_path / "sweep"
    _write(sweep / "x=1" / "metrics.jsonl", "")
    _write(sweep / "x=1" / "eval" / "metrics.jsonl", "")         # inside a run's eval/: not a run
    _write(sweep / "x=2" / "checkpoints" / "step_0000001" / "metrics.jsonl", "")
    _write(sweep / ".submitit" / "1" / "metrics.jsonl", "")      # hidden: never searched
    _write(sweep / "group" / "x=3" / "metrics.jsonl", "")
    (sweep / "empty").mkdir()
    assert R.find_runs(sweep) == [sweep / "group" / "x=3", sweep / "x=1", sweep / "x=2"]
    assert R.is_run_dir(sweep / "x=2") and not R.is_run_dir(sweep / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        R.find_runs(tmp_path / "nothing")


def test_config_overrides_and_choices(tmp_path):
    run = tmp_path / "run"
    ck = run / "checkpoints" / "step_0000002"
    _write(run / ".hydra" / "config.yaml", "data:\n  source: c4\n  seq_len: ${train.t}\n")
    _write(run / ".hydra" / "overrides.yaml", "- experiment=c4_moeut_44m\n- train.lr=1e-3\n")
    _write(run / ".hydra" / "hydra.yaml", "hydra:\n  runtime:\n    choices:\n      data: c4\n")
    rd = RunDir(run)
    assert rd.overrides() == ["experiment=c4_moeut_44m", "train.lr=1e-3"]
    assert rd.hydra_choices() == {"data": "c4"}
    assert rd.config() == {"data": {"source": "c4", "seq_len": "${train.t}"}}  # unresolved stays a string
    _write(ck / "config.yaml", "data:\n  source: slimpajama\n  seq_len: 512\n")
    assert rd.config(ck)["data"] == {"source": "slimpajama", "seq_len": 512}  # the checkpoint's wins
    assert rd.config_path(ck) == ck / "config.yaml" and rd.config_path() == run / ".hydra" / "config.yaml"
    assert RunDir(tmp_path / "run" / "checkpoints").overrides() == rd.overrides()
    empty = RunDir(_write(tmp_path / "empty" / "metrics.jsonl", "").parent)
    assert (empty.overrides(), empty.hydra_choices(), empty.config(), empty.metrics()) == ([], {}, None, [])
    _write(run / ".hydra" / "overrides.yaml", "- a=1\n- [b\n")
    with pytest.raises(CorruptRunFile, match=r"overrides\.yaml:\d+:\d+: not valid YAML"):
        rd.overrides()


@pytest.mark.parametrize("leaf, opaque", [("experiment=cpu_result_moeut,optim.lr=0.001", False), ("moeut_s0", False),
                                          ("2026-11-30_05-49-25", True), ("05-49-25", True), ("1234567", True),
                                          ("3", True), ("2026-11-30", False)])
def test_label_names_the_run_not_a_time_stamp(tmp_path, leaf, opaque):
    """Plot legends and compare tables: a meaningful folder name is kept; a time stamp, SLURM job
    id or multirun number gets its parent folder and the job's overrides."""
    run = _write(tmp_path / "cpu_result_moeut" / leaf / "metrics.jsonl", "").parent
    assert RunDir(run).label() == (f"cpu_result_moeut/{leaf}" if opaque else leaf)
    _write(run / ".hydra" / "overrides.yaml", "- optim.lr=1e-3\n- train.seed=1\n")
    assert RunDir(run).label() == (f"cpu_result_moeut/{leaf} (optim.lr=1e-3 train.seed=1)" if opaque else leaf)


def test_eval_files_and_latest_eval(tmp_path):
    run = tmp_path / "run"
    ours = {"tasks": {"piqa": {"accuracy": 0.5}}, "table_row": {}}
    _write(run / "eval" / "results_step_0000010.json", json.dumps({**ours, "step": 10}))
    _write(run / "eval" / "results_step_0000002.json", json.dumps({**ours, "step": 2}))
    _write(run / "eval" / "lm_eval.json", json.dumps({"results": {"piqa": {"acc,none": 0.6}}}))
    _write(run / "eval" / "results_step_0000003.json.tmp", "{half")  # an unfinished atomic write
    rd = RunDir(run)
    assert [p.name for p, _ in rd.eval_files()] == ["lm_eval.json", "results_step_0000002.json",
                                                    "results_step_0000010.json"]
    assert [p.name for p, _ in rd.eval_files(R.EVAL_RESULTS_GLOB)] == ["results_step_0000002.json",
                                                                       "results_step_0000010.json"]
    path, data = rd.latest_eval()
    assert path.name == "results_step_0000010.json" and data["step"] == 10
    assert RF.is_lm_eval(rd.eval_files()[0][1]) and not RF.is_moeut_eval(rd.eval_files()[0][1])
    assert RunDir(_write(tmp_path / "noeval" / "metrics.jsonl", "").parent).latest_eval() is None
    _write(run / "eval" / "results_step_0000011.json", '{"step": 11,')
    with pytest.raises(CorruptRunFile, match=r"results_step_0000011\.json:1:\d+: not valid JSON"):
        rd.latest_eval()


def test_step_time_file(tmp_path):
    rd = RunDir(_write(tmp_path / "run" / "metrics.jsonl", "").parent)
    assert rd.step_time() is None
    _write(rd.path / R.STEP_TIME_FILE, json.dumps({"step_time_s": 0.25}))
    assert rd.step_time() == 0.25
    _write(rd.path / R.STEP_TIME_FILE, json.dumps({"step_time_s": -1}))
    with pytest.raises(ValueError, match="step_time.json: needs a positive number under 'step_time_s'"):
        rd.step_time()


def test_model_config_newest_readable(tmp_path):
    run = tmp_path / "run"
    for step, text in ((1, json.dumps({"d_model": 1})), (2, json.dumps({"d_model": 2})), (3, '{"d_model": 3')):
        _write(run / "checkpoints" / f"step_{step:07d}" / "model_config.json", text)
    rd = RunDir(run)
    assert [Path(c).name for c in rd.checkpoints()] == ["step_0000001", "step_0000002", "step_0000003"]
    with pytest.warns(UserWarning, match=r"skipping unreadable checkpoint .*step_0000003.*model_config\.json"):
        ck, cfg = rd.model_config()
    assert Path(ck).name == "step_0000002" and cfg == {"d_model": 2}
    assert RunDir(_write(tmp_path / "none" / "metrics.jsonl", "").parent).model_config() is None


# ------------------------------------------------------------------------------------------
# The command lines of the run-dir readers (Hydra, issue 16 item 5)
# ------------------------------------------------------------------------------------------

CLIS = {sub: [sys.executable, "-m", "moeut.analysis", sub] for sub in ("summary", "compare", "curves", "table")}


def _cli(tool: str, *args: str, cwd: Path):
    import os
    import subprocess
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    return subprocess.run(CLIS[tool] + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("tool", sorted(CLIS))
def test_cli_help_lists_every_option(tmp_path, tool):
    """`--help` of each subcommand names every field of its schema (each with its help text)."""
    import importlib
    from moeut.analysis.__main__ import SUBCOMMANDS
    from moeut.cli import schema_options
    module = importlib.import_module(SUBCOMMANDS[tool][0])
    schema = next(v for k, v in vars(module).items() if k.endswith("Options") and isinstance(v, type))
    keys = [name for name, _, _, _ in schema_options(schema)]
    r = _cli(tool, "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    missing = [k for k in keys if f"{k}=" not in r.stdout]
    assert not missing, (tool, missing, r.stdout)
    assert list(tmp_path.iterdir()) == []


def test_cli_compare_plot_table_end_to_end(tmp_path):
    """compare, curves and table from the command line on a hand-made run: the files
    they promise, numbers from the run's files, named errors, and nothing else in the cwd."""
    from moeut.registry import get_preset
    run = tmp_path / "runs" / "r1"
    _write(run / "model_config.json", json.dumps(dict(vars(get_preset("cpu_dense", vocab_size=512)))))
    _write(run / "metrics.jsonl", _lines(GOOD))
    res = {"tasks": {"piqa": {"accuracy": 0.625}}, "table_row": {}, "arch": "moeut", "n_params": 44_100_000,
           "dataset": "C4", "val_perplexity": 12.345, "step": 2}
    _write(run / "eval" / "results_step_0000002.json", json.dumps(res))
    work = tmp_path / "work"
    work.mkdir()

    r = _cli("compare", f"runs=[{tmp_path}/runs/r*]", f"out={tmp_path}/cmp", "seq_len=32", "plot=false", cwd=work)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert [x["final_val_ppl"] for x in summary["runs"]] == [60.0] and summary["runs"][0]["steps"] == 2
    r = _cli("compare", f"runs=[{tmp_path}/nothing*]", cwd=work)
    assert r.returncode == 1 and "runs: pattern" in r.stderr and "matches nothing" in r.stderr
    # the files `summary` writes beside run dirs are not runs: left out with one line naming them
    (tmp_path / "runs" / "summary.csv").write_text("x\n")
    (tmp_path / "runs" / "ppl_vs_params.png").write_bytes(b"\x89PNG")
    r = _cli("compare", f"runs=[{tmp_path}/runs/*]", f"out={tmp_path}/cmp2", "seq_len=32", "plot=false", cwd=work)
    assert r.returncode == 0, r.stderr
    assert [json.loads((tmp_path / "cmp2" / "summary.json").read_text())["runs"][0]["path"]] == [str(run)]
    assert (f"warning: runs: pattern '{tmp_path}/runs/*' also matches 2 path(s) that are not run dirs, left out: "
            f"{tmp_path}/runs/ppl_vs_params.png, {tmp_path}/runs/summary.csv") in r.stderr
    r = _cli("curves", f"runs=[{tmp_path}/runs/*.*]", f"out={tmp_path}/fig/none", cwd=work)
    assert r.returncode == 1 and f"runs: pattern '{tmp_path}/runs/*.*' matches no run dirs, only " in r.stderr

    r = _cli("curves", f"runs=[{run}]", f"out={tmp_path}/fig/curves", "val_keys=[validation/val/perplexity]",
             "val_names=[held-out]", cwd=work)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "fig" / "curves.png").stat().st_size > 1000 and (tmp_path / "fig" / "curves.pdf").is_file()
    r = _cli("curves", f"runs=[{run}]", f"out={tmp_path}/fig/x", "labels=[a,b]", cwd=work)
    assert r.returncode == 1 and "labels: needs one label per run (1), got 2" in r.stderr

    r = _cli("table", f"results=[{tmp_path}/runs/*/eval/results_step_*.json]", cwd=work)
    assert r.returncode == 0, r.stderr
    assert "| C4 | 44M | MoEUT | 12.35 | – | – | – | – | 62.5 | – | 62.5* (1/6) |" in r.stdout
    r = _cli("table", f"results=[{run}/eval/results_step_0000002.json]", f"out={tmp_path}/tab/t", cwd=work)
    assert r.returncode == 0 and {p.suffix for p in (tmp_path / "tab").iterdir()} == {".md", ".csv", ".tex"}
    _write(run / "eval" / "results_step_0000003.json", '{"tasks": {}\n "x": 1}')
    r = _cli("table", f"results=[{run}/eval/results_step_0000003.json]", cwd=work)
    assert r.returncode == 1 and "results_step_0000003.json:2:2: not valid JSON" in r.stderr

    assert list(work.iterdir()) == []  # no outputs/, .hydra/ or log file left in the cwd


def test_eval_table_takes_results_files_or_run_dirs(tmp_path):
    """moeut.analysis.table.combine: a run dir means its newest results file (RunDir.latest_eval)."""
    from moeut.analysis import table as T
    run = tmp_path / "run"
    base = {"tasks": {"piqa": {"accuracy": 0.5}}, "table_row": {}, "arch": "dense", "n_params": 1_500_000,
            "dataset": "C4"}
    _write(run / "eval" / "results_step_0000004.json", json.dumps({**base, "step": 4, "val_perplexity": 40.0}))
    _write(run / "eval" / "results_step_0000009.json", json.dumps({**base, "step": 9, "val_perplexity": 30.0}))
    by_dir = T.combine([str(run)])
    assert by_dir == T.combine([str(run / "eval" / "results_step_0000009.json")])
    assert "| C4 | 1.5M | Baseline | 30.00 | – | – | – | – | 50.0 |" in by_dir
    _write(tmp_path / "empty" / "metrics.jsonl", "")
    with pytest.raises(FileNotFoundError, match=r"empty: no moeut.evaluate results in .*empty/eval"):
        T.combine([str(tmp_path / "empty")])


# ------------------------------------------------------------------------------------------
# The one validation-perplexity rule, and the run facts
# ------------------------------------------------------------------------------------------

def test_val_ppl_key_by_hand():
    key = R.val_ppl_key
    # the training corpus's own held-out set wins, under either name, whatever else is logged
    assert key(["validation/c4/perplexity", "validation/val/perplexity", "val/perplexity"]) == "validation/val/perplexity"
    assert key(["val/c4/perplexity", "val/perplexity"]) == "val/perplexity"
    # only other validation sets: the first in sorted order
    assert key(["validation/wiki/perplexity", "validation/c4/perplexity"]) == "validation/c4/perplexity"
    assert key(["valid/ppl"]) == "valid/ppl" and key(["val_perplexity"]) == "val_perplexity"
    # not validation perplexities
    assert key(["train/ppl", "moe/usage_rel_ppl_all", "validation/val/loss", "eval/perplexity"]) is None
    # a preferred key is taken as given, and only when logged (no silent fallback to another)
    assert key(["validation/val/perplexity", "x/ppl"], "x/ppl") == "x/ppl"
    assert key(["validation/val/perplexity"], "validation/c4/perplexity") is None


# Two hand-written runs on which the five former rules disagreed (the numbers each printed):
# - "legacy": older key names, the extra C4 set logged first: the former summary took the first
#   *sorted* val*/perplexity key, val/c4/perplexity (58.5); compare took the first key in file
#   order, also C4 (58.5); evaluation (zeroshot) ranked val/perplexity first (45.0).
# - "c4first": current names, the C4 set logged first in each record: compare took C4 (54.6), the
#   summary and evaluation took validation/val/perplexity (42.0).
# The training corpus's own held-out set is the number every table means: 45.0 and 42.0.
RULE_RUNS = {
    "legacy": [{"step": 50, "val/c4/perplexity": 117.0, "val/perplexity": 90.0},
               {"step": 100, "val/c4/perplexity": 58.5, "val/perplexity": 45.0}],
    "c4first": [{"step": 50, "validation/c4/perplexity": 110.5, "validation/val/perplexity": 85.0},
                {"step": 100, "validation/c4/perplexity": 54.6, "validation/val/perplexity": 42.0}],
}


@pytest.mark.parametrize("name, last, first", [("legacy", 45.0, 90.0), ("c4first", 42.0, 85.0)])
def test_every_reader_takes_the_one_validation_perplexity(tmp_path, name, last, first):
    from moeut.analysis import compare, summary
    from moeut.eval.zeroshot import read_val_perplexity
    from moeut.registry import get_preset
    run = tmp_path / "sweep" / name
    _write(run / "metrics.jsonl", _lines([{"step": 100, "train/loss": 3.9, "train/tokens_seen": 6400}]
                                         + RULE_RUNS[name]))
    _write(run / "model_config.json", json.dumps(dict(vars(get_preset("cpu_dense", vocab_size=512)))))
    assert RunDir(run).val_ppl_curve()[1] == [(50, first), (100, last)]
    row = summary.summarize_run(run, tmp_path / "sweep").row
    assert (row["val_ppl"], row["best_val_ppl"]) == (last, last)
    assert compare.load_run(str(run), seq_len=32).val == [(50, first), (100, last)]
    assert read_val_perplexity(str(run)) == last and read_val_perplexity(str(run), 50) == first


def test_run_facts_corpus_and_seq_len(tmp_path):
    run = tmp_path / "run"
    _write(run / ".hydra" / "config.yaml", "data:\n  source: slimpajama\n  seq_len: 256\n")
    _write(run / "metrics.jsonl", "")
    assert (RunDir(run).dataset(), RunDir(run).seq_len()) == ("SlimPajama", 256)
    _write(run / ".hydra" / "config.yaml", "data:\n  source: local\n  path: /data/gutenberg/train.jsonl.gz\n")
    assert (RunDir(run).dataset(), RunDir(run).seq_len()) == ("gutenberg", None)
    assert R.corpus_name({"source": "c4"}) == "C4" and R.corpus_name(None) is None
