"""Every zero-shot loader's gold label and input construction checked against the raw files' own fields
(SPEC 6.2), parsed here independently with `json` / line splitting: on small hand-written files in each
official format (always run, no data needed), and on the real sets in $MOEUT_SHARED/data/eval when present."""
import bz2
import json

import pytest

from moeut.eval.tasks import EvalOptions, get_task
from moeut.eval.tasks.cbt import detokenize, parse_cbt_file

from conftest import EVAL


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def load(task, root, **kw):
    return get_task(task).load_local(EvalOptions(data_dir=str(root), **kw))


# --------------------------------------------------------------------------- hand-written files

def test_blimp_gold_is_the_good_sentence(tmp_path):
    recs = [{"sentence_good": f"Good {i}.", "sentence_bad": f"Bad {i}."} for i in range(3)]
    write_jsonl(tmp_path / "blimp" / "adjunct_island.jsonl", recs)
    with pytest.warns(UserWarning, match="paradigm files missing"):
        items = load("blimp", tmp_path)
    assert [(it.context, it.options[it.gold], it.group) for it in items] == \
        [("", f"Good {i}.", "adjunct_island") for i in range(3)]
    assert all(len(it.options) == 2 and it.options[1 - it.gold] == f"Bad {i}." for i, it in enumerate(items))


def test_piqa_gold_is_the_labelled_solution(tmp_path):
    recs = [{"goal": f" goal {i} ", "sol1": f"first {i}", "sol2": f"second {i}"} for i in range(4)]
    write_jsonl(tmp_path / "piqa" / "valid.jsonl", recs)
    labels = [1, 0, 0, 1]
    (tmp_path / "piqa" / "valid-labels.lst").write_text("".join(f"{x}\n" for x in labels))
    items = load("piqa", tmp_path)
    for i, (it, lab) in enumerate(zip(items, labels)):
        assert it.context == f"Question: goal {i}\nAnswer:"
        assert it.options == [f" first {i}", f" second {i}"]
        assert it.options[it.gold] == " " + recs[i][f"sol{lab + 1}"]


def test_arc_gold_is_the_choice_whose_label_is_the_answer_key(tmp_path):
    def q(i, labels, key, n=4):
        return {"id": f"q{i}", "answerKey": key, "question": {"stem": f"Stem {i}?", "choices": [
            {"label": lab, "text": f"text {i}{lab}"} for lab in labels[:n]]}}
    recs = [q(0, "ABCD", "C"), q(1, ["1", "2", "3", "4"], "2"), q(2, "ABCDE", "E", 5), q(3, "ABC", "A", 3),
            q(4, "BADC", "A"), q(5, "ABCD", "D")]
    write_jsonl(tmp_path / "arc" / "ARC-Easy-Test.jsonl", recs)
    with pytest.warns(UserWarning, match="skipped 2 question"):
        items = load("arc_easy", tmp_path)
    kept = [r for r in recs if len(r["question"]["choices"]) == 4]
    assert [it.id for it in items] == [r["id"] for r in kept]
    for it, r in zip(items, kept):
        assert it.context == f"Question: {r['question']['stem']}\nAnswer:"
        gold_text = next(c["text"] for c in r["question"]["choices"] if c["label"] == r["answerKey"])
        assert it.options[it.gold] == " " + gold_text
        assert it.options == [" " + c["text"] for c in r["question"]["choices"]]


def test_hellaswag_official_jsonl_gold_and_context(tmp_path):
    recs = [{"ind": 7, "activity_label": "Baking cookies", "ctx_a": "A man mixes flour.", "ctx_b": "then he",
             "endings": ["pours milk.", "sings.", "sleeps.", "runs [title] away."], "label": 3},
            {"ind": 8, "activity_label": "Sports", "ctx_a": "A ball rolls.", "ctx_b": "",
             "endings": ["a", "b", "c", "d"], "label": "1"}]
    write_jsonl(tmp_path / "hellaswag" / "hellaswag_val.jsonl", recs)
    items = load("hellaswag", tmp_path)
    assert items[0].context == "Baking cookies: A man mixes flour. Then he"
    assert items[0].options[items[0].gold] == " runs. away."  # " [title]" -> ". ", then "  " -> " "
    assert items[1].gold == 1 and items[1].options[1] == " b"
    assert [it.id for it in items] == [7, 8]


def test_hellaswag_derived_text_gold_is_the_label_line(tmp_path):
    lines = ["Ctx one", "2", "e0", "e1", "e2", "e3", "Ctx two", "0", "f0", "f1", "f2", "f3"]
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "hellaswag_val_full.txt").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="derived text format"):
        items = load("hellaswag", tmp_path)
    assert [(it.context, it.options[it.gold]) for it in items] == [("Ctx one", " e2"), ("Ctx two", " f0")]


def test_cbt_gold_is_the_answer_and_options_carry_the_query_tail(tmp_path):
    story = [f"{n} Story line {n} , said he ." for n in range(1, 21)]
    cands = [f"w{k}" for k in range(10)]
    query = "21 The XXXXX was here .\tw7\t\t" + "|".join(cands)
    short = "21 A XXXXX b .\tw1\t\t" + "|".join(cands[:9])  # 9 candidates: skipped
    path = tmp_path / "cbtest_NE_test_2500ex.txt"
    path.write_text("\n".join(story + [query, ""] + story + [short, ""]) + "\n")
    with pytest.warns(UserWarning, match="skipped 1 question"):
        items = parse_cbt_file(path, "NE")
    (it,) = items
    assert it.options[it.gold] == "w7 was here."
    assert it.options == [f"w{k} was here." for k in range(10)]
    assert it.context.endswith("Story line 20, said he. The ")
    assert it.context.startswith("Story line 1, said he. Story line 2,")


def test_cbt_detokenisation_rules_by_hand():
    """SPEC 6.2's CBT detokenisation, each rule visible in one hand-detokenised line."""
    raw = "He did n't say `` hi '' to Tom 's dog ; ok ? Yes : no , fine !"
    assert detokenize(raw) == 'He didn\'t say "hi" to Tom\'s dog; ok? Yes: no, fine!'
    assert detokenize("a \n b .") == "a\nb."


# --------------------------------------------------------------------------- the real sets

N_REAL = 200


def real_or_skip(rel):
    p = EVAL / rel
    if not p.exists():
        pytest.skip(f"optional data missing: {p} (set MOEUT_SHARED to the folder holding data/)")
    return p


def first_jsonl(path, n):
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
            if len(out) == n:
                break
    return out


def test_real_piqa_gold_matches_the_label_file():
    root = real_or_skip("piqa")
    recs = first_jsonl(root / "valid.jsonl", N_REAL)
    labels = [int(x) for x in (root / "valid-labels.lst").read_text().split()[:N_REAL]]
    items = load("piqa", EVAL, limit=N_REAL)
    assert len(items) == N_REAL and sorted(set(labels)) == [0, 1]
    for it, r, lab in zip(items, recs, labels):
        assert it.options[it.gold] == " " + r[f"sol{lab + 1}"]


def test_real_arc_gold_matches_the_answer_key():
    path = real_or_skip("arc/ARC-Easy-Test.jsonl")
    recs = [r for r in first_jsonl(path, 10 * N_REAL) if len(r["question"]["choices"]) == 4][:N_REAL]
    items = load("arc_easy", EVAL, limit=N_REAL)
    assert [it.id for it in items] == [r["id"] for r in recs]
    for it, r in zip(items, recs):
        gold = next(c["text"] for c in r["question"]["choices"] if str(c["label"]) == str(r["answerKey"]))
        assert it.options[it.gold] == " " + gold
    assert len({it.gold for it in items}) == 4


def test_real_blimp_gold_is_sentence_good():
    root = real_or_skip("blimp")
    p = sorted(root.glob("*.jsonl"))[0]
    recs = first_jsonl(p, 50)
    items = [it for it in load("blimp", EVAL, limit=50) if it.group == p.stem]
    assert [it.options[it.gold] for it in items] == [r["sentence_good"] for r in recs]
    assert [it.options[1 - it.gold] for it in items] == [r["sentence_bad"] for r in recs]


def test_real_hellaswag_text_gold_matches_the_label_line():
    path = real_or_skip("hellaswag/hellaswag_val_full.txt.bz2")
    with bz2.open(path, "rt") as f:
        lines = [next(f).rstrip("\n") for _ in range(6 * N_REAL)]
    with pytest.warns(UserWarning, match="derived text format"):
        items = load("hellaswag", EVAL, limit=N_REAL)
    for k, it in enumerate(items):
        block = lines[6 * k:6 * k + 6]
        assert it.gold == int(block[1])
        assert it.options[it.gold].strip() == block[2 + int(block[1])].strip().replace("  ", " ")
    assert len({it.gold for it in items}) == 4
