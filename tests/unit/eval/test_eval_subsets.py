"""The zero-shot subsets carried in data/eval (data/eval/README.md): their sha256, the documented
cut (the first N items of the full files, byte for byte), their gold labels against the raw files'
own fields, and `python -m moeut.evaluate` on a fresh clone giving a table from them."""
import bz2
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EVAL, shared_or_skip
from eval_fakes import make_tiny_run
from moeut.eval.tasks import get_task
from moeut.eval.tasks.base import CARRIED, FULL, EvalOptions, carried_data_dir
from moeut.eval.tasks.blimp import PARADIGMS
from moeut.paths import data_dir

REPO = Path(__file__).resolve().parents[3]
CARRIED_DIR = REPO / "data" / "eval"
# carried file -> (its full file under shared/data/eval, lines carried)
CUT = {"lambada/lambada_test.jsonl": ("lambada/lambada_test.jsonl", 300),
       "piqa/valid.jsonl": ("piqa/valid.jsonl", 300),
       "piqa/valid-labels.lst": ("piqa/valid-labels.lst", 300),
       "arc/ARC-Easy-Test.jsonl": ("arc/ARC-Easy-Test.jsonl", 300),
       "hellaswag/hellaswag_val_full.txt": ("hellaswag/hellaswag_val_full.txt.bz2", 1800),
       **{f"blimp/{p}.jsonl": (f"blimp/{p}.jsonl", 10) for p in PARADIGMS}}


def test_carried_dir_is_the_package_data_dir():
    assert carried_data_dir() == data_dir() / "eval" == CARRIED_DIR


def test_readme_lists_every_file_with_its_sha256():
    rows = re.findall(r"^\| `([^`]+)` \| (\d+) \| ([\d,]+) \| `([0-9a-f]{64})` \|$",
                      (CARRIED_DIR / "README.md").read_text(), re.M)
    on_disk = sorted(str(p.relative_to(CARRIED_DIR)) for p in CARRIED_DIR.rglob("*")
                     if p.is_file() and p.name != "README.md")
    assert sorted(r[0] for r in rows) == on_disk == sorted(CUT)
    total = 0
    for rel, lines, size, sha in rows:
        data = (CARRIED_DIR / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha, rel
        assert (data.count(b"\n"), len(data)) == (int(lines), int(size.replace(",", ""))), rel
        assert data.count(b"\n") == CUT[rel][1], rel  # the documented item counts
        total += len(data)
    assert total < 1_500_000 and f"Total: {total:,} bytes in {len(rows)} files." in (CARRIED_DIR / "README.md").read_text()


def test_carried_files_are_the_first_items_of_the_full_files():
    shared_or_skip(EVAL)
    for rel, (src, n) in CUT.items():
        full = shared_or_skip(EVAL / src).read_bytes()
        if src.endswith(".bz2"):
            full = bz2.decompress(full)
        assert (CARRIED_DIR / rel).read_bytes() == b"".join(full.splitlines(True)[:n]), rel


def test_gold_labels_against_the_raw_fields():
    """Each loader's gold on the carried files against the raw field it comes from, parsed here
    without the loader: PIQA's labels file, ARC's answerKey among the choice labels, HellaSwag's
    label line (the 2nd of each 6-line item); BLiMP's good sentence is option 0."""
    opts = EvalOptions(data_dir=str(CARRIED_DIR))
    piqa = get_task("piqa").load(opts)
    labels = (CARRIED_DIR / "piqa" / "valid-labels.lst").read_text().split()
    raw = [json.loads(line) for line in (CARRIED_DIR / "piqa" / "valid.jsonl").read_text().splitlines()]
    assert len(piqa) == 300 and [it.gold for it in piqa] == [int(x) for x in labels]
    assert [it.options[it.gold] for it in piqa] == [" " + r[f"sol{int(x) + 1}"] for r, x in zip(raw, labels)]
    arc = get_task("arc_easy").load(opts)
    raw = [json.loads(line) for line in (CARRIED_DIR / "arc" / "ARC-Easy-Test.jsonl").read_text().splitlines()]
    raw4 = [r for r in raw if len(r["question"]["choices"]) == 4]
    assert len(arc) == len(raw4) == 299
    for it, r in zip(arc, raw4):
        gold = next(c["text"] for c in r["question"]["choices"] if c["label"] == r["answerKey"])
        assert (it.id, it.options[it.gold]) == (r["id"], " " + gold)
    hs = get_task("hellaswag").load(opts)
    lines = (CARRIED_DIR / "hellaswag" / "hellaswag_val_full.txt").read_text().splitlines()
    assert len(hs) == 300 and [it.gold for it in hs] == [int(lines[6 * k + 1]) for k in range(300)]
    blimp = get_task("blimp").load(opts)
    assert len(blimp) == 670 and {it.group for it in blimp} == set(PARADIGMS)
    first = json.loads((CARRIED_DIR / "blimp" / "adjunct_island.jsonl").read_text().splitlines()[0])
    assert blimp[0].options == [first["sentence_good"], first["sentence_bad"]] and blimp[0].gold == 0


def test_lookup_rule(monkeypatch, tmp_path):
    """Full sets where present, else (no data_dir, no paths.<task>) the carried subset; an
    explicit data_dir or paths.<task> is never replaced by the subset."""
    lam = get_task("lambada")
    monkeypatch.setenv("MOEUT_SHARED", str(tmp_path / "nothing"))
    items, origin = lam.load_items(EvalOptions(limit=3))
    assert origin == {"data": CARRIED, "data_from": str(CARRIED_DIR)} and len(items) == 3
    assert lam.load_items(EvalOptions(data_dir=str(CARRIED_DIR)))[1]["data"] == CARRIED
    with pytest.raises(FileNotFoundError, match=f"file not found: {tmp_path}/lambada/lambada_test.jsonl"):
        lam.load_items(EvalOptions(data_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        lam.load_items(EvalOptions(paths={"lambada": str(tmp_path / "nope.jsonl")}))
    full = tmp_path / "shared" / "data" / "eval" / "lambada"
    full.mkdir(parents=True)
    (full / "lambada_test.jsonl").write_text(json.dumps({"text": "a full set passage"}) + "\n")
    monkeypatch.setenv("MOEUT_SHARED", str(tmp_path / "shared"))
    items, origin = lam.load_items(EvalOptions())
    assert origin == {"data": FULL, "data_from": str(tmp_path / "shared" / "data" / "eval")}
    assert [it["text"] for it in items] == ["a full set passage"]


def test_fresh_clone_evaluate_gives_a_table(tmp_path):
    """`python -m moeut.evaluate checkpoint=<run>` with nothing beside the clone: every task with a
    carried subset is scored on all of it, CBT is skipped on one line, the table and the results
    JSON say "carried subset" with the item counts."""
    run_dir, _, _ = make_tiny_run(tmp_path)
    env = dict(os.environ, MOEUT_SHARED="/nonexistent", MOEUT_DATA="/nonexistent")
    r = subprocess.run([sys.executable, "-m", "moeut.evaluate", f"checkpoint={run_dir}", "progress=false",
                        "batch_size=64"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    counts = {"lambada": 300, "blimp": 670, "hellaswag": 300, "piqa": 300, "arc_easy": 299}
    res = json.loads((run_dir / "eval" / "results_step_0000050.json").read_text())
    for name, n in counts.items():
        t = res["tasks"][name]
        assert (t["n_items"], t["data"], t["limit"]) == (n, CARRIED, None), name
    assert "skipped" in res["tasks"]["cbt"] and "skipped" in res["tasks"]["arc_challenge"]
    assert (f"moeut.evaluate: task data: lambada CARRIED SUBSET (300 items), blimp CARRIED SUBSET (670 items), "
            "hellaswag CARRIED SUBSET (300 items), piqa CARRIED SUBSET (300 items), arc_easy CARRIED SUBSET "
            "(299 items); carried subsets (data/eval) are a few hundred items per task: not the paper's numbers"
            ) in r.stdout.splitlines()
    md = (run_dir / "eval" / "table_step_0000050.md").read_text().splitlines()
    cells = dict(zip([c.strip() for c in md[0].strip("|").split("|")], [c.strip() for c in md[2].strip("|").split("|")]))
    for col, name in (("LAMBADA", "lambada"), ("BLiMP", "blimp"), ("HellaSwag", "hellaswag"), ("PIQA", "piqa"),
                      ("ARC-E", "arc_easy")):
        assert cells[col] == f"{100 * res['tasks'][name]['accuracy']:.1f}", col
    assert (cells["CBT"], cells["eval data"]) == ("skipped", "carried subset")
    assert ("- run: LAMBADA 300 items (carried subset), BLiMP 670 items (carried subset), HellaSwag 300 items "
            "(carried subset), PIQA 300 items (carried subset), ARC-E 299 items (carried subset)") in md
    assert [line for line in r.stderr.splitlines() if "skipped, data missing" in line] == [
        "moeut.evaluate: warning: cbt: skipped, data missing: no CBT test files (cbtest_{CN,NE,P,V}_test_2500ex.txt) "
        "in /nonexistent/data/eval/cbt; extract CBTest.tgz there or pass paths.cbt=<dir>",
        "moeut.evaluate: warning: arc_challenge: skipped, data missing: ARC-Challenge: file not found "
        "(/nonexistent/data/eval/arc/ARC-Challenge-Test.jsonl); pass paths.arc_challenge=<path to ARC-Challenge-Test.jsonl>"]
