"""Every `moeut.evaluate` run keeps its own results file; tables, the summary and compare read
a checkpoint's evaluations merged per task by moeut.rundir's rule (newest evaluation that scored
the task wins; a newer skip never hides an older number), and say when the merged cells differ in
what they scored. Data: the carried subsets (fresh-clone mode), so this runs anywhere."""
import json
from pathlib import Path

import pytest

from eval_fakes import make_tiny_run
from moeut import results_files as RF
from moeut import rundir as R
from moeut.analysis import table as T

REPO = Path(__file__).resolve().parents[3]


def compose(overrides):
    """The checked options of `python -m moeut.evaluate <overrides>`."""
    from moeut.cli import typed_options
    from moeut.evaluate import EvaluateOptions
    return typed_options(EvaluateOptions, overrides, "moeut.evaluate")


@pytest.fixture(scope="module")
def three_evaluations(tmp_path_factory):
    """One checkpoint evaluated three times: piqa+arc_easy limit=10, then lambada limit=10 (other
    tasks), then piqa limit=20 (the same task, another limit)."""
    from moeut.evaluate import run
    mp = pytest.MonkeyPatch()
    mp.setenv("MOEUT_SHARED", "/nonexistent")  # fresh-clone mode: the carried subsets
    try:
        run_dir, _, _ = make_tiny_run(tmp_path_factory.mktemp("evals"))
        results = [run(compose([f"checkpoint={run_dir}", f"tasks=[{tasks}]", f"limit={limit}", "progress=false",
                                "dataset=gen"]))
                   for tasks, limit in (("piqa,arc_easy", 10), ("lambada", 10), ("piqa", 20))]
    finally:
        mp.undo()
    return run_dir, results


def test_every_evaluation_survives_on_disk(three_evaluations):
    run_dir, results = three_evaluations
    ev = run_dir / "eval"
    names = ["results_step_0000050.json", "results_step_0000050.2.json", "results_step_0000050.3.json"]
    assert sorted(p.name for p in ev.glob("results_*.json")) == sorted(names)
    assert [r["files"]["json"] for r in results] == [str(ev / n) for n in names]
    on_disk = [json.loads((ev / n).read_text()) for n in names]
    # each file holds exactly its own evaluation's numbers and item counts
    assert set(on_disk[0]["tasks"]) == {"piqa", "arc_easy"} and set(on_disk[1]["tasks"]) == {"lambada"}
    assert set(on_disk[2]["tasks"]) == {"piqa"}
    for res, saved in zip(results, on_disk):
        for name, t in res["tasks"].items():
            assert saved["tasks"][name]["accuracy"] == t["accuracy"]
    assert (on_disk[0]["tasks"]["piqa"]["n_items"], on_disk[0]["tasks"]["piqa"]["limit"]) == (10, 10)
    assert (on_disk[2]["tasks"]["piqa"]["n_items"], on_disk[2]["tasks"]["piqa"]["limit"]) == (20, 20)
    assert on_disk[0]["tasks"]["piqa"]["data"] == "carried subset"
    assert on_disk[0]["tasks"]["piqa"]["data_from"] == str(REPO / "data" / "eval")


def test_table_follows_the_rule(three_evaluations):
    """The table after the third run, against the rule written out by hand: PIQA from evaluation 3
    (20 items), ARC-E from evaluation 1, LAMBADA from evaluation 2; cells of different limits, so
    the "eval data" column reads "mixed" and a note gives each cell's items and file."""
    run_dir, results = three_evaluations
    acc = {"piqa": results[2]["tasks"]["piqa"]["accuracy"], "arc_easy": results[0]["tasks"]["arc_easy"]["accuracy"],
           "lambada": results[1]["tasks"]["lambada"]["accuracy"]}
    avg = 100 * sum(acc.values()) / 3
    expect_row = (f"| gen | 0.2M | MoEUT | – | {100 * acc['lambada']:.1f} | – | – | – | {100 * acc['piqa']:.1f} | "
                  f"{100 * acc['arc_easy']:.1f} | {avg:.1f}* (3/6) | mixed |")
    expect_note = ("- run: LAMBADA 10 items (carried subset, limit=10; results_step_0000050.2.json), "
                   "PIQA 20 items (carried subset, limit=20; results_step_0000050.3.json), "
                   "ARC-E 10 items (carried subset, limit=10; results_step_0000050.json)")
    md = (run_dir / "eval" / "table_step_0000050.md").read_text().splitlines()
    assert md[0] == ("| dataset | #params | model | val PPL | LAMBADA | BLiMP | CBT | HellaSwag | PIQA | ARC-E | "
                     "Average | eval data |")
    assert md[2] == expect_row and md[3:] == ["", expect_note]
    # the same table from the run dir through moeut.analysis.table (RunDir.latest_eval)
    assert T.combine([str(run_dir)]).splitlines() == md
    # one results file stands for that evaluation alone: evaluation 1's PIQA on 10 items
    row1 = T.combine([str(run_dir / "eval" / "results_step_0000050.json")]).splitlines()[2]
    assert f"| {100 * results[0]['tasks']['piqa']['accuracy']:.1f} |" in row1 and row1.endswith("| carried subset, limit=10 |")


def test_summary_and_compare_read_the_merged_evaluation(three_evaluations):
    from moeut.analysis import compare, summary as summ
    run_dir, results = three_evaluations
    row = summ.summarize_run(run_dir, run_dir.parent).row
    assert row["eval/piqa"] == results[2]["tasks"]["piqa"]["accuracy"]
    assert row["eval/arc_easy"] == results[0]["tasks"]["arc_easy"]["accuracy"]
    assert row["eval/lambada"] == results[1]["tasks"]["lambada"]["accuracy"]
    assert (row["eval_limit"], row["eval_data"]) == ("mixed", "carried subset")
    run = compare.load_run(str(run_dir))
    assert run.eval["piqa/accuracy"] == results[2]["tasks"]["piqa"]["accuracy"]
    assert run.eval["piqa/n_items"] == 20 and run.eval["arc_easy/n_items"] == 10


def _res(step, **tasks):
    return {"step": step, "table_row": {}, "options": {"limit": None}, "tasks": tasks}


def test_merge_rule_by_hand(tmp_path):
    """merge_evals/latest_eval on hand-written files: newest evaluation per task; a skip never
    hides an earlier number; only the newest evaluated step counts; write_eval_results numbers
    new files and never replaces one."""
    ev = tmp_path / "run" / "eval"
    ev.mkdir(parents=True)
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    p1 = RF.write_eval_results(ev, "step_0000010", _res(10, piqa={"accuracy": 0.5, "n_items": 100},
                                                      cbt={"skipped": "no files"}))
    p2 = RF.write_eval_results(ev, "step_0000010", _res(10, piqa={"skipped": "gone"}, cbt={"accuracy": 0.3},
                                                      blimp={"accuracy": 0.7, "limit": 5}))
    p3 = RF.write_eval_results(ev, "step_0000010", _res(10, blimp={"accuracy": 0.8, "limit": None}))
    RF.write_eval_results(ev, "step_0000004", _res(4, lambada={"accuracy": 0.9}))
    assert [p.name for p in (p1, p2, p3)] == ["results_step_0000010.json", "results_step_0000010.2.json",
                                            "results_step_0000010.3.json"]
    assert json.loads(p1.read_text())["tasks"]["piqa"]["accuracy"] == 0.5  # untouched by later writes
    path, merged = R.RunDir(tmp_path / "run").latest_eval()
    assert path == p3
    assert merged["tasks"] == {
        "piqa": {"accuracy": 0.5, "n_items": 100, "limit": None, "results_file": p1.name},  # skip in 2 ignored
        "cbt": {"accuracy": 0.3, "limit": None, "results_file": p2.name},  # 2's number beats 1's skip
        "blimp": {"accuracy": 0.8, "limit": None, "results_file": p3.name},  # newest wins
    }  # lambada: step 4 is not the newest evaluated step
    assert merged["evaluations"] == [p1.name, p2.name, p3.name]
    assert not list(ev.glob(".*tmp"))


def test_shared_out_dir_does_not_merge_other_checkpoints(three_evaluations, tmp_path, monkeypatch):
    """Another run's checkpoint (same step) evaluated into the same folder: its file is added, not
    merged into the first run's table, and its table holds only its own evaluation."""
    from moeut.evaluate import run
    first, _ = three_evaluations
    monkeypatch.setenv("MOEUT_SHARED", "/nonexistent")
    other, _, _ = make_tiny_run(tmp_path, preset="tiny", vocab_size=100)
    out = tmp_path / "shared_out"
    import shutil
    shutil.copytree(first / "eval", out)
    res = run(compose([f"checkpoint={other}", "tasks=[lambada]", "limit=2", "progress=false", f"out_dir={out}"]))
    assert Path(res["files"]["json"]).name == "results_step_0000050.4.json"
    assert res["merged"]["evaluations"] == ["results_step_0000050.4.json"]
    row = (out / "table_step_0000050.md").read_text().splitlines()[2]
    assert row.endswith(f"| {100 * res['tasks']['lambada']['accuracy']:.1f} | – | – | – | – | – | "
                        f"{100 * res['tasks']['lambada']['accuracy']:.1f}* (1/6) | carried subset, limit=2 |")
