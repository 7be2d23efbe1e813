"""Paper-parity scorer (SPEC 6.1) against hand-computed values and a naive reference loop."""
import math
import random

import pytest
import torch

from eval_fakes import BigramLM, UnigramLM
from moeut.eval.scoring import (MCItem, ScoreRequest, Scorer, evaluate_multiple_choice, is_correct,
                                make_request, option_scores)


def naive_score(table_VV, ids, score_from):
    """Reference: per-token log-softmax in Python floats (float64), one token at a time."""
    total = 0.0
    for p in range(score_from, len(ids)):
        row = [float(x) for x in table_VV[ids[p - 1]]]
        m = max(row)
        lse = m + math.log(sum(math.exp(x - m) for x in row))
        total += row[ids[p]] - lse
    return total


def test_hand_computed_bigram_scores():
    # V = 4, rows are log-probabilities, so every score is a sum of logs of simple fractions.
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125],
                          [0.25, 0.25, 0.25, 0.25],
                          [0.1, 0.2, 0.3, 0.4],
                          [0.7, 0.1, 0.1, 0.1]], dtype=torch.float64)
    scorer = Scorer(BigramLM(probs.log()), device="cpu", batch_size=3, pad_multiple=8, progress=False)
    reqs = [make_request([0], [1, 2]),   # log P(1|0) + log P(2|1) = log .25 + log .25
            make_request([], [3, 0, 2]),  # empty context: first token unscored -> log .7 + log .125
            make_request([2, 3], [0])]    # log P(0|3) = log .7
    res = scorer.score(reqs)
    assert res[0].logprob == pytest.approx(math.log(0.25) * 2, abs=1e-6)
    assert res[1].logprob == pytest.approx(math.log(0.7) + math.log(0.125), abs=1e-6)
    assert res[1].n_scored == 2 and res[1].token_logprobs[0] == pytest.approx(math.log(0.7), abs=1e-6)
    assert res[2].logprob == pytest.approx(math.log(0.7), abs=1e-6) and res[2].n_scored == 1
    # greedy: 0->1 is not row 0's argmax; 3->0 is, but 0->2 is not; 3->0 is
    assert [r.greedy for r in res] == [False, False, True]


def test_greedy_flag_and_first_token_never_scored():
    probs = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    scorer = Scorer(BigramLM(probs.log()), device="cpu", pad_multiple=4, progress=False)
    # first token 1 is never scored, whatever its probability; 1->0 (.8) and 0->1 (.9) are argmax
    r = scorer.score([make_request([], [1, 0, 1])])[0]
    assert r.n_scored == 2 and r.greedy
    assert r.logprob == pytest.approx(math.log(0.8) + math.log(0.9), abs=1e-6)
    with pytest.raises(ValueError, match="never scored"):
        scorer.score([ScoreRequest(ids=[1, 0], score_from=0)])


@pytest.mark.parametrize("batch_size,pad_multiple", [(1, 1), (4, 7), (16, 128)])
def test_batched_engine_matches_naive_loop(batch_size, pad_multiple):
    g = torch.Generator().manual_seed(0)
    V = 11
    table = torch.randn(V, V, generator=g) * 3
    rnd = random.Random(0)
    reqs = []
    for k in range(23):
        ctx = [rnd.randrange(V) for _ in range(rnd.randrange(0, 9))]
        for _ in range(rnd.randrange(1, 4)):  # 1-3 options per item, batched together
            cont = [rnd.randrange(V) for _ in range(rnd.randrange(1, 7))]
            if not ctx and len(cont) == 1:
                cont.append(0)
            reqs.append(make_request(ctx, cont, item=k))
    res = Scorer(BigramLM(table), device="cpu", batch_size=batch_size, pad_multiple=pad_multiple,
                 progress=False).score(reqs)
    for r, out in zip(reqs, res):
        assert out.logprob == pytest.approx(naive_score(table, r.ids, r.score_from), abs=1e-9)
        assert out.n_scored == len(r.ids) - r.score_from


def test_batches_sorted_by_length_longest_first():
    scorer = Scorer(UnigramLM(torch.zeros(5)), device="cpu", batch_size=4, progress=False)
    reqs = [make_request([1] * n, [2], item=k // 2) for k, n in enumerate([3, 3, 9, 9, 5, 6, 1, 2])]
    # lengths 4 4 10 10 6 7 2 3 -> by length, longest first, ties by index, 4 per batch
    assert scorer._batches(reqs) == [[2, 3, 5, 4], [0, 1, 7, 6]]


def test_batch_is_padded_to_its_longest_sequence_only():
    """The forward sees [B, longest in batch] (rounded up to pad_multiple), not 128 columns."""
    seen = []

    class Spy(UnigramLM):
        def forward(self, input_ids, **kw):
            seen.append(tuple(input_ids.shape))
            return super().forward(input_ids)

    reqs = [make_request([1] * n, [2]) for n in (3, 12, 5, 7, 2)]
    Scorer(Spy(torch.zeros(5)), device="cpu", batch_size=2, progress=False).score(reqs)
    assert seen == [(2, 13), (2, 6), (1, 3)]
    seen.clear()
    Scorer(Spy(torch.zeros(5)), device="cpu", batch_size=2, pad_multiple=8, progress=False).score(reqs)
    assert seen == [(2, 16), (2, 8), (1, 8)]


@pytest.mark.parametrize("preset", ["tiny", "dense_tiny"])
def test_scores_do_not_depend_on_padding_or_batch_mates(preset):
    """A real (dropless) model: every request scored alone, unpadded, equals the same request
    scored in shuffled batches of other requests padded to 128 (the paper's layout)."""
    from moeut.registry import build_model, get_preset
    torch.manual_seed(0)
    model = build_model(get_preset(preset, vocab_size=64)).eval()
    rnd = random.Random(1)
    reqs = [make_request([rnd.randrange(64) for _ in range(rnd.randrange(1, 30))],
                         [rnd.randrange(64) for _ in range(rnd.randrange(1, 6))]) for _ in range(24)]
    alone = [Scorer(model, device="cpu", batch_size=1, progress=False).score([r])[0] for r in reqs]
    for batch_size, pad in ((5, 128), (24, 1), (7, 3)):
        order = list(range(len(reqs)))
        rnd.shuffle(order)
        res = Scorer(model, device="cpu", batch_size=batch_size, pad_multiple=pad,
                     progress=False).score([reqs[i] for i in order])
        for k, i in enumerate(order):
            assert res[k].logprob == pytest.approx(alone[i].logprob, abs=1e-4)
            assert res[k].n_scored == alone[i].n_scored and res[k].greedy == alone[i].greedy


def test_tie_counts_as_wrong_and_normalisation_by_tokens():
    assert not is_correct([-1.0, -1.0], 0)  # tie: wrong
    assert is_correct([-0.9, -1.0, -3.0], 0)
    assert not is_correct([-0.9, -0.9, -3.0], 1)

    class R:  # minimal stand-ins for ScoreResult
        def __init__(self, lp, n):
            self.logprob, self.n_scored = lp, n
    # option 0: 1 token, -1.0 ; option 1: 2 tokens, -1.5 in total
    assert option_scores([R(-1.0, 1), R(-1.5, 2)], normalize=False) == [-1.0, -1.5]
    assert option_scores([R(-1.0, 1), R(-1.5, 2)], normalize=True) == [-1.0, -0.75]


class CharTokenizer:
    """One id per character (a-z, space): continuation length in tokens = length in characters."""
    vocab_size = 27

    def encode(self, s):
        return [26 if ch == " " else ord(ch) - 97 for ch in s]


def test_multiple_choice_uniform_model_ties_and_lengths():
    """Uniform model: every token scores -log V. Unnormalised, the strictly shortest option wins;
    normalised, all options tie and every item counts as wrong."""
    tok = CharTokenizer()
    items = [MCItem("ab", [" cd", " efgh"], gold=0, group="g1"),   # gold shorter -> right
             MCItem("ab", [" cdef", " gh"], gold=0, group="g1"),   # gold longer -> wrong
             MCItem("ab", [" cd", " ef"], gold=1, group="g2")]     # same length -> tie -> wrong
    scorer = Scorer(UnigramLM(torch.zeros(27)), device="cpu", progress=False)
    m = evaluate_multiple_choice(items, scorer, tok, normalize=False)
    assert m["groups"]["g1"] == {"n_ok": 1, "n_total": 2, "accuracy": 0.5}
    assert m["groups"]["g2"]["n_ok"] == 0
    assert m["group_average"] == pytest.approx(0.25) and m["seq_average"] == pytest.approx(1 / 3)
    m = evaluate_multiple_choice(items, scorer, tok, normalize=True)
    assert m["seq_average"] == 0.0


def test_normalisation_flips_the_choice():
    """Unigram model with log P('a') = log .5, others tiny: option ' a' (2 tokens: space, a) vs
    ' aaa' (4 tokens): normalised, the longer one has the better per-token mean."""
    p = torch.full((27,), 0.01)
    p[0] = 0.5
    p[26] = 0.01 * 1  # space
    logits = p.log()
    tok = CharTokenizer()
    items = [MCItem("b", [" a", " aaa"], gold=1)]
    scorer = Scorer(UnigramLM(logits), device="cpu", progress=False)
    lsm = torch.log_softmax(logits.double(), -1)
    s_short, s_long = float(lsm[26] + lsm[0]), float(lsm[26] + 3 * lsm[0])
    assert s_short > s_long and s_long / 4 > s_short / 2  # the premise of this test
    assert evaluate_multiple_choice(items, scorer, tok, normalize=False)["seq_average"] == 0.0
    assert evaluate_multiple_choice(items, scorer, tok, normalize=True)["seq_average"] == 1.0


def test_max_length_left_truncates_context_only():
    table = torch.randn(7, 7)
    scorer = Scorer(BigramLM(table), device="cpu", max_length=5, progress=False)
    r = make_request([1, 2, 3, 4, 5, 6], [2, 3])
    out = scorer.score([r])[0]
    # a bigram model sees only the previous token, so truncation leaves the score unchanged
    assert out.logprob == pytest.approx(naive_score(table, r.ids, r.score_from), abs=1e-9)
    with pytest.raises(ValueError, match="does not fit"):
        scorer.score([make_request([1], [1, 2, 3, 4, 5, 6])])


@pytest.mark.gpu
def test_cuda_bf16_autocast_close_to_cpu_fp32():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from moeut.registry import build_model, get_preset
    torch.manual_seed(0)
    model = build_model(get_preset("tiny"))
    rnd = random.Random(0)
    reqs = [make_request([rnd.randrange(512) for _ in range(20)], [rnd.randrange(512) for _ in range(5)], item=k)
            for k in range(40)]
    cpu = Scorer(model, device="cpu", progress=False).score(reqs)
    gpu_scorer = Scorer(model, device="cuda", progress=False)
    assert gpu_scorer.autocast_dtype == torch.bfloat16  # 'auto' = bf16 on CUDA
    gpu = gpu_scorer.score(reqs)
    for a, b in zip(cpu, gpu):
        assert b.logprob == pytest.approx(a.logprob, rel=0.05, abs=0.2)
