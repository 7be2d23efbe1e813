"""Task `perplexity` (moeut/eval/tasks/perplexity.py): window semantics checked by hand, scores
against a naive per-token loop of the same model, bits per byte by hand, and the command line.
Needs no downloaded data: the text, the tokenizer and the model are made here."""
import json
import math
from pathlib import Path

import pytest
import torch

from eval_fakes import BigramLM, PositionLM, generated_texts, make_tiny_run
from moeut.eval.scoring import Scorer
from moeut.eval.tasks import get_task
from moeut.eval.tasks.base import EvalOptions, TaskDataMissing, TaskFormatError
from moeut.eval.tasks.perplexity import strided_windows

REPO = Path(__file__).resolve().parents[3]


def test_windows_by_hand():
    # n = 10 tokens, L = 4: default stride 3 = non-overlapping targets, windows share one token
    assert strided_windows(10, 4) == [(0, 4, 1), (3, 7, 4), (6, 10, 7)]
    # stride 2: each new window scores 2 new tokens with >= 2 tokens of context; the last window
    # is a full L = 4 tokens
    assert strided_windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert strided_windows(9, 4, 3) == [(0, 4, 1), (3, 7, 4), (5, 9, 7)]  # last window extended left
    assert strided_windows(3, 8) == [(0, 3, 1)]  # shorter than one window
    assert strided_windows(1, 8) == []  # one token: nothing to score without a BOS
    for n, L, s in ((10, 4, 1), (37, 8, 3), (100, 16, 15), (5, 2, 1)):
        scored = [t for _, e, a in strided_windows(n, L, s) for t in range(a, e)]
        assert scored == list(range(1, n))  # every token but the first, exactly once, in order
        assert all(e - b <= L for b, e, _ in strided_windows(n, L, s))
    with pytest.raises(ValueError, match=r"perplexity.stride: must be an integer in 1..context_length-1 = 1..3"):
        strided_windows(10, 4, 4)
    with pytest.raises(ValueError, match="perplexity.context_length"):
        strided_windows(10, 1)


class CharTok:
    """One id per character of a fixed alphabet; decode joins them (bytes known by hand)."""

    def __init__(self, alphabet="abcdé "):
        self.alphabet = alphabet
        self.vocab_size = len(alphabet)

    def encode(self, s):
        return [self.alphabet.index(c) for c in s]

    def decode(self, ids):
        return "".join(self.alphabet[i] for i in ids)


def _ppl(items, model, tok, **p):
    opts = EvalOptions(perplexity=p)
    return get_task("perplexity").evaluate(items, Scorer(model, device="cpu", progress=False), tok, opts)


def test_context_per_token_by_hand():
    """PositionLM turns each token's context length c into log P = -log(e^c + V - 1): the total
    NLL of 10 tokens of id 1 (V = 6) equals the sum over the hand-listed context lengths."""
    V = 6
    tok = CharTok()
    text = "b" * 10  # id 1 everywhere
    for L, s, contexts in ((4, None, [1, 2, 3, 1, 2, 3, 1, 2, 3]),
                           (4, 2, [1, 2, 3, 2, 3, 2, 3, 2, 3]),
                           (4, 1, [1, 2, 3, 3, 3, 3, 3, 3, 3]),
                           (16, None, list(range(1, 10)))):
        m = _ppl([text], PositionLM(V), tok, context_length=L, stride=s)
        ref = math.fsum(math.log(math.exp(c) + V - 1) for c in contexts)
        assert m["nll"] == pytest.approx(ref, abs=1e-9), (L, s)
        assert m["n_tokens"] == 9 and m["n_bytes"] == 9
        assert m["perplexity"] == pytest.approx(math.exp(ref / 9), rel=1e-12)


def test_bits_per_byte_by_hand():
    """Uniform model over V = 6: every scored token costs ln 6 nats. 'aé b' = 4 tokens, 3 scored,
    covering 'é b' = 4 UTF-8 bytes (é is 2): bits/byte = 3 ln 6 / (4 ln 2)."""
    tok = CharTok()
    m = _ppl(["aé b"], BigramLM(torch.zeros(6, 6)), tok, context_length=8)
    assert (m["n_tokens"], m["n_bytes"]) == (3, 4)
    assert m["bits_per_byte"] == pytest.approx(3 * math.log(6) / (4 * math.log(2)), rel=1e-12)
    assert m["perplexity"] == pytest.approx(6.0, rel=1e-12)
    # documents are separate streams: two documents lose one first token each
    m2 = _ppl(["aé b", "dcba"], BigramLM(torch.zeros(6, 6)), tok, context_length=8)
    assert (m2["n_tokens"], m2["n_bytes"], m2["n_documents"]) == (6, 7, 2)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("ppl"))


def naive_nll(model, ids, contexts):
    """Reference: each token p scored by its own forward over (its context, itself)."""
    total = 0.0
    for p, c in zip(range(1, len(ids)), contexts):
        x = torch.tensor([ids[p - c:p + 1]])
        with torch.no_grad():
            lsm = torch.log_softmax(model(x).logits[0, -1 - 1].double(), -1)
        total -= float(lsm[ids[p]])
    return total


def contexts_for(n, L, s):
    """Context length of token p (1..n-1) computed per token: the window that scores p is the
    first whose end e (L, L+s, L+2s, ..., capped at n) is > p; its start is max(0, e - L)."""
    out = []
    for p in range(1, n):
        e = L
        while e <= p:
            e += s
        e = min(e, n)
        out.append(p - max(0, e - L))
    return out


@pytest.mark.parametrize("L,s", [(64, None), (12, None), (12, 5), (12, 1)])
def test_tiny_moeut_against_naive_per_token_loop(tiny_run, L, s):
    _, model, tok = tiny_run
    text = " ".join(generated_texts(4, seed=3))
    ids = tok.encode(text)
    assert 20 < len(ids) < 64, len(ids)
    m = _ppl([text], model, tok, context_length=L, stride=s)
    ref = naive_nll(model, ids, contexts_for(len(ids), L, s if s is not None else L - 1))
    assert m["nll"] == pytest.approx(ref, abs=1e-4)
    assert m["n_tokens"] == len(ids) - 1
    if L >= len(ids):  # one window: the full forward
        with torch.no_grad():
            lsm = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        full = -sum(float(lsm[p - 1, ids[p]]) for p in range(1, len(ids)))
        assert m["nll"] == pytest.approx(full, abs=1e-4)


def test_loaders_and_errors(tmp_path, monkeypatch):
    t = get_task("perplexity")
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    assert t.load(EvalOptions(perplexity={"path": str(tmp_path / "a.txt")})) == ["line one\nline two"]
    import gzip
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "first"}) + "\n\n" + json.dumps({"body": "second"}) + "\n")
    opts = EvalOptions(perplexity={"path": str(tmp_path / "d.jsonl.gz"), "field": "body"})
    assert t.load(opts) == ["first", "second"]
    opts.limit = 1
    assert t.load(opts) == ["first"]
    with pytest.raises(TaskFormatError, match=r"d.jsonl.gz:1: expected a JSON object with a 'text' field"):
        t.load(EvalOptions(perplexity={"path": str(tmp_path / "d.jsonl.gz")}))
    with pytest.raises(TaskDataMissing, match=r"perplexity.path=.*nope.txt: file not found"):
        t.load(EvalOptions(perplexity={"path": str(tmp_path / "nope.txt")}))
    with pytest.raises(TaskDataMissing, match="set perplexity.path="):
        t.load(EvalOptions())
    from moeut.eval.tasks.hub import text_docs
    assert text_docs([{"text": "x"}, {"text": ""}], "text", "wikitext") == ["x", ""]
    with pytest.raises(TaskFormatError, match="wikitext hub record 0"):
        text_docs([{"body": "x"}], "text", "wikitext")
    # the hub path when offline; set here: the suite must not depend on the caller's environment
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TaskDataMissing, match="perplexity.hub=wikitext: the hub is offline"):
        t.load(EvalOptions(perplexity={"hub": "wikitext", "hub_config": "wikitext-2-raw-v1"}))


def test_command_writes_results_and_table(tiny_run, tmp_path):
    """Through the Hydra config: the perplexity row sits in the same results JSON and table as a
    zero-shot task (here PIQA, whose data is absent: reported as skipped, not a dash)."""
    from moeut.cli import typed_options
    from moeut.evaluate import EvaluateOptions, run
    run_dir, model, tok = tiny_run
    text = "\n".join(generated_texts(30, seed=5))
    (tmp_path / "t.txt").write_text(text)
    (tmp_path / "empty").mkdir()
    cfg = typed_options(EvaluateOptions, [
        f"checkpoint={run_dir}", "tasks=[perplexity,piqa]", f"perplexity.path={tmp_path / 't.txt'}",
        "perplexity.context_length=32", "perplexity.stride=16", f"data_dir={tmp_path / 'empty'}",
        f"out_dir={tmp_path / 'out'}", "progress=false"], "moeut.evaluate")
    with pytest.warns(UserWarning, match="piqa: skipped, data missing"):
        res = run(cfg)
    ids = tok.encode(text)
    ref = naive_nll(model, ids, contexts_for(len(ids), 32, 16))
    saved = json.loads((tmp_path / "out" / "results_step_0000050.json").read_text())
    p = saved["tasks"]["perplexity"]
    assert p["nll"] == pytest.approx(ref, abs=1e-3) and p["n_tokens"] == len(ids) - 1
    assert p["perplexity"] == pytest.approx(math.exp(ref / (len(ids) - 1)), rel=1e-5)
    n_bytes = len(text.encode()) - len(tok.decode(ids[:1]).encode())
    assert p["n_bytes"] == n_bytes
    assert p["bits_per_byte"] == pytest.approx(ref / (math.log(2) * n_bytes), rel=1e-5)
    assert "PIQA needs" in saved["tasks"]["piqa"]["skipped"]
    md = (tmp_path / "out" / "table_step_0000050.md").read_text()
    header, _, row = md.splitlines()[:3]
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")]))
    assert cells["PIQA"] == "skipped" and cells["LAMBADA"] == "–"
    assert cells["text PPL"] == f"{p['perplexity']:.2f}" and cells["bits/byte"] == f"{p['bits_per_byte']:.4f}"
    assert "- piqa skipped: PIQA needs" in md
    assert res["table_row"] == cells
