"""The paper's scoring rules (SPEC 6.1, 6.2) with a model that scores every token differently: a bigram
model over a character tokenizer, so that every expected score, prediction and accuracy below is computed
by hand from the bigram table (plain Python loops in float64), independently of the engine. A scored span
one token off, a wrong target, a lost normalisation, a tie counted as right, a pooled group average or a
LAMBADA window one position off all change these numbers. Needs no data files."""
import math

import pytest
import torch

from moeut.eval.scoring import MCItem, Scorer, evaluate_multiple_choice, make_request
from moeut.eval.tasks import EvalOptions, get_task

from eval_fakes import BigramLM

V = 128  # ASCII characters


class CharTokenizer:
    """One token per ASCII character: encode/decode are exact inverses."""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(int(i)) for i in ids)


TOK = CharTokenizer()


def bigram_table(seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(V, V, generator=g) * 2.0
    # a few strong bigrams, so that some LAMBADA predictions are right: " m" -> "a" -> "t", "e" -> " "
    for a, b in ((" ", "m"), ("m", "a"), ("a", "t"), ("e", " "), ("h", "e")):
        table[ord(a), ord(b)] = 12.0
    return table


TABLE = bigram_table()
LSM = torch.log_softmax(TABLE.double(), -1).tolist()  # LSM[prev][next], float64
ARGMAX = TABLE.argmax(-1).tolist()


def scorer(**kw):
    return Scorer(BigramLM(TABLE), device="cpu", dtype=None, progress=False, **kw)


def naive_score(ids, score_from):
    """Sum of log P(ids[p] | ids[p-1]) for p = score_from .. n-1 (the first token is never scored)."""
    return math.fsum(LSM[ids[p - 1]][ids[p]] for p in range(score_from, len(ids)))


def test_scored_span_targets_and_greedy_by_hand():
    cases = [("the cat", " sat", 7), ("", "hello", 1), ("x", "mat", 1), ("the ", "mat", 4)]  # (ctx, cont, c)
    reqs = [make_request(TOK.encode(ctx), TOK.encode(cont)) for ctx, cont, _ in cases]
    res = scorer(batch_size=2, pad_multiple=8).score(reqs)
    for (ctx, cont, c), r, got in zip(cases, reqs, res):
        ids = TOK.encode(ctx + cont)
        assert r.ids == ids and r.score_from == c
        assert got.n_scored == len(ids) - c
        assert got.logprob == pytest.approx(naive_score(ids, c), abs=1e-9)
        assert got.token_logprobs == pytest.approx([LSM[ids[p - 1]][ids[p]] for p in range(c, len(ids))], abs=1e-9)
        assert got.greedy == all(ARGMAX[ids[p - 1]] == ids[p] for p in range(c, len(ids)))
    assert res[3].greedy and not res[2].greedy  # " " -> m -> a -> t is the table's strong path


def _mc_items():
    return [
        MCItem("the cat", [" sat", " mat", " hat"], gold=1, group="a", id=0),
        MCItem("he", [" ate", " met"], gold=0, group="a", id=1),
        MCItem("", ["the mat", "tha mat"], gold=0, group="b", id=2),  # no context: first token unscored
        MCItem("x", ["mat", "hat", "matter"], gold=2, group="b", id=3),
        MCItem("so", [" q", " zz"], gold=1, group="b", id=4),
    ]


def naive_mc(items, normalize):
    per_item, groups = [], {}
    for it in items:
        ctx = TOK.encode(it.context) if it.context else []
        scores = []
        for opt in it.options:
            ids = ctx + TOK.encode(opt)
            c = max(len(ctx), 1)
            s = naive_score(ids, c)
            scores.append(s / (len(ids) - c) if normalize else s)
        ok = all(scores[it.gold] > s for j, s in enumerate(scores) if j != it.gold)
        per_item.append((scores, ok))
        groups.setdefault(it.group, []).append(ok)
    acc = {g: sum(v) / len(v) for g, v in groups.items()}
    n_ok = sum(ok for _, ok in per_item)
    return per_item, sum(acc.values()) / len(acc), n_ok / len(items), acc


@pytest.mark.parametrize("normalize", [False, True])
def test_multiple_choice_scores_accuracy_and_averages_by_hand(normalize):
    items = _mc_items()
    got = evaluate_multiple_choice(items, scorer(batch_size=3, pad_multiple=4), TOK, normalize=normalize,
                                   keep_items=True)
    per_item, group_avg, seq_avg, acc = naive_mc(items, normalize)
    for g_item, (scores, ok) in zip(got["items"], per_item):
        assert g_item["scores"] == pytest.approx(scores, abs=1e-9)
        assert g_item["correct"] == ok
    assert {g: v["accuracy"] for g, v in got["groups"].items()} == pytest.approx(acc)
    assert got["group_average"] == pytest.approx(group_avg)
    assert got["seq_average"] == pytest.approx(seq_avg)
    # the groups have 2 and 3 items: the two averages differ unless both groups score alike
    assert 0 < seq_avg < 1


def test_normalisation_and_tie_rules_change_the_answer():
    items = _mc_items()
    raw = [ok for _, ok in naive_mc(items, False)[0]]
    norm = [ok for _, ok in naive_mc(items, True)[0]]
    assert raw != norm  # the items are built so that normalisation flips at least one
    # an exact tie (identical options) counts as wrong
    got = evaluate_multiple_choice([MCItem("the", [" mat", " mat"], gold=1)], scorer(), TOK, normalize=False)
    assert got["seq_average"] == 0.0


def naive_lambada(texts):
    n_ok = n_last = 0
    word_ces, total_ce, total_tok = [], 0.0, 0
    for text in texts:
        ids = TOK.encode(text)
        word = text.split(" ")[-1]
        w = len(word)
        n = len(ids)
        # predictions of the last w tokens: argmax at positions n-1-w .. n-2
        pred = "".join(chr(ARGMAX[ids[p]]) for p in range(max(0, n - 1 - w), n - 1)).split(" ")[-1]
        n_ok += pred == word
        target = TOK.encode(" " + word)
        n_last += ARGMAX[ids[n - 2]] == target[-1]
        lps = [LSM[ids[p - 1]][ids[p]] for p in range(1, n)]
        m = min(len(target), len(lps))
        word_ces.append(-sum(lps[-m:]) / m)
        total_ce += -sum(lps)
        total_tok += len(lps)
    k = len(texts)
    return {"accuracy": n_ok / k, "last_token_accuracy": n_last / k,
            "target_perplexity": math.exp(sum(word_ces) / k), "lm_loss": total_ce / total_tok}


def test_lambada_window_last_token_and_perplexities_by_hand():
    texts = ["the cat sat on the mat", "she put on a hat", "he saw the mat", "a cat ate the meat"]
    items = [{"id": i, "text": t} for i, t in enumerate(texts)]
    got = get_task("lambada").evaluate(items, scorer(batch_size=2, pad_multiple=8), TOK, EvalOptions())
    ref = naive_lambada(texts)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, rel=1e-9), k
    assert 0 < ref["accuracy"] < 1 and ref["last_token_accuracy"] > ref["accuracy"]


class RecordingBigram(BigramLM):
    """The bigram model, recording the real tokens of every row it is given (mask = 1)."""

    def __init__(self, table):
        super().__init__(table)
        self.rows = []

    def forward(self, input_ids, attention_mask=None, **kw):
        for b in range(input_ids.shape[0]):
            n = int(attention_mask[b].sum()) if attention_mask is not None else input_ids.shape[1]
            self.rows.append(input_ids[b, :n].tolist())
        return super().forward(input_ids, **kw)


@pytest.mark.parametrize("max_length", [4, 6, 9])
def test_max_length_keeps_exactly_the_last_max_length_tokens(max_length):
    """lm-eval's left truncation: the model sees the last `max_length` tokens, the scored span intact."""
    ctx, cont = TOK.encode("abcdefghij"), TOK.encode("mat")
    model = RecordingBigram(TABLE)
    (got,) = Scorer(model, device="cpu", dtype=None, progress=False, max_length=max_length).score(
        [make_request(ctx, cont)])
    ids = ctx + cont
    assert model.rows == [ids[-max_length:]]
    assert got.n_scored == 3 and got.logprob == pytest.approx(naive_score(ids, len(ctx)), abs=1e-9)


def test_text_perplexity_and_bits_per_byte_by_hand_first_token_multibyte():
    """Task `perplexity` with a non-uniform bigram model over the alphabet "é€ab " (é 2 UTF-8 bytes,
    € 3): NLL summed by hand over every token but each document's first; the bytes covered are the
    document's minus its first token's (here multi-byte)."""
    alphabet = "é€ab "

    class Tok:
        def encode(self, s):
            return [alphabet.index(c) for c in s]

        def decode(self, ids):
            return "".join(alphabet[i] for i in ids)

    table = torch.randn(5, 5, generator=torch.Generator().manual_seed(3))
    lsm = torch.log_softmax(table.double(), -1).tolist()
    docs = ["éab €a", "€€b"]
    nll = n_tok = n_bytes = 0
    for d in docs:
        ids = Tok().encode(d)
        nll -= math.fsum(lsm[ids[p - 1]][ids[p]] for p in range(1, len(ids)))
        n_tok += len(ids) - 1
        n_bytes += len(d.encode("utf-8")) - len(d[0].encode("utf-8"))
    assert n_bytes == 11  # "ab €a" = 7 bytes, "€b" = 4
    got = get_task("perplexity").evaluate(docs, scorer_for_table(table), Tok(),
                                          EvalOptions(perplexity={"context_length": 3}))
    assert (got["n_tokens"], got["n_bytes"]) == (n_tok, n_bytes)
    assert got["nll"] == pytest.approx(nll, abs=1e-9)
    assert got["perplexity"] == pytest.approx(math.exp(nll / n_tok), rel=1e-12)
    assert got["bits_per_byte"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-12)


def scorer_for_table(table):
    return Scorer(BigramLM(table), device="cpu", dtype=None, progress=False)
