"""Collection of the offline routing statistics (moeut.analysis.collect, SPEC 7.1): the validation
windows made by the data pipeline against a hand-built token stream, and the accumulation over a
pass (moeut.analysis.routing.RoutingStats.add) against naive per-token loops and hand-made
routings with known answers."""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

TESTS = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(TESTS))
from routing_fakes import FakeMoE, FakeMoEConfig, random_sets, record  # noqa: E402

from moeut.analysis import stats as A  # noqa: E402

REPO = TESTS.parent
from conftest import C4  # noqa: E402  (the embedded corpus, data/README.md)

C4_VALID = C4 / "valid.jsonl.gz"
from moeut.analysis import collect as C  # noqa: E402
from moeut.analysis import figures as F  # noqa: E402
from moeut.analysis.routing import RoutingStats  # noqa: E402


def naive_windows(stream, T, max_tokens=None):
    """Window i = stream[i*T : i*T + T + 1] for i while the window fits in the first max_tokens + 1."""
    usable = len(stream) if max_tokens is None else min(len(stream), max_tokens + 1)
    return np.array([stream[i * T:i * T + T + 1] for i in range((usable - 1) // T)])


# ------------------------------------------------------------------------------------------
# Validation windows made by moeut.data
# ------------------------------------------------------------------------------------------


def _hand_stream(tok, texts):
    """SPEC 5.3 by hand: each non-empty document + DOC_SEPARATOR encoded on its own, concatenated."""
    from moeut.data.tokenizer import DOC_SEPARATOR
    return np.array([i for t in texts if t for i in tok.encode(t + DOC_SEPARATOR)], dtype=np.int64)


def test_validation_windows_equal_hand_built_windows_of_the_file(small_tokenizer):
    import gzip
    tok = small_tokenizer
    texts = [json.loads(line)["text"] for line in gzip.open(C4_VALID, "rt")]
    stream = _hand_stream(tok, texts)
    w = C.validation_windows(tok, str(C4_VALID), seq_len=32, max_tokens=992)
    assert w.dtype == np.int64 and w.shape == (31, 33)
    np.testing.assert_array_equal(w, naive_windows(stream, 32, 992))
    np.testing.assert_array_equal(w[1, 0], w[0, -1])  # the last target is the next window's first input
    with pytest.warns(UserWarning, match=r"the last 54 of 12,554 tokens \(the whole stream\) do not fill a window of seq_len=500"):
        whole = C.validation_windows(tok, str(C4_VALID), seq_len=500, max_tokens=None)  # the whole text
    np.testing.assert_array_equal(whole, naive_windows(stream, 500))


def test_validation_windows_read_like_training_data(small_tokenizer, tmp_path):
    tok = small_tokenizer
    nulls = tmp_path / "n.jsonl"  # a null or empty text is an empty document: dropped, no separator
    nulls.write_text('{"text": "a b c d e f g"}\n{"text": null}\n\n{"text": ""}\n{"text": "h i j k"}\n')
    stream = _hand_stream(tok, ["a b c d e f g", "h i j k"])
    n = (len(stream) - 1) // 4 * 4  # whole windows only: nothing left over, no warning
    np.testing.assert_array_equal(C.validation_windows(tok, str(nulls), seq_len=4, max_tokens=n),
                                  naive_windows(stream, 4, n))
    d = tmp_path / "d"  # directories are read recursively, files sorted, like training data
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "b.txt").write_text("second document here")
    (d / "a.jsonl").write_text('{"text": "first document"}\n')
    stream = _hand_stream(tok, ["first document", "second document here"])
    n = (len(stream) - 1) // 3 * 3
    np.testing.assert_array_equal(C.validation_windows(tok, str(d), seq_len=3, max_tokens=n), naive_windows(stream, 3, n))


def test_validation_windows_errors_name_the_option(small_tokenizer, tmp_path):
    tok = small_tokenizer
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=r"data.path: .*x.jsonl:2: record has no field 'text'"):
        C.validation_windows(tok, str(bad), seq_len=4)
    with pytest.raises(FileNotFoundError, match="data.path: .*missing.jsonl.gz does not exist"):
        C.validation_windows(tok, str(tmp_path / "missing.jsonl.gz"), seq_len=4)
    (tmp_path / "e").mkdir()
    with pytest.raises(ValueError, match="data.path: data directory .* contains no usable text files"):
        C.validation_windows(tok, str(tmp_path / "e"), seq_len=4)
    with pytest.raises(ValueError, match="seq_len=20000: the validation text has only 12555 tokens"):
        C.validation_windows(tok, str(C4_VALID), seq_len=20000, max_tokens=None)
    n = len(_hand_stream(tok, ["a b c d e f g h"]))
    short = tmp_path / "s.txt"
    short.write_text("a b c d e f g h")
    T = next(t for t in (3, 4, 5, 6, 7) if (n - 1) % t)  # a length that leaves tokens over
    with pytest.warns(UserWarning, match=rf"data.path={short}: the last {(n - 1) % T} of {n - 1} tokens .* seq_len={T} "):
        C.validation_windows(tok, str(short), seq_len=T)
    assert not [p for p in tmp_path.iterdir() if p.name not in ("x.jsonl", "e", "s.txt")]  # no cache left here


# ------------------------------------------------------------------------------------------
# Accumulation over a pass: hand-made routings with known answers
# ------------------------------------------------------------------------------------------


def _collect_fake(shift, cfg=None, n_tokens=600, seq_len=16, seed=0):
    cfg = cfg or FakeMoEConfig()
    stream = np.random.default_rng(seed).integers(0, cfg.vocab_size, n_tokens)
    arrays, meta = C.collect(FakeMoE(cfg, shift), cfg, naive_windows(stream, seq_len), batch_size=8,
                             progress=False)
    return cfg, dict(arrays, meta=meta)


def test_same_experts_every_layer_gives_jaccard_one_and_no_diagonal():
    cfg, st = _collect_fake(shift=0)
    R = cfg.n_layers // cfg.group_size
    for g in range(cfg.group_size):
        np.testing.assert_allclose(A.jaccard_from_sums(st["jaccard_sum"][g], int(st["n_positions"])), np.ones((R, R)))
        # every expert is used equally at every repetition: P = 1/R, no layer preference at all,
        # so nothing passes the quantile threshold and every score is 0 (no diagonal to sort into)
        p = A.expert_layer_usage(st["mlp_counts"][g])
        np.testing.assert_allclose(p[:, p.sum(0) > 0], 1 / R)
        _, score = A.com_order(p)
        np.testing.assert_allclose(score, 0)
    tec = A.token_counts_from_stats(st)
    seen = st["token_freq"] > 0
    for l in range(cfg.n_layers):
        n_used = A.distinct_experts_per_token(tec, int(st["layer_g"][l]), int(st["layer_r"][l]))
        np.testing.assert_array_equal(n_used[seen], cfg.ff_k)  # token identity fixes its K experts
        np.testing.assert_array_equal(n_used[~seen], 0)
    img = A.layer_share_of_token_set(tec, 0, A.top_tokens(st["token_freq"], 6000))
    np.testing.assert_allclose(img, 1.0)


def test_disjoint_layers_give_identity_jaccard_and_diagonal_usage():
    # shift = K: layer l uses experts {v + l*K + j}; with N_E = R*G*K = 8 the four layers are
    # disjoint per token -> Jaccard = identity, consecutive overlap 0.
    cfg, st = _collect_fake(shift=2)
    R = 2
    for g in range(2):
        np.testing.assert_allclose(A.jaccard_from_sums(st["jaccard_sum"][g], int(st["n_positions"])), np.eye(R))
        assert st["intersection_sum"][g, 1, 0] == 0
    np.testing.assert_allclose(A.layer_share_of_token_set(A.token_counts_from_stats(st), 0,
                                                          A.top_tokens(st["token_freq"], 10)), 0.5)


def test_aabb_layer_order_uses_record_fields():
    # "aabb": l -> g = l div R, r = l mod R (SPEC 1.1). Same-experts routing still gives Jaccard 1.
    cfg = FakeMoEConfig(layer_order="aabb")
    _, st = _collect_fake(shift=0, cfg=cfg)
    np.testing.assert_array_equal(st["layer_g"], [0, 0, 1, 1])
    np.testing.assert_array_equal(st["layer_r"], [0, 1, 0, 1])
    np.testing.assert_allclose(A.jaccard_from_sums(st["jaccard_sum"][1], int(st["n_positions"])), 1.0)
    assert F._layers_of_member(st, 1) == [2, 3]
    # with shift = 2 (layers disjoint), member 0 = layers 0 and 1: F2 still sees K experts per token
    _, st = _collect_fake(shift=2, cfg=cfg)
    np.testing.assert_allclose(A.jaccard_from_sums(st["jaccard_sum"][0], int(st["n_positions"])), np.eye(2))


def test_norms_and_attention_counts_from_fake():
    cfg, st = _collect_fake(shift=1)
    np.testing.assert_allclose(A.layer_means(st["in_norm_sum"], st["norm_count"]), [1, 2, 3, 4])
    np.testing.assert_allclose(A.layer_means(st["update_norm_sum"], st["norm_count"]), [0.5, 1, 1.5, 2])
    np.testing.assert_allclose(A.layer_means(st["rel_update_sum"], st["norm_count"]), 0.5)
    n = int(st["n_positions"])
    assert st["att_v_counts"].sum() == n * cfg.n_layers * cfg.n_heads * cfg.att_k
    # head h of token v uses V expert (v + h) mod E: count = number of tokens with that residue
    freq = st["token_freq"]
    for h in range(cfg.n_heads):
        for e in range(cfg.att_n_experts):
            expect = freq[(np.arange(cfg.vocab_size) + h) % cfg.att_n_experts == e].sum()
            assert st["att_v_counts"][0, 0, h, e] == expect


def test_accumulator_matches_naive_loops_on_random_routing():
    rng = np.random.default_rng(3)
    G, R, NE, K, V, B, T = 2, 3, 6, 2, 11, 2, 7
    acc = RoutingStats(G, R, NE, vocab_size=V, store_positions=10)
    naive_n = np.zeros((G, R, NE, V), dtype=np.int64)
    all_sets = []
    for _ in range(3):
        ids = rng.integers(0, V, (B, T))
        sets = {(g, r): random_sets(rng, (B, T), NE, K) for g in range(G) for r in range(R)}
        recs = [record(r * G + g, g, r, sets[g, r]) for r in range(R) for g in range(G)]
        acc.add(torch.as_tensor(ids), recs[::-1])
        for (g, r), s in sets.items():
            for b in range(B):
                for t in range(T):
                    for e in s[b, t]:
                        naive_n[g, r, e, ids[b, t]] += 1
        all_sets.append(np.stack([np.stack([sets[g, r].reshape(B * T, K) for r in range(R)], 1)
                                  for g in range(G)], 0))  # [G, N, R, K]
    arr = acc.arrays()
    st = dict(arr, meta=dict(n_groups=G, n_repeats=R, n_experts=NE, vocab_size=V))
    np.testing.assert_array_equal(A.token_counts_from_stats(st).to_dense(), naive_n)
    np.testing.assert_array_equal(arr["mlp_counts"], naive_n.sum(-1))
    sets_all = np.concatenate(all_sets, 1)  # [G, 42, R, K]
    for g in range(G):
        np.testing.assert_allclose(A.jaccard_from_sums(arr["jaccard_sum"][g], int(arr["n_positions"])),
                                   A.jaccard_matrix(sets_all[g]))
    # stored per-position sets: the first 10 positions, layers in execution order l = r*G + g
    assert arr["sets"].shape == (10, G * R, K)
    np.testing.assert_array_equal(arr["sets"][:, 1 * G + 0], sets_all[0, :10, 1])
    # F3 against a direct set computation for member 0
    top = A.top_tokens(arr["token_freq"], 5)
    img = A.layer_share_of_token_set(A.token_counts_from_stats(st), 0, top)
    for i, v in enumerate(top):
        union = set(np.nonzero(naive_n[0, :, :, v].sum(0))[0])
        for r in range(R):
            assert img[r, i] == pytest.approx(len(set(np.nonzero(naive_n[0, r, :, v])[0])) / len(union))


def test_accumulator_rejects_missing_layers():
    acc = RoutingStats(1, 2, 4, vocab_size=10)
    with pytest.raises(ValueError, match="one routing record per absolute layer"):
        acc.add(torch.zeros(1, 2, dtype=torch.long), [record(0, 0, 0, [[[0], [1]]])])
