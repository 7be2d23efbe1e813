"""The mutation-testing driver (tools/mutation.py, docs/testing.md): the curated list applies to this
checkout, covers every path that makes the numbers, and the driver reports a caught bug as killed and a
harmless change as survived (on a two-file fixture repository, not on the package)."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def _driver():
    spec = importlib.util.spec_from_file_location("mutation_driver", REPO / "tools" / "mutation.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


mutation = _driver()


def test_every_listed_mutant_applies_exactly_once():
    p = subprocess.run([sys.executable, "tools/mutation.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    mutants = mutation.load_mutants(REPO / "tools" / "mutants.toml")
    assert len(mutants) >= 60
    for m in mutants:
        assert m.original != m.replacement and not mutation.check_mutant(m, REPO), m.id


def test_the_list_covers_every_path_that_makes_the_numbers():
    files = {m.file for m in mutation.load_mutants(REPO / "tools" / "mutants.toml")}
    needed = {"moeut/model.py", "moeut/lm.py", "moeut/kernels/grouped.py", "moeut/kernels/cvmm.py",
              "moeut/train_lib/step.py", "moeut/train_lib/schedule.py", "moeut/train_lib/start.py",
              "moeut/train_lib/state.py", "moeut/train_lib/evaluate.py", "moeut/data/dataset.py",
              "moeut/eval/scoring.py", "moeut/checkpoint.py", "moeut/rundir.py", "moeut/analysis/routing.py",
              *(f"moeut/eval/tasks/{t}.py" for t in ("lambada", "blimp", "cbt", "hellaswag", "piqa", "arc",
                                                     "perplexity"))}
    assert needed <= files, sorted(needed - files)


def test_a_stale_mutant_is_reported_naming_it(tmp_path):
    (tmp_path / "mutants.toml").write_text(
        '[[mutant]]\nid = "gone"\nfile = "moeut/train_lib/schedule.py"\noriginal = "no such text"\n'
        'replacement = "x"\ntests = ["tests/unit/train/test_schedule.py"]\n')
    p = subprocess.run([sys.executable, "tools/mutation.py", "--check", "--mutants", str(tmp_path / "mutants.toml")],
                       cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 1
    assert "mutant gone: original text occurs 0 times in moeut/train_lib/schedule.py" in p.stderr


def test_a_malformed_list_is_one_error_line(tmp_path):
    (tmp_path / "m.toml").write_text('[[mutant]]\nid = "a"\nfile = "x.py"\n')
    p = subprocess.run([sys.executable, "tools/mutation.py", "--check", "--mutants", str(tmp_path / "m.toml")],
                       cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.startswith("mutation.py: error: ") and "missing key 'original'" in p.stderr


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_driver_reports_killed_survived_and_equivalent(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # the fixture needs no plugin: faster start
    repo = tmp_path / "fixture"
    repo.mkdir()
    (repo / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    (repo / "test_calc.py").write_text("from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n")
    (repo / "mutants.toml").write_text(
        '[[mutant]]\nid = "minus"\nfile = "calc.py"\noriginal = "a + b"\nreplacement = "a - b"\n'
        'tests = ["test_calc.py"]\n\n'
        '[[mutant]]\nid = "commuted"\nfile = "calc.py"\noriginal = "a + b"\nreplacement = "b + a"\n'
        'tests = ["test_calc.py"]\n\n'
        '[[mutant]]\nid = "listed-equivalent"\nfile = "calc.py"\noriginal = "a + b"\nreplacement = "(a + b)"\n'
        'tests = ["test_calc.py"]\nequivalent = "parentheses"\n')
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    out = tmp_path / "report"
    rc = mutation.main(["--root", str(repo), "--mutants", str(repo / "mutants.toml"), "--out", str(out),
                        "--timeout", "120"])
    rep = json.loads((out / "report.json").read_text())
    status = {m["id"]: m["status"] for m in rep["mutants"]}
    assert status == {"minus": "killed", "commuted": "survived", "listed-equivalent": "equivalent"}
    assert rc == 1  # a survivor fails the run
    assert rep["killed"] == 1 and rep["ran"] == 2 and rep["kill_rate"] == 0.5
    assert "| commuted | calc.py | survived |" in (out / "report.md").read_text()
    # the working tree is never touched: the mutants ran in a copy
    assert (repo / "calc.py").read_text() == "def add(a, b):\n    return a + b\n"
    # --only with a killed mutant exits 0
    assert mutation.main(["--root", str(repo), "--mutants", str(repo / "mutants.toml"), "--out", str(out),
                          "--only", "minus", "--no-baseline"]) == 0


def test_merge_combines_partial_runs_later_file_wins(tmp_path):
    toml = tmp_path / "m.toml"
    toml.write_text("".join(f'[[mutant]]\nid = "{i}"\nfile = "f.py"\noriginal = "a"\nreplacement = "b"\n'
                            f'tests = ["t.py"]\n\n' for i in ("m1", "m2", "m3")))
    (tmp_path / "a.json").write_text(json.dumps({"mutants": [{"id": "m1", "status": "survived"},
                                                             {"id": "m2", "status": "killed"}]}))
    (tmp_path / "b.json").write_text(json.dumps({"mutants": [{"id": "m1", "status": "killed"},
                                                             {"id": "m3", "status": "skipped"}]}))
    out = tmp_path / "out"
    rc = mutation.main(["--mutants", str(toml), "--root", str(tmp_path), "--out", str(out),
                        "--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    rep = json.loads((out / "report.json").read_text())
    assert {m["id"]: m["status"] for m in rep["mutants"]} == {"m1": "killed", "m2": "killed", "m3": "not run"}
    assert rc == 1 and rep["killed"] == 2 and rep["ran"] == 2  # m3 was never run: the merge is incomplete
