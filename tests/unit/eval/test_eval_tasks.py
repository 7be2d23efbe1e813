"""Task loaders and the paper's scoring rules (SPEC 6.2) on real items from shared/data/eval,
with models whose log-probabilities are known (tests/eval_fakes.py)."""
import bz2
import json
import math
import os
import shutil
import warnings

import pytest
import torch

from moeut.eval import scoring
from eval_fakes import PeekingLM, UnigramLM
from moeut.eval.scoring import Scorer
from moeut.eval.tasks import EvalOptions, TaskFormatError, get_task, resolve_tasks
from moeut.eval.tasks.arc import load_arc_file
from moeut.eval.tasks.blimp import PARADIGMS
from moeut.eval.tasks.cbt import detokenize, parse_cbt_file
from moeut.eval.tasks.hellaswag import items_from_jsonl, items_from_text, preprocess

from conftest import EVAL  # noqa: E402  ($MOEUT_SHARED/data/eval: the zero-shot sets are not in the repository)
pytestmark = pytest.mark.skipif(not EVAL.is_dir(), reason=f"zero-shot sets missing: {EVAL} (set MOEUT_SHARED)")


def scorer_for(model, **kw):
    return Scorer(model, device="cpu", progress=False, pad_multiple=kw.pop("pad_multiple", 16), **kw)


def naive_mc(items, tok, logits_V, normalize):
    """Independent reference for a context-free model: score = sum over scored tokens of
    log_softmax(logits)[tok]; the first token of a sequence is scored only if it is a continuation
    token after a non-empty context."""
    lsm = torch.log_softmax(logits_V.double(), -1).tolist()
    correct = []
    for it in items:
        ctx = tok.encode(it.context) if it.context else []
        scores = []
        for opt in it.options:
            cont = tok.encode(opt)
            scored = cont if ctx else cont[1:]
            s = math.fsum(lsm[t] for t in scored)
            scores.append(s / len(scored) if normalize and scored else s)
        correct.append(all(scores[it.gold] > s for j, s in enumerate(scores) if j != it.gold))
    return correct


# --------------------------------------------------------------------------- registry / errors

def test_unknown_task_lists_known_tasks():
    with pytest.raises(ValueError, match=r"unknown task 'winogrande'.*known tasks: \['arc_challenge', 'arc_easy', "
                                         r"'blimp', 'cbt', 'hellaswag', 'lambada', 'perplexity', 'piqa'\]"):
        resolve_tasks(["lambada", "winogrande"])
    assert get_task("ARC_E").name == "arc_easy"


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    d = tmp_path / "piqa"
    d.mkdir()
    lines = (EVAL / "piqa" / "valid.jsonl").read_text().splitlines()[:4]
    lines[2] = lines[2][:-5]  # truncated JSON on line 3
    (d / "valid.jsonl").write_text("\n".join(lines) + "\n")
    (d / "valid-labels.lst").write_text("0\n1\n1\n0\n")
    with pytest.raises(TaskFormatError, match=r"piqa/valid\.jsonl:3: not valid JSON"):
        get_task("piqa").load(EvalOptions(data_dir=str(tmp_path)))
    lines = (EVAL / "piqa" / "valid.jsonl").read_text().splitlines()[:4]
    lines[1] = json.dumps({"goal": "x", "sol1": "y"})
    (d / "valid.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(TaskFormatError, match=r"valid\.jsonl:2: missing field\(s\) \['sol2'\]"):
        get_task("piqa").load(EvalOptions(data_dir=str(tmp_path)))
    (d / "valid.jsonl").write_text("\n".join((EVAL / "piqa" / "valid.jsonl").read_text().splitlines()[:4]) + "\n")
    (d / "valid-labels.lst").write_text("0\n1\n2\n0\n")
    with pytest.raises(TaskFormatError, match=r"valid-labels\.lst:3: expected 0 or 1"):
        get_task("piqa").load(EvalOptions(data_dir=str(tmp_path)))
    (d / "valid-labels.lst").write_text("0\n1\n1\n")
    with pytest.raises(TaskFormatError, match="3 labels but .* has 4 items"):
        get_task("piqa").load(EvalOptions(data_dir=str(tmp_path)))


# --------------------------------------------------------------------------- LAMBADA

def test_lambada_window_rule(small_tokenizer):
    """A model that predicts every next token right gets every item; a wrong prediction inside the
    last-w-characters window (w = len(word)) breaks the item, one just outside it does not."""
    tok = small_tokenizer
    task = get_task("lambada")
    opts = EvalOptions(limit=4, keep_items=True)
    items = task.load(opts)
    assert items[0]["text"].endswith("I don't care about signs")
    V = tok.vocab_size
    m = task.evaluate(items, scorer_for(PeekingLM(V)), tok, opts)
    assert m["accuracy"] == 1.0 and m["last_token_accuracy"] == 1.0
    for it in items:
        ids = tok.encode(it["text"])
        n, w = len(ids), len(it["text"].split(" ")[-1])
        assert n - 2 - w >= 0
        # the decoded window is exactly the predictions at positions n-1-w .. n-2 (the last w tokens)
        decoded = []

        class Spy:
            vocab_size = V
            encode = staticmethod(tok.encode)

            @staticmethod
            def decode(x):
                decoded.append(list(x))
                return tok.decode(x)
        task.evaluate([it], scorer_for(PeekingLM(V)), Spy, opts)
        assert decoded == [ids[n - w:]]
        for pos, expect in ((n - 2, False), (n - 2 - w, True), (0, True)):
            wrong = next(i for i in range(3, V) if i != ids[pos + 1])
            res = task.evaluate([it], scorer_for(PeekingLM(V, wrong_at=[pos], wrong_id=wrong)), tok, opts)
            assert (res["accuracy"] == 1.0) is expect, (it["id"], pos)
            assert res["last_token_accuracy"] == float(pos != n - 2)


def test_lambada_perplexities_under_uniform_model(small_tokenizer):
    task = get_task("lambada")
    opts = EvalOptions(limit=3)
    m = task.evaluate(task.load(opts), scorer_for(UnigramLM(torch.zeros(small_tokenizer.vocab_size))),
                      small_tokenizer, opts)
    V = small_tokenizer.vocab_size
    assert m["target_perplexity"] == pytest.approx(V, rel=1e-9)
    assert m["lm_loss"] == pytest.approx(math.log(V), rel=1e-9)
    assert m["n_items"] == 3


# --------------------------------------------------------------------------- BLiMP

def test_blimp_all_67_paradigms_unnormalised(small_tokenizer):
    task = get_task("blimp")
    opts = EvalOptions(limit=3, keep_items=True)
    items = task.load(opts)
    assert len(items) == 67 * 3 and len({it.group for it in items}) == 67
    logits = torch.randn(small_tokenizer.vocab_size, generator=torch.Generator().manual_seed(1))
    m = task.evaluate(items, scorer_for(UnigramLM(logits)), small_tokenizer, opts)
    expect = naive_mc(items, small_tokenizer, logits, normalize=False)
    assert [r["correct"] for r in m["items"]] == expect
    per_group = {p: sum(c for c, it in zip(expect, items) if it.group == p) / 3 for p in PARADIGMS}
    assert m["accuracy"] == pytest.approx(sum(per_group.values()) / 67)
    assert m["n_groups"] == 67


def test_blimp_identical_pairs_count_as_wrong(small_tokenizer, tmp_path):
    """passive_1 lines 325 and 811 have identical good and bad sentences: a tie, so wrong."""
    d = tmp_path / "blimp"
    d.mkdir()
    src = (EVAL / "blimp" / "passive_1.jsonl").read_text().splitlines()
    (d / "passive_1.jsonl").write_text("\n".join([src[0], src[324], src[810]]) + "\n")
    opts = EvalOptions(data_dir=str(tmp_path), keep_items=True)
    with pytest.warns(UserWarning, match="66 of 67 paradigm files missing"):
        items = get_task("blimp").load(opts)
    assert items[1].options[0] == items[1].options[1] == "Douglas's senator was left by Susan."
    m = get_task("blimp").evaluate(items, scorer_for(PeekingLM(small_tokenizer.vocab_size)), small_tokenizer, opts)
    assert [r["correct"] for r in m["items"]][1:] == [False, False]


# --------------------------------------------------------------------------- MC tasks on real items

@pytest.mark.parametrize("name", ["piqa", "arc_easy", "hellaswag"])
def test_real_items_match_naive_reference_and_separate_tokenisation(name, small_tokenizer, monkeypatch):
    tok = small_tokenizer
    task = get_task(name)
    opts = EvalOptions(limit=8, keep_items=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        items = task.load(opts)
    assert len(items) == 8
    seen = []
    orig = scoring.Scorer.score
    monkeypatch.setattr(scoring.Scorer, "score", lambda self, reqs, desc="": seen.extend(reqs) or orig(self, reqs, desc))
    logits = torch.randn(tok.vocab_size, generator=torch.Generator().manual_seed(2)) * 2
    for normalize in (True, False):
        seen.clear()
        m = task.evaluate(items, scorer_for(UnigramLM(logits), batch_size=5),
                          tok, EvalOptions(limit=8, keep_items=True, length_normalize=normalize))
        assert [r["correct"] for r in m["items"]] == naive_mc(items, tok, logits, normalize)
        # context and continuation tokenised separately, concatenated; scoring starts at c
        k = 0
        for it in items:
            c = tok.encode(it.context)
            for opt in it.options:
                assert seen[k].ids == c + tok.encode(opt) and seen[k].score_from == len(c)
                k += 1


def test_piqa_prompt_and_labels():
    items = get_task("piqa").load(EvalOptions(limit=3))
    assert items[0].context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert items[0].options[0].startswith(" Provide the guinea pig with a cage full")
    assert [it.gold for it in items] == [0, 1, 1]  # valid-labels.lst lines 1-3
    assert items[1].options == [" replace drawer with bobby pin ", " finish, woodgrain with  bobby pin "]


def test_arc_easy_keeps_only_four_option_questions():
    with pytest.warns(UserWarning, match="skipped 11 question"):
        items = load_arc_file(EVAL / "arc" / "ARC-Easy-Test.jsonl", "ARC-Easy", None)
    assert len(items) == 2376 - 7 - 4  # 7 three-choice and 4 five-choice items dropped
    assert all(len(it.options) == 4 for it in items)
    first = items[0]
    assert first.context == ("Question: Which statement best explains why photosynthesis is the foundation "
                             "of most food webs?\nAnswer:")
    assert first.options[0] == " Sunlight is the source of energy for nearly all ecosystems." and first.gold == 0
    numeric = next(it for it in items if it.id == "NYSEDREGENTS_2015_8_28")  # labels 1-4, key "2"
    assert numeric.gold == 1


def test_arc_challenge_missing_is_a_clear_skip(tmp_path):
    from moeut.eval.tasks import TaskDataMissing
    with pytest.raises(TaskDataMissing, match="ARC-Challenge-Test.jsonl"):
        get_task("arc_challenge").load(EvalOptions(data_dir=str(tmp_path)))


# --------------------------------------------------------------------------- HellaSwag

def test_hellaswag_preprocessing_official_quirk_and_flag():
    s = "Home: [header] How to clean a grill [title] Scrub it.  Then \\.rinse [step] it."
    # official raw-string regex removes only a backslash + one of . * ? \ ; tags stay
    assert preprocess(s) == "Home: [header] How to clean a grill. Scrub it. Then rinse [step] it."
    assert preprocess(s, strip_brackets=True) == "Home: How to clean a grill. Scrub it. Then \\.rinse it."


def test_hellaswag_official_jsonl_format(tmp_path):
    rec = {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
           "ctx_b": "he", "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                       "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
           "label": "3", "split": "val"}
    p = tmp_path / "hellaswag_val.jsonl"
    p.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "label": 7}) + "\n")
    with pytest.raises(TaskFormatError, match=r"hellaswag_val\.jsonl:2: 'label' must be 0-3"):
        items_from_jsonl(p, None, False)
    it = items_from_jsonl(p, 1, False)[0]
    assert it.context == "Roof shingle removal: A man is sitting on a roof. He"  # ctx_b capitalised
    assert it.options[3] == " starts pulling up roofing on a roof." and it.gold == 3
    # the loader prefers the official file when both are present
    opts = EvalOptions(data_dir=str(tmp_path), limit=1)
    (tmp_path / "hellaswag").mkdir()
    shutil.copy(p, tmp_path / "hellaswag" / "hellaswag_val.jsonl")
    shutil.copy(EVAL / "hellaswag" / "hellaswag_val_full.txt.bz2", tmp_path / "hellaswag")
    assert get_task("hellaswag").load(opts)[0].context.endswith("roof. He")


def test_hellaswag_derived_text_format(tmp_path):
    items = items_from_text(EVAL / "hellaswag" / "hellaswag_val_full.txt.bz2", 2, False)
    assert items[0].context == "Roof shingle removal: A man is sitting on a roof. he"  # not capitalised
    assert items[0].options == [" is using wrap to wrap a pair of skis.", " is ripping level tiles off.",
                                " is holding a rubik's cube.", " starts pulling up roofing on a roof."]
    assert [it.gold for it in items] == [3, 3]
    lines = bz2.open(EVAL / "hellaswag" / "hellaswag_val_full.txt.bz2", "rt").read().splitlines()[:12]
    lines[7] = "four"
    bad = tmp_path / "h.txt"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(TaskFormatError, match=r"h\.txt:8: expected a gold label 0-3"):
        items_from_text(bad, None, False)
    lines[7] = "3"
    bad.write_text("\n".join(lines[:9]) + "\n")
    with pytest.raises(TaskFormatError, match=r"h\.txt:7: incomplete item"):
        items_from_text(bad, None, False)


# --------------------------------------------------------------------------- CBT
# No copy of the real CBT files could be obtained: these items were written for this test in the
# documented CBTest format (21 numbered lines; query line: query \t answer \t\t cand|cand|...).

def cbt_item(start_words, answer, cands, query):
    story = [f"{i} {start_words} sentence number {i} , said the `` fox '' ." for i in range(1, 21)]
    return "\n".join(story + [f"21 {query}\t{answer}\t\t{'|'.join(cands)}"]) + "\n\n"


CANDS = ["Tom", "cat", "dog", "fox", "hen", "pig", "cow", "owl", "bee", "ant"]


def test_cbt_parse_hand_written_items(tmp_path):
    p = tmp_path / "cbtest_NE_test_2500ex.txt"
    p.write_text(cbt_item("The", "fox", CANDS, "`` Can I trust the XXXXX ? '' she did n't say .")
                 + cbt_item("A", "cat", CANDS[:9], "XXXXX ran .")  # 9 candidates: skipped
                 + cbt_item("One", "Tom", CANDS, "XXXXX ran ."))
    with pytest.warns(UserWarning, match="skipped 1 question"):
        items = parse_cbt_file(p, "NE")
    assert len(items) == 2
    it = items[0]
    story = " ".join(f"The sentence number {i}, said the \"fox\"." for i in range(1, 21))
    assert it.context == story + " " + '"Can I trust the '
    assert it.options[3] == "fox?\" she didn't say." and it.gold == 3 and len(it.options) == 10
    assert items[1].context.endswith("the \"fox\". ") and items[1].options[0] == "Tom ran." and items[1].gold == 0
    assert detokenize("`` Yes , '' he said n't ; ok !") == "\"Yes,\" he saidn't; ok!"


def test_cbt_malformed_lines(tmp_path):
    p = tmp_path / "cbtest_CN_test_2500ex.txt"
    good = cbt_item("The", "fox", CANDS, "XXXXX ran .")
    p.write_text(good.replace("5 The sentence", "6 The sentence", 1))
    with pytest.raises(TaskFormatError, match=r"cbtest_CN_test_2500ex\.txt:5: line number 6, expected 5"):
        parse_cbt_file(p, "CN")
    p.write_text(good.replace("\tfox\t\t", "\t"))
    with pytest.raises(TaskFormatError, match=r":21: query line must have 3"):
        parse_cbt_file(p, "CN")
    p.write_text(good.replace("\tfox\t", "\tgnu\t"))
    with pytest.raises(TaskFormatError, match=r":21: answer 'gnu' is not among"):
        parse_cbt_file(p, "CN")
    p.write_text("1 only one line\n")
    with pytest.raises(TaskFormatError, match="file ends inside an item"):
        parse_cbt_file(p, "CN")


def test_cbt_task_four_types_normalised_by_default(tmp_path, small_tokenizer):
    for t in ("CN", "NE", "P", "V"):
        (tmp_path / f"cbtest_{t}_test_2500ex.txt").write_text(
            cbt_item("The", "fox", CANDS, "The XXXXX ran .") + cbt_item("The", "ant", CANDS, "XXXXX ran ."))
    task = get_task("cbt")
    opts = EvalOptions(paths={"cbt": str(tmp_path)}, keep_items=True)
    items = task.load(opts)
    assert len(items) == 8 and sorted({it.group for it in items}) == ["CN", "NE", "P", "V"]
    logits = torch.randn(small_tokenizer.vocab_size, generator=torch.Generator().manual_seed(3))
    m = task.evaluate(items, scorer_for(UnigramLM(logits)), small_tokenizer, opts)
    assert [r["correct"] for r in m["items"]] == naive_mc(items, small_tokenizer, logits, normalize=True)
    unnorm = EvalOptions(paths={"cbt": str(tmp_path)}, keep_items=True, normalize_by_task={"cbt": False})
    m2 = task.evaluate(items, scorer_for(UnigramLM(logits)), small_tokenizer, unnorm)
    assert [r["correct"] for r in m2["items"]] == naive_mc(items, small_tokenizer, logits, normalize=False)
    assert m["accuracy"] == pytest.approx(sum(g["accuracy"] for g in m["groups"].values()) / 4)


# --------------------------------------------------------------------------- hub layouts
# The hub converters (source=hf) are checked on records in the hub's layout, built from the real
# local items; downloads cannot be tested offline.

def test_hub_converters_match_file_loaders(tmp_path, monkeypatch):
    from moeut.eval.tasks import hub
    opts = EvalOptions(limit=5)
    # PIQA: hub records carry the label inline
    local = get_task("piqa").load(opts)
    recs = [json.loads(l) for l in (EVAL / "piqa" / "valid.jsonl").read_text().splitlines()[:5]]
    labels = (EVAL / "piqa" / "valid-labels.lst").read_text().split()[:5]
    assert hub.piqa_items([{**r, "label": int(y)} for r, y in zip(recs, labels)]) == local
    # ARC: hub layout {question: str, choices: {text, label}}
    arc_recs = [json.loads(l) for l in (EVAL / "arc" / "ARC-Easy-Test.jsonl").read_text().splitlines()[:5]]
    hub_recs = [{"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
                 "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                             "label": [c["label"] for c in r["question"]["choices"]]}} for r in arc_recs]
    assert hub.arc_items(hub_recs, "ARC-Easy") == get_task("arc_easy").load(opts)
    # BLiMP and LAMBADA: same fields as the files
    b = [json.loads(l) for l in (EVAL / "blimp" / "passive_2.jsonl").read_text().splitlines()[:3]]
    assert [it.options for it in hub.blimp_items(b, "passive_2")] == [[r["sentence_good"], r["sentence_bad"]] for r in b]
    lam = [json.loads(l) for l in (EVAL / "lambada" / "lambada_test.jsonl").read_text().splitlines()[:5]]
    assert hub.lambada_items(lam) == get_task("lambada").load(opts)
    # CBT hub layout from a hand-written item
    story = [f"The sentence number {i} , said the `` fox '' ." for i in range(1, 21)]
    p = tmp_path / "cbtest_P_test_2500ex.txt"
    p.write_text(cbt_item("The", "fox", CANDS, "XXXXX ran ."))
    from moeut.eval.tasks.cbt import cbt_items  # beside make_cbt_item (no hub <-> cbt import cycle)
    assert cbt_items([{"sentences": story, "question": "XXXXX ran .", "answer": "fox", "options": CANDS}],
                     "P")[0].__dict__ | {"id": None} == parse_cbt_file(p, "P")[0].__dict__ | {"id": None}
    # offline: a clear "data missing", never a download attempt
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from moeut.eval.tasks import TaskDataMissing
    with pytest.raises(TaskDataMissing, match="offline"):
        get_task("piqa").load(EvalOptions(source="hf"))
    with pytest.raises(TaskDataMissing, match="hub is offline"):
        get_task("arc_challenge").load(EvalOptions(source="auto", data_dir=str(tmp_path)))
