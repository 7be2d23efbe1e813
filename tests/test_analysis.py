"""Expert-specialisation analysis (SPEC §7): every statistic on hand-made routings with known
answers, the accumulation against naive loops, and the whole suite (`python -m moeut.analyze`,
figures, report, notebooks) on a tiny MoEUT checkpoint trained on real C4 text."""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_fakes import FakeMoE, FakeMoEConfig, random_sets, record  # noqa: E402

from moeut.analysis import stats as A  # noqa: E402
from moeut import analyze as Z  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
from conftest import C4  # noqa: E402  (the embedded corpus, data/README.md)

C4_VALID = C4 / "valid.jsonl.gz"


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


# ------------------------------------------------------------------------------------------
# NumPy statistics with hand-computed answers
# ------------------------------------------------------------------------------------------


def test_relative_perplexity_dead_fraction_intersection():
    assert A.relative_perplexity(np.array([5, 5, 5, 5])) == pytest.approx(1.0)
    assert A.relative_perplexity(np.array([3, 3, 0, 0])) == pytest.approx(0.5)
    assert A.relative_perplexity(np.array([7, 0, 0, 0])) == pytest.approx(0.25)
    assert np.isnan(A.relative_perplexity(np.zeros(3)))
    assert A.dead_fraction(np.array([1, 0, 2, 0, 0])) == pytest.approx(0.6)
    m = A.histogram_intersection(np.array([[1, 1, 0], [0, 1, 1], [2, 2, 0]]))
    np.testing.assert_allclose(m, [[1, 0.5, 1], [0.5, 1, 0.5], [1, 0.5, 1]])
    assert A.universal_score(m) == pytest.approx(7 / 9)
    assert A.offdiag_max_mean(m) == pytest.approx((1 + 0.5 + 1) / 3)


def test_f1_com_order_on_constructed_p():
    # Columns: e0 peaks at r=2, e1 at r=0, e2 mostly r=1, e3 flat.
    p = np.array([[0.0, 1.0, 0.2, 1 / 3],
                  [0.0, 0.0, 0.6, 1 / 3],
                  [1.0, 0.0, 0.2, 1 / 3]])
    # 0.9-quantiles (linear): e0 0.8, e1 0.8, e2 0.2 + 0.8*0.4 = 0.52, e3 1/3 (nothing above).
    # scores (paper formula): e0 2*1, e1 0*1, e2 1*0.6, e3 0 -> ascending, stable: 1, 3, 2, 0.
    order, score = A.com_order(p)
    np.testing.assert_allclose(score, [2.0, 0.0, 0.6, 0.0])
    np.testing.assert_array_equal(order, [1, 3, 2, 0])
    # normalised: e2 -> 0.6/0.6 * 1 = 1; e3 falls back to its plain centre of mass (0+1+2)/3 = 1.
    order_n, score_n = A.com_order(p, normalised=True)
    np.testing.assert_allclose(score_n, [2.0, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(order_n, [1, 2, 3, 0])
    # P from counts: columns normalised, an unused expert stays 0.
    np.testing.assert_allclose(A.expert_layer_usage(np.array([[1, 0], [3, 0]])), [[0.25, 0], [0.75, 0]])


def test_f1_unnormalised_score_is_not_a_centre_of_mass_for_r9():
    # SPEC 7.2 note: with R = 9 only the max survives the 0.9-quantile, score = r_max * P_max.
    p = np.zeros((9, 1))
    p[3, 0], p[6, 0] = 0.4, 0.6
    _, score = A.com_order(p)
    assert score[0] == pytest.approx(6 * 0.6)
    _, score_n = A.com_order(p, normalised=True)
    assert score_n[0] == pytest.approx(6.0)


def test_jaccard_and_overlap_hand_cases():
    same = np.array([[[0, 1], [0, 1], [1, 0]]])  # one position, R=3, identical sets
    np.testing.assert_allclose(A.jaccard_matrix(same), np.ones((3, 3)))
    sets = np.array([[[0, 1], [1, 2], [3, 4]]])  # {0,1} vs {1,2}: 1/3; vs {3,4}: 0
    np.testing.assert_allclose(A.jaccard_matrix(sets), [[1, 1 / 3, 0], [1 / 3, 1, 0], [0, 0, 1]])
    np.testing.assert_allclose(A.consecutive_overlap(sets), [0.5, 0.0])


def test_top_tokens_and_f2_curve():
    freq = np.array([0, 5, 9, 5, 1])
    np.testing.assert_array_equal(A.top_tokens(freq, 3), [2, 1, 3])  # tie 1/3 by id
    np.testing.assert_array_equal(A.top_tokens(freq, 10), [2, 1, 3, 4])  # never-seen id 0 excluded
    np.testing.assert_array_equal(A.f2_curve(np.array([3, 0, 1, 2, 0]), 2), [1, 2])


def test_token_counts_roundtrip_and_f2_f3_by_hand():
    n = np.zeros((1, 2, 3, 4), dtype=np.int64)  # G=1, R=2, N_E=3, V=4
    n[0, 0, 0, 1] = 2
    n[0, 0, 1, 1] = 1
    n[0, 1, 2, 1] = 4
    n[0, 1, 0, 3] = 1
    tec = A.TokenExpertCounts.from_dense(n)
    np.testing.assert_array_equal(tec.to_dense(), n)
    keys = (((tec.g * 2 + tec.r) * 3 + tec.e) * 4 + tec.v)
    np.testing.assert_array_equal(A.TokenExpertCounts.from_keys(keys, tec.count, n.shape).to_dense(), n)
    np.testing.assert_array_equal(A.distinct_experts_per_token(tec, 0, 0), [0, 2, 0, 0])
    np.testing.assert_array_equal(A.distinct_experts_per_token(tec, 0, 1), [0, 1, 0, 1])
    # token 1: set over layers {0,1,2}: r0 has 2 of 3, r1 has 1 of 3; token 3: {0}: r0 0, r1 1.
    img = A.layer_share_of_token_set(tec, 0, np.array([1, 3]))
    np.testing.assert_allclose(img, [[2 / 3, 0], [1 / 3, 1]])


def test_metrics_jsonl_reading(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 10, "moe/g0/usage_rel_ppl": 0.5, "loss": 3}\n\n'
                 '{"step": 5, "moe/g0/usage_rel_ppl": 0.25, "activation_norm/in_layer_0": 2.0}\n'
                 '{"step": 20, "activation_norm/in_layer_0": 3.0, "activation_norm/in_layer_1": 4}\n')
    rows = A.read_metrics_jsonl(str(p))
    s = A.metric_series(rows, "moe/")
    assert list(s) == ["moe/g0/usage_rel_ppl"]
    np.testing.assert_array_equal(s["moe/g0/usage_rel_ppl"][0], [5, 10])
    np.testing.assert_array_equal(s["moe/g0/usage_rel_ppl"][1], [0.25, 0.5])
    assert A.final_layer_values(rows, "activation_norm/in_layer_") == {0: 3.0, 1: 4.0}
    p.write_text('{"step": 1}\n{"step": 2,\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        A.read_metrics_jsonl(str(p))


# ------------------------------------------------------------------------------------------
# Data handling
# ------------------------------------------------------------------------------------------


def test_make_windows_layout_and_errors():
    w = Z.make_windows(np.arange(23), 5)
    assert w.shape == (4, 6)  # (23 - 1) // 5 windows of T+1
    np.testing.assert_array_equal(w[1], [5, 6, 7, 8, 9, 10])  # inputs do not overlap; last target = next start
    assert Z.make_windows(np.arange(23), 5, max_tokens=10).shape == (2, 6)
    with pytest.raises(ValueError, match="seq_len=50"):
        Z.make_windows(np.arange(23), 50)


def test_load_texts_errors(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=r"data.path: .*x.jsonl:2: record has no field 'text'"):
        Z.load_texts(str(bad))
    with pytest.raises(FileNotFoundError, match="data.path"):
        Z.load_texts(str(tmp_path / "missing.jsonl.gz"))
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="data.path: data directory .* contains no usable text files"):
        Z.load_texts(str(tmp_path / "d"))
    nulls = tmp_path / "n.jsonl"   # a null text is an empty document, not the string "None"
    nulls.write_text('{"text": "a b"}\n{"text": null}\n\n{"text": "c"}\n')
    assert Z.load_texts(str(nulls)) == ["a b", "", "c"]
    (tmp_path / "d" / "sub").mkdir()   # directories are read recursively, files sorted, like training data
    (tmp_path / "d" / "sub" / "b.txt").write_text("second")
    (tmp_path / "d" / "a.jsonl").write_text('{"text": "first"}\n')
    assert Z.load_texts(str(tmp_path / "d")) == ["first", "second"]
    assert len(Z.load_texts(str(C4_VALID))) == 20


# ------------------------------------------------------------------------------------------
# Accumulation over a pass: hand-made routings with known answers
# ------------------------------------------------------------------------------------------


def _collect_fake(shift, cfg=None, n_tokens=600, seq_len=16, seed=0):
    cfg = cfg or FakeMoEConfig()
    stream = np.random.default_rng(seed).integers(0, cfg.vocab_size, n_tokens)
    arrays, meta = Z.collect(FakeMoE(cfg, shift), cfg, Z.make_windows(stream, seq_len), batch_size=8,
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
    assert Z._layers_of_member(st, 1) == [2, 3]
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
    acc = Z.RoutingAccumulator(G, R, NE, V, store_positions=10)
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
    acc = Z.RoutingAccumulator(1, 2, 4, 10)
    with pytest.raises(ValueError, match="one routing record per absolute layer"):
        acc.add(torch.zeros(1, 2, dtype=torch.long), [record(0, 0, 0, [[[0], [1]]])])


def test_figures_and_report_from_fake(tmp_path):
    cfg, st = _collect_fake(shift=1)
    st["meta"].update(run_name="fake_run", checkpoint="none", step=0, data_path="random")
    Z.save_stats(str(tmp_path / "routing_stats.npz"), {k: v for k, v in st.items() if k != "meta"}, st["meta"])
    stats = A.load_stats(str(tmp_path))
    fcfg = Z.FigureConfig(dpi=50, formats=["png"])
    rows = [{"step": s, "moe/g0/usage_rel_ppl": 0.5 + s / 100, "moe/g1/dead_frac": 0.1} for s in (10, 20)]
    infos = Z.draw_all(stats, str(tmp_path / "figures"), run="fake_run", fcfg=fcfg, metrics_rows=rows)
    names = {i.name for i in infos}
    assert {"f1_expert_layer_g0", "f1_expert_layer_g1_normalised", "f2_expert_count_per_token_per_layer",
            "f3_experts_per_token_per_layer", "f4_layer_similarity_g0", "f5_update_magnitude", "f5_in_norm",
            "f6_att_v_g0", "f6_att_o_g1", "training_routing_metrics"} <= names
    for i in infos:
        w, h = png_size(tmp_path / i.files[0])
        assert (w, h) == (round(i.figsize[0] * 50), round(i.figsize[1] * 50)), i.name
    md, html_path = Z.write_report(str(tmp_path), infos, stats["meta"], "fake_run")
    text = Path(md).read_text()
    assert text.count("![") == len(infos) and "fake_run" in text
    assert Path(html_path).read_text().count("<img") == len(infos)


# ------------------------------------------------------------------------------------------
# The whole suite on a tiny MoEUT checkpoint trained on real C4 text
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, small_tokenizer, c4_texts):
    from moeut.checkpoint import save_checkpoint
    from moeut.registry import build_model, get_preset
    from moeut.routing import RoutingStats

    tok = small_tokenizer
    cfg = get_preset("tiny", vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg)
    stream = Z.token_stream(tok, c4_texts[300:360])
    windows = torch.from_numpy(Z.make_windows(stream, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    run = tmp_path_factory.mktemp("runs") / "tiny_c4"
    run.mkdir()
    stats = RoutingStats.from_config(cfg)
    with open(run / "metrics.jsonl", "w") as log:
        for step in range(20):
            w = windows[(step * 8) % (len(windows) - 8):][:8]
            out = model(w[:, :-1], collect_routing=step % 5 == 0)
            loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, cfg.vocab_size),
                                                     w[:, 1:].reshape(-1)) + out.reg_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if out.routing is not None:
                stats.update(out.routing)
                log.write(json.dumps({"step": step, "loss": loss.item(), **stats.compute()}) + "\n")
                stats.reset()
    save_checkpoint(run / "checkpoints", 20, model, cfg, tokenizer=tok, meta={"tokens_seen": 20 * 8 * 32})
    return run, cfg


def test_analyze_command_on_tiny_checkpoint(tiny_run):
    run, cfg = tiny_run
    cmd = [sys.executable, "-m", "moeut.analyze", f"checkpoint={run}", "seq_len=32", "batch_size=8",
           "max_tokens=2048", f"data.path={C4_VALID}", "device=cpu", "figures.dpi=60",
           "figures.f2_layers=[0,1,2,3]", "store_positions=256"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-3000:]
    out = run / "analysis"
    stats = A.load_stats(str(out))
    meta = stats["meta"]
    assert meta["n_tokens"] == 2048 and meta["step"] == 20
    assert 1 < meta["val_ppl"] < cfg.vocab_size  # trained a little on real text: better than uniform
    assert stats["mlp_counts"].sum() == 2048 * cfg.n_layers * cfg.ff_k
    assert stats["sets"].shape == (256, cfg.n_layers, cfg.ff_k)
    # a real router: Jaccard has diagonal 1, lies in [0, 1], and the stored per-position sets give
    # the same matrix as a naive computation on that subset
    G = cfg.group_size
    for g in range(G):
        j = A.jaccard_from_sums(stats["jaccard_sum"][g], int(stats["n_positions"]))
        np.testing.assert_allclose(np.diag(j), 1.0)
        assert ((0 <= j) & (j <= 1 + 1e-12)).all()
        layers = [g, g + G]  # abab: member g at l = g and g + G
        sub = stats["sets"][:, layers, :]
        naive = np.mean([len(set(a) & set(b)) / len(set(a) | set(b)) for a, b in zip(sub[:, 0], sub[:, 1])])
        assert A.jaccard_matrix(sub)[0, 1] == pytest.approx(naive)
    index = json.loads((out / "figures" / "index.json").read_text())
    assert index["dpi"] == 60
    names = {f["name"] for f in index["figures"]}
    assert {"f1_expert_layer_g0", "f2_expert_count_per_token_per_layer", "f3_experts_per_token_per_layer",
            "f4_layer_similarity_g0", "f5_update_magnitude", "f6_att_v_g0", "training_routing_metrics"} <= names
    for f in index["figures"]:
        png = out / next(p for p in f["files"] if p.endswith(".png"))
        pdf = out / next(p for p in f["files"] if p.endswith(".pdf"))
        assert png.stat().st_size > 2000 and pdf.stat().st_size > 1000
        assert png_size(png) == (round(f["figsize"][0] * 60), round(f["figsize"][1] * 60)), f["name"]
        if f["name"].startswith(("f1", "f2", "f3", "f4", "f5", "f6")):
            kind = f["name"][:2]
            assert tuple(f["figsize"]) == Z.FIGSIZES[kind]
    report = (out / "report.md").read_text()
    assert "tiny_c4" in report and report.count("![") == len(index["figures"])
    assert (out / "report.html").is_file()
    # redraw only: no model pass, same statistics file reused
    before = (out / "routing_stats.npz").stat().st_mtime_ns
    Z.run_analysis(Z.AnalyzeConfig(checkpoint=str(run), reuse_stats=True,
                                   figures=Z.FigureConfig(formats=["png"], dpi=40), report=False))
    assert (out / "routing_stats.npz").stat().st_mtime_ns == before
    assert png_size(out / "figures" / "f4_layer_similarity_g0.png") == (220, 180)


def test_analyze_seq_len_defaults_to_the_runs_training_length(tiny_run, tmp_path):
    """seq_len=null (the default) analyses at the run's own data.seq_len, read from its saved
    config, not at 1024; a run without a saved config falls back to 1024 with a warning naming
    `seq_len`; an explicit seq_len wins."""
    import shutil
    run, _ = tiny_run
    assert Z.AnalyzeConfig().seq_len is None
    copy = tmp_path / "run_with_config"
    shutil.copytree(run / "checkpoints", copy / "checkpoints")
    (copy / ".hydra").mkdir()
    (copy / ".hydra" / "config.yaml").write_text("name: tiny\ndata:\n  seq_len: 24\n")
    inp = Z.check_inputs(Z.AnalyzeConfig(checkpoint=str(copy), max_tokens=240, data=Z.DataConfig(path=str(C4_VALID))))
    assert inp.seq_len == 24 and inp.windows.shape == (10, 25)  # 240 tokens = 10 windows of T=24
    assert not (copy / "analysis").exists()  # check_inputs writes nothing
    with pytest.warns(UserWarning, match=r"seq_len: null.*seq_len=1024"):
        assert Z.resolve_seq_len(None, str(run)) == 1024  # tiny_run saved no config
    assert Z.resolve_seq_len(48, str(copy)) == 48


def test_analyze_bad_data_path_is_one_line_and_writes_nothing(tiny_run, tmp_path):
    run, _ = tiny_run
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "moeut.analyze", f"checkpoint={run}", "seq_len=32", "device=cpu",
                          "data.path=/nonexistent.txt", f"out_dir={out}"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "1"})
    assert res.returncode == 1, res.stderr[-3000:]
    assert "moeut.analyze: error: data.path: /nonexistent.txt does not exist" in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_analyze_requires_checkpoint():
    res = subprocess.run([sys.executable, "-m", "moeut.analyze"], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode != 0 and "checkpoint" in res.stderr


def test_notebooks_execute_headless(tiny_run, tmp_path):
    pytest.importorskip("nbclient")
    pytest.importorskip("jupytext")
    import jupytext
    run, _ = tiny_run
    if not (run / "analysis" / "routing_stats.npz").is_file():
        Z.run_analysis(Z.AnalyzeConfig(checkpoint=str(run), seq_len=32, batch_size=8, max_tokens=1024,
                                       data=Z.DataConfig(path=str(C4_VALID)), device="cpu",
                                       figures=Z.FigureConfig(formats=["png"], dpi=40)))
    # Only jupytext-paired sources are notebooks (analysis/compare.py is a plain CLI script).
    srcs = [p for p in sorted((REPO / "analysis").glob("*.py")) if p.read_text().startswith("# ---\n# jupyter:")]
    assert {p.name for p in srcs} >= {"expert_usage.py", "attention_and_norms.py"}
    for src in srcs:  # the committed .ipynb is generated from the .py source
        paired = jupytext.read(src.with_suffix(".ipynb"))
        assert [c.source for c in paired.cells] == [c.source for c in jupytext.read(src).cells], \
            f"{src.with_suffix('.ipynb').name} is out of date: run `jupytext --sync {src.relative_to(REPO)}`"
    written = Z.execute_notebooks(str(run), str(tmp_path), [str(s) for s in srcs])
    for path in written:
        nb = jupytext.read(path)
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
        assert not [o for o in outputs if o.get("output_type") == "error"]
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{path}: no figure rendered"


# ------------------------------------------------------------------------------------------
# F2's default layers; the report's two validation perplexities
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_layers,expected", [(1, [0]), (4, [0, 1, 2, 3]), (5, [0, 1, 2, 3, 4]), (8, [0, 2, 4, 6]),
                                               (16, [0, 4, 8, 12]), (18, [0, 4, 8, 12, 16]),
                                               (32, [0, 7, 14, 21, 28])])
def test_f2_default_layers_spread_over_any_depth(n_layers, expected):
    # hand-written: at most 5 layers, the paper's 0, 4, 8, 12, 16 for its 18 layers
    assert Z.f2_layers({"meta": {"n_layers": n_layers}}, None) == expected


def test_f2_draws_every_layer_of_the_4_layer_model():
    cfg, st = _collect_fake(shift=1)  # 4 layers, as the default CPU models
    fig = Z.plot_f2(st, "fake", None, 1000)
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["Layer 1", "Layer 2", "Layer 3", "Layer 4"]
    tec = A.token_counts_from_stats(st)
    for l, ln in enumerate(lines):  # each curve is its own layer's counts
        n_used = A.distinct_experts_per_token(tec, int(st["layer_g"][l]), int(st["layer_r"][l]))
        np.testing.assert_array_equal(ln.get_ydata(), np.sort(n_used[n_used > 0])[:1000])


def test_report_sets_training_validation_beside_the_analysis(tmp_path):
    meta = {"n_tokens": 4096, "n_windows": 128, "seq_len": 32, "val_ppl": 389.28, "data_path": "/d/valid.jsonl.gz",
            "n_groups": 2, "n_repeats": 2, "n_experts": 8, "k": 2}
    rows = [{"step": 5, "validation/val/perplexity": 400.0},
            {"step": 10, "validation/val/perplexity": 389.28, "validation/val/tokens": 4096}]
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(
        "data:\n  valid_path: /d/valid.jsonl.gz\n  valid_tokens: 4096\n  seq_len: 32\n")
    tv = Z.training_validation(rows, str(tmp_path))
    assert tv == {"step": 10, "perplexity": 389.28, "tokens": 4096, "valid_tokens": 4096,
                  "valid_path": "/d/valid.jsonl.gz", "seq_len": 32}
    table = dict(Z._summary_rows(meta, tv))
    assert table["validation perplexity"] == "389.28 over the 4,096 tokens above"
    assert table["training's validation perplexity"].endswith("the same file and as many tokens as here")
    table = dict(Z._summary_rows(dict(meta, n_tokens=20000, n_windows=625, data_path="/other.txt"), tv))
    assert table["training's validation perplexity"] == (
        "389.28 at step 10 (metrics.jsonl validation/val/perplexity) over the run's 4,096 predicted tokens "
        "(data.valid_tokens=4096) of /d/valid.jsonl.gz: another file and another number of tokens than here, so "
        "the two perplexities differ; data.path=/d/valid.jsonl.gz max_tokens=4096 measures the same windows")
    table = dict(Z._summary_rows(dict(meta, seq_len=16, n_windows=256), tv))
    assert table["training's validation perplexity"].endswith(
        "another window length (32) than here, so the two perplexities differ; data.path=/d/valid.jsonl.gz "
        "max_tokens=4096 seq_len=32 measures the same windows")
    assert Z.training_validation([{"step": 1, "train/loss": 3.0}], str(tmp_path)) is None


@pytest.mark.slow
def test_report_perplexity_equals_training_validation_on_the_same_windows(tmp_path):
    """Independent reference: training's own validation perplexity. Analysing the run's validation
    file with max_tokens = its data.valid_tokens measures the same windows, so the same number."""
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo), MPLBACKEND="Agg", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    subprocess.run([sys.executable, "train.py", "experiment=cpu_tiny", "train.steps=4", "optim.warmup=1",
                    "train.val_interval=4", "print_config=false", f"hydra.run.dir={run}",
                    f"data.cache_dir={tmp_path / 'cache'}"], cwd=repo, env=env, check=True, capture_output=True,
                   timeout=600)
    subprocess.run([sys.executable, "-m", "moeut.analyze", f"checkpoint={run}", f"data.path={C4 / 'valid.jsonl.gz'}",
                    "max_tokens=4096", "device=cpu", "figures.formats=[png]", "figures.dpi=20"],
                   cwd=tmp_path, env=env, check=True, capture_output=True, timeout=600)
    last = [r for r in A.read_metrics_jsonl(str(run / "metrics.jsonl")) if "validation/val/perplexity" in r][-1]
    stats = A.load_stats(str(run / "analysis"))
    assert stats["meta"]["n_tokens"] == last["validation/val/tokens"] == 4096 // 32 * 32
    assert stats["meta"]["val_ppl"] == pytest.approx(last["validation/val/perplexity"], rel=1e-5)
    assert "the same file and as many tokens as here" in (run / "analysis" / "report.md").read_text()
