"""Zero-shot evaluation during training, profiles and provenance (docs/training.md): the scores
equal `moeut.evaluate` on the same checkpoint, each zero-shot point is logged once across a
resume (and training is unchanged by it), the profile covers exactly the asked steps, the
provenance matches git, and the summary/compare tables show the commit."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moeut import provenance
from moeut.cli import typed_options
from moeut.evaluate import EvaluateOptions, run as evaluate_run
from moeut.rundir import RunDir
from test_train import GENERAL, REPO, _cli, _subprocess_env, logged, metrics, run, tiny_cfg, torchrun

ZS = ("train.zeroshot.interval=2", "train.zeroshot.tasks=[lambada,piqa]", "train.zeroshot.limit=4",
      "train.save_interval=100", "train.keep_last=10")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def zs_records(run_dir):
    return [r for r in metrics(run_dir) if any(k.startswith("zeroshot/") for k in r)]


def without_seconds(tasks):
    return {t: {k: v for k, v in m.items() if k != "seconds"} for t, m in tasks.items()}


def test_zeroshot_during_training_equals_the_evaluate_command(cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    run(cache_dir, run_dir, "train.steps=4", *ZS)
    recs = zs_records(run_dir)
    assert [r["step"] for r in recs] == [2, 4]
    # a checkpoint was saved at each zero-shot step although train.save_interval=100
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    for step in (2, 4):
        ckpt = run_dir / "checkpoints" / f"step_{step:07d}"
        during = json.loads((run_dir / "eval" / f"results_step_{step:07d}.json").read_text())
        assert during["step"] == step and during["checkpoint"] == str(ckpt)
        cfg = typed_options(EvaluateOptions, [f"checkpoint={ckpt}", "tasks=[lambada,piqa]", "limit=4",
                                              "device=cpu", "progress=false"], "moeut.evaluate")
        after = evaluate_run(cfg)  # the command, afterwards: results_step_N.2.json
        assert Path(after["files"]["json"]).name == f"results_step_{step:07d}.2.json"
        assert without_seconds(after["tasks"]) == without_seconds(during["tasks"])  # exactly
        if step == 4:  # validated at this step (the final validation precedes the evaluation)
            assert after["val_perplexity"] == during["val_perplexity"] is not None
        rec = next(r for r in recs if r["step"] == step)
        for task in ("lambada", "piqa"):
            assert rec[f"zeroshot/{task}/accuracy"] == after["tasks"][task]["accuracy"]
            assert after["tasks"][task]["n_items"] == 4
    assert len(provenance.read_provenance(run_dir)) == 1


def test_zeroshot_points_logged_once_across_resumes_and_training_unchanged(cache_dir, tmp_path):
    common = ("train.steps=6", *GENERAL, *ZS)
    run(cache_dir, tmp_path / "plain", "train.steps=6", *GENERAL, "train.save_interval=100")
    full = run(cache_dir, tmp_path / "full", *common)
    plain_train = [r for r in logged(tmp_path / "plain") if "train/loss" in r]
    assert [r for r in logged(tmp_path / "full") if "train/loss" in r] == plain_train  # RNG untouched
    split = tmp_path / "split"
    run(cache_dir, split, *common, "train.stop_at=2")  # stops on a zero-shot step: evaluated before exiting
    run(cache_dir, split, *common, "train.stop_at=4")  # resume: step 2 not evaluated again
    # a stop between the step-4 checkpoint and its evaluation (a signal): drop that record
    lines = (split / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert "zeroshot/" in lines[-1] and json.loads(lines[-1])["step"] == 4
    (split / "metrics.jsonl").write_text("".join(lines[:-1]))
    rest = run(cache_dir, split, *common)  # the resume evaluates step 4 first, then goes on
    assert rest["losses"] == full["losses"][4:]
    assert [r["step"] for r in zs_records(split)] == [2, 4, 6]
    assert logged(split) == logged(tmp_path / "full")
    assert [r["start_step"] for r in provenance.read_provenance(split)] == [0, 2, 4]


@pytest.mark.slow
def test_zeroshot_under_two_gloo_processes(cache_dir, tmp_path):
    """torchrun, 2 gloo processes: rank 0 evaluates, rank 1 waits; each point logged and written once."""
    run(cache_dir, tmp_path / "warm", "train.steps=4")  # tokenizer + shards (of this budget) for the subprocesses
    run_dir = tmp_path / "ddp"
    cli = _cli(cache_dir, run_dir, "train.steps=4", "train.log_interval=1", *ZS)
    p = torchrun(["train.py", *cli], _subprocess_env(cache_dir), timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert [r["step"] for r in zs_records(run_dir)] == [2, 4]
    assert sorted(f.name for f in (run_dir / "eval").glob("results_*.json")) == [
        "results_step_0000002.json", "results_step_0000004.json"]
    (rec,) = provenance.read_provenance(run_dir)
    assert rec["world_size"] == 2 and rec["argv"][0].endswith("train.py") and rec["argv"][1:] == cli


def test_profile_covers_exactly_the_asked_steps(cache_dir, tmp_path):
    plain = run(cache_dir, tmp_path / "plain", "train.steps=4")
    res = run(cache_dir, tmp_path / "prof", "train.steps=4", "train.profile.start=2", "train.profile.end=3")
    assert res["losses"] == plain["losses"]  # profiling changes no number
    out = tmp_path / "prof" / "profile"
    trace = json.loads((out / "trace.json").read_text())
    names = [e["name"] for e in trace["traceEvents"] if e.get("ph") == "X"]
    assert sorted(n for n in names if n.startswith("train_step#")) == ["train_step#2", "train_step#3"]
    assert "aten::mm" in names
    table = (out / "top_ops.md").read_text()
    mm = next(line for line in table.splitlines() if line.strip().startswith("aten::mm "))
    assert "ms" in mm or "us" in mm
    mem = json.loads((out / "memory_timeline.json").read_text())
    assert [s["step"] for s in mem["steps"]] == [2, 3] and mem["steps_profiled"] == [2, 3]
    for s in mem["steps"]:
        assert s["n_events"] > 0 and s["peak_bytes"] > 0
        inside = [e for e in mem["events"] if s["start_us"] <= e[0] <= s["end_us"]]
        assert s["peak_bytes"] == max(e[2] for e in inside)


@pytest.mark.parametrize("overrides, key", [
    (("train.profile.start=3", "train.profile.end=2"), "train.profile"),
    (("train.profile.start=9",), "train.profile"),
    (("train.profile.end=2",), "train.profile.end"),
    (("train.zeroshot.interval=2", "train.zeroshot.tasks=[nosuchtask]"), "train.zeroshot.tasks"),
    (("train.zeroshot.interval=-1",), "train.zeroshot.interval"),
])
def test_bad_profile_and_zeroshot_options_are_refused(cache_dir, overrides, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        tiny_cfg(cache_dir, "train.steps=4", *overrides)


def _git(*args):
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout


def test_provenance_matches_git_and_appends(tmp_path):
    rec = provenance.record_provenance(str(tmp_path), step=0, root=REPO)
    assert rec["git"]["commit"] == _git("rev-parse", "HEAD").strip()
    status = [ln for ln in _git("status", "--porcelain").splitlines() if ln]
    assert rec["git"]["dirty"] == bool(status) and rec["git"]["status"] == status
    if status:
        assert (tmp_path / rec["git"]["diff_file"]).read_text() == _git("diff", "HEAD")
    rec2 = provenance.record_provenance(str(tmp_path), step=7, root=REPO)
    recs = provenance.read_provenance(tmp_path)
    assert [r["start_step"] for r in recs] == [0, 7] and recs[1]["argv"] == sys.argv
    if status:
        assert rec2["git"]["diff_file"] == "provenance/diff_2.patch"
    import torch
    assert recs[0]["packages"]["torch"] == torch.__version__


def test_provenance_outside_a_git_checkout(tmp_path):
    pkg = tmp_path / "site"
    shutil.copytree(REPO / "moeut", pkg / "moeut", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "run").mkdir()
    rec = provenance.record_provenance(str(tmp_path / "run"), step=0, root=pkg)
    assert rec["git"] is None and "not" in rec["git_error"]
    assert RunDir(tmp_path / "run").commit() == f"no git (moeut {rec['packages']['moeut']})"


def _hand_run(run_dir: Path, commit: str, dirty: bool):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 10, "validation/val/perplexity": 50.0}) + "\n")
    (run_dir / "provenance.jsonl").write_text(json.dumps({"start_step": 0, "git": {"commit": commit, "dirty": dirty},
                                                          "packages": {}}) + "\n")


def test_summary_and_compare_tables_show_the_commit(tmp_path):
    from moeut.analysis.summary import summarize_run, to_markdown
    _hand_run(tmp_path / "a", "0123456789abcdef0123456789abcdef01234567", False)
    _hand_run(tmp_path / "b", "fedcba9876543210fedcba9876543210fedcba98", True)
    rows = [summarize_run(tmp_path / n, tmp_path).row for n in ("a", "b")]
    table = to_markdown(rows)
    assert table.splitlines()[0].startswith("| run | commit |")
    assert "| a | 0123456 |" in table and "| b | fedcba9-dirty |" in table
    sys.path.insert(0, str(REPO))
    from moeut.analysis.compare import Run, summary_rows
    header, body = summary_rows([Run(name="a", path=str(tmp_path / "a"), commit="0123456")])
    assert header[:2] == ["run", "commit"] and body[0][:2] == ["a", "0123456"]
    assert RunDir(tmp_path / "b").commit() == "fedcba9-dirty"


def test_failed_zeroshot_evaluation_warns_and_training_goes_on(cache_dir, tmp_path, monkeypatch):
    import moeut.train_lib.loop as loop

    def no_data(ckpt, tasks, limit, device):
        raise FileNotFoundError("lambada: no task data")
    monkeypatch.setattr(loop, "evaluate_saved_checkpoint", no_data)
    plain = run(cache_dir, tmp_path / "plain", "train.steps=4", "train.save_interval=100")
    res = run(cache_dir, tmp_path / "run", "train.steps=4", *ZS)
    assert res["status"] == "finished" and res["losses"] == plain["losses"] and not zs_records(tmp_path / "run")
    log = (tmp_path / "run" / "train.log").read_text()
    assert "train.zeroshot: step 2 not evaluated: lambada: no task data" in log and "step 4 not evaluated" in log


def test_git_state_outside_a_checkout_says_why_in_plain_words(tmp_path):
    """Not a git checkout: the reason is git's own first line, not a Python list."""
    err = provenance.git_state(tmp_path)["error"]
    assert err.startswith(f"{tmp_path}: not a git checkout (fatal: not a git repository")
    assert "['" not in err
