"""The `routing` subcommand of moeut.analysis (SPEC §7): figures and report from a fake pass, and
the whole suite (`python -m moeut.analysis routing`, figures, report, notebooks) on a tiny MoEUT
checkpoint trained on real C4 text."""
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
from moeut.analysis import notebooks as N  # noqa: E402
from moeut.analysis import report as Rp  # noqa: E402
from moeut.analysis import routing_command as Z  # noqa: E402
from moeut.analysis.routing import RoutingStats  # noqa: E402

CMD = [sys.executable, "-m", "moeut.analysis", "routing"]


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def _windows(stream, T):
    return np.array([stream[i * T:i * T + T + 1] for i in range((len(stream) - 1) // T)])


def _collect_fake(shift, cfg=None, n_tokens=600, seq_len=16, seed=0):
    cfg = cfg or FakeMoEConfig()
    stream = np.random.default_rng(seed).integers(0, cfg.vocab_size, n_tokens)
    arrays, meta = C.collect(FakeMoE(cfg, shift), cfg, _windows(stream, seq_len), batch_size=8, progress=False)
    return cfg, dict(arrays, meta=meta)


def test_figures_and_report_from_fake(tmp_path):
    cfg, st = _collect_fake(shift=1)
    st["meta"].update(run_name="fake_run", checkpoint="none", step=0, data_path="random")
    C.save_stats(str(tmp_path / "routing_stats.npz"), {k: v for k, v in st.items() if k != "meta"}, st["meta"])
    stats = A.load_stats(str(tmp_path))
    fcfg = Z.FigureOptions(dpi=50, formats=["png"])
    rows = [{"step": s, "moe/g0/usage_rel_ppl": 0.5 + s / 100, "moe/g1/dead_frac": 0.1} for s in (10, 20)]
    infos = F.draw_all(stats, str(tmp_path / "figures"), run="fake_run", fcfg=fcfg, metrics_rows=rows)
    names = {i.name for i in infos}
    assert {"f1_expert_layer_g0", "f1_expert_layer_g1_normalised", "f2_expert_count_per_token_per_layer",
            "f3_experts_per_token_per_layer", "f4_layer_similarity_g0", "f5_update_magnitude", "f5_in_norm",
            "f6_att_v_g0", "f6_att_o_g1", "training_routing_metrics"} <= names
    for i in infos:
        w, h = png_size(tmp_path / i.files[0])
        assert (w, h) == (round(i.figsize[0] * 50), round(i.figsize[1] * 50)), i.name
    md, html_path = Rp.write_report(str(tmp_path), infos, stats["meta"], "fake_run")
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
    from moeut.data.tokenizer import DOC_SEPARATOR

    tok = small_tokenizer
    cfg = get_preset("tiny", vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg)
    stream = np.concatenate([np.asarray(d) for d in tok.encode_batch([t + DOC_SEPARATOR for t in c4_texts[300:360]])])
    windows = torch.from_numpy(_windows(stream, 32))
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


def test_routing_command_on_tiny_checkpoint(tiny_run):
    run, cfg = tiny_run
    cmd = CMD + [f"checkpoint={run}", "seq_len=32", "batch_size=8",
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
            assert tuple(f["figsize"]) == F.FIGSIZES[kind]
    report = (out / "report.md").read_text()
    assert "tiny_c4" in report and report.count("![") == len(index["figures"])
    assert (out / "report.html").is_file()
    # redraw only: no model pass, same statistics file reused
    before = (out / "routing_stats.npz").stat().st_mtime_ns
    Z.run_analysis(Z.RoutingOptions(checkpoint=str(run), reuse_stats=True,
                                   figures=Z.FigureOptions(formats=["png"], dpi=40), report=False))
    assert (out / "routing_stats.npz").stat().st_mtime_ns == before
    assert png_size(out / "figures" / "f4_layer_similarity_g0.png") == (220, 180)


def test_routing_seq_len_defaults_to_the_runs_training_length(tiny_run, tmp_path):
    """seq_len=null (the default) analyses at the run's own data.seq_len, read from its saved
    config, not at 1024; a run without a saved config falls back to 1024 with a warning naming
    `seq_len`; an explicit seq_len wins."""
    import shutil
    run, _ = tiny_run
    assert Z.RoutingOptions().seq_len is None
    copy = tmp_path / "run_with_config"
    shutil.copytree(run / "checkpoints", copy / "checkpoints")
    (copy / ".hydra").mkdir()
    (copy / ".hydra" / "config.yaml").write_text("name: tiny\ndata:\n  seq_len: 24\n")
    inp = Z.check_inputs(Z.RoutingOptions(checkpoint=str(copy), max_tokens=240, data=Z.DataOptions(path=str(C4_VALID))))
    assert inp.seq_len == 24 and inp.windows.shape == (10, 25)  # 240 tokens = 10 windows of T=24
    assert not (copy / "analysis").exists()  # check_inputs writes nothing
    with pytest.warns(UserWarning, match=r"seq_len: null.*seq_len=1024"):
        assert C.resolve_seq_len(None, str(run)) == 1024  # tiny_run saved no config
    assert C.resolve_seq_len(48, str(copy)) == 48


def test_routing_bad_data_path_is_one_line_and_writes_nothing(tiny_run, tmp_path):
    run, _ = tiny_run
    out = tmp_path / "out"
    res = subprocess.run(CMD + [f"checkpoint={run}", "seq_len=32", "device=cpu",
                          "data.path=/nonexistent.txt", f"out_dir={out}"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "1"})
    assert res.returncode == 1, res.stderr[-3000:]
    assert "moeut.analysis routing: error: data.path: /nonexistent.txt does not exist" in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_routing_requires_checkpoint():
    from test_cli_help import tool_output  # the one run of `python -m moeut.analysis routing` (no options)
    res = tool_output("moeut.analysis routing")[0]
    assert res.returncode == 1, res.stderr[-3000:]
    assert "moeut.analysis routing: error: checkpoint: required" in res.stderr and "Traceback" not in res.stderr


def test_notebooks_execute_headless(tiny_run, tmp_path):
    pytest.importorskip("nbclient")
    pytest.importorskip("jupytext")
    import jupytext
    run, _ = tiny_run
    if not (run / "analysis" / "routing_stats.npz").is_file():
        Z.run_analysis(Z.RoutingOptions(checkpoint=str(run), seq_len=32, batch_size=8, max_tokens=1024,
                                       data=Z.DataOptions(path=str(C4_VALID)), device="cpu",
                                       figures=Z.FigureOptions(formats=["png"], dpi=40)))
    # Only jupytext-paired sources are notebooks (a plain script in analysis/ is not).
    srcs = [p for p in sorted((REPO / "analysis").glob("*.py")) if p.read_text().startswith("# ---\n# jupyter:")]
    assert {p.name for p in srcs} >= {"expert_usage.py", "attention_and_norms.py"}
    for src in srcs:  # the committed .ipynb is generated from the .py source
        paired = jupytext.read(src.with_suffix(".ipynb"))
        assert [c.source for c in paired.cells] == [c.source for c in jupytext.read(src).cells], \
            f"{src.with_suffix('.ipynb').name} is out of date: run `jupytext --sync {src.relative_to(REPO)}`"
    written = N.execute_notebooks(str(run), str(tmp_path), [str(s) for s in srcs])
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
    assert F.f2_layers({"meta": {"n_layers": n_layers}}, None) == expected


def test_f2_draws_every_layer_of_the_4_layer_model():
    cfg, st = _collect_fake(shift=1)  # 4 layers, as the default CPU models
    fig = F.plot_f2(st, "fake", None, 1000)
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
    tv = Rp.training_validation(rows, str(tmp_path))
    assert tv == {"step": 10, "perplexity": 389.28, "tokens": 4096, "valid_tokens": 4096,
                  "valid_path": "/d/valid.jsonl.gz", "seq_len": 32}
    table = dict(Rp._summary_rows(meta, tv))
    assert table["validation perplexity"] == "389.28 over the 4,096 tokens above"
    assert table["training's validation perplexity"].endswith("the same file and as many tokens as here")
    table = dict(Rp._summary_rows(dict(meta, n_tokens=20000, n_windows=625, data_path="/other.txt"), tv))
    assert table["training's validation perplexity"] == (
        "389.28 at step 10 (metrics.jsonl validation/val/perplexity) over the run's 4,096 predicted tokens "
        "(data.valid_tokens=4096) of /d/valid.jsonl.gz: another file and another number of tokens than here, so "
        "the two perplexities differ; data.path=/d/valid.jsonl.gz max_tokens=4096 measures the same windows")
    table = dict(Rp._summary_rows(dict(meta, seq_len=16, n_windows=256), tv))
    assert table["training's validation perplexity"].endswith(
        "another window length (32) than here, so the two perplexities differ; data.path=/d/valid.jsonl.gz "
        "max_tokens=4096 seq_len=32 measures the same windows")
    assert Rp.training_validation([{"step": 1, "train/loss": 3.0}], str(tmp_path)) is None


@pytest.mark.slow
def test_report_perplexity_equals_training_validation_on_the_same_windows(tmp_path):
    """Independent reference: training's own validation perplexity. Analysing the run's validation
    file with max_tokens = its data.valid_tokens measures the same windows, so the same number."""
    repo = REPO
    env = dict(os.environ, PYTHONPATH=str(repo), MPLBACKEND="Agg", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    subprocess.run([sys.executable, "train.py", "experiment=cpu_tiny", "train.steps=4", "optim.warmup=1",
                    "train.val_interval=4", "print_config=false", f"hydra.run.dir={run}",
                    f"data.cache_dir={tmp_path / 'cache'}"], cwd=repo, env=env, check=True, capture_output=True,
                   timeout=600)
    subprocess.run(CMD + [f"checkpoint={run}", f"data.path={C4 / 'valid.jsonl.gz'}",
                    "max_tokens=4096", "device=cpu", "figures.formats=[png]", "figures.dpi=20"],
                   cwd=tmp_path, env=env, check=True, capture_output=True, timeout=600)
    last = [r for r in A.read_metrics_jsonl(str(run / "metrics.jsonl")) if "validation/val/perplexity" in r][-1]
    stats = A.load_stats(str(run / "analysis"))
    assert stats["meta"]["n_tokens"] == last["validation/val/tokens"] == 4096 // 32 * 32
    assert stats["meta"]["val_ppl"] == pytest.approx(last["validation/val/perplexity"], rel=1e-5)
    assert "the same file and as many tokens as here" in (run / "analysis" / "report.md").read_text()
