"""The four expert analyses end to end on a tiny MoEUT run (checkpoints kept by train.keep_every),
against independent references: slot counts = tokens x k, saturation of the final checkpoint with
itself = 1, the two whole-attention knock-outs (all value / all output experts) agree, the
depth analysis at R' = R reproduces the sources analysis' perplexity, report sections are replaced
on a rerun, not duplicated; bad input is one line and exit status 1, nothing written."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[3]
C4 = REPO / "data" / "c4_sample"
BOOKS = REPO / "data" / "books"
SEQ = 32


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_tokenizer):
    """Six checkpoints saved with keep_last=2, keep_every=3: steps 3, 5, 6 remain."""
    from moeut.checkpoint import save_training_checkpoint
    from moeut.registry import build_model, get_preset

    cfg = get_preset("tiny", vocab_size=small_tokenizer.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg)
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    raw = {"data": {"seq_len": SEQ}}
    for step in range(1, 7):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        save_training_checkpoint(str(run_dir), step, model, cfg, train_state={"tokens_seen": step}, tokenizer=small_tokenizer,
                                 raw_config=raw, keep_last=2, keep_every=3)
    return run_dir


def test_keep_every_retains_multiples_besides_keep_last(run):
    assert sorted(os.listdir(run / "checkpoints")) == ["step_0000003", "step_0000005", "step_0000006"]


def opts_of(cls, run, out, **kw):
    base = dict(checkpoint=str(run), sources=[f"c4:{C4 / 'valid.jsonl.gz'}", f"books:{BOOKS / 'valid.jsonl.gz'}"],
                max_tokens=4 * SEQ, batch_size=2, device="cpu", out_dir=str(out))
    base.update(kw)
    return cls(**base)


@pytest.fixture(scope="module")
def sources_result(run, tmp_path_factory):
    from moeut.analysis.evalset import open_evalset
    from moeut.analysis.sources import SourcesOptions, analyse
    out = tmp_path_factory.mktemp("an")
    o = opts_of(SourcesOptions, run, out)
    es = open_evalset(o)
    analyse(es, o)
    summary = analyse(es, o)  # twice: the report section is replaced, not added
    return out, es, summary


def test_sources(sources_result):
    out, es, summary = sources_result
    cfg = es.loaded.config
    z = np.load(out / "sources" / "sources.npz")
    assert list(z["sources"]) == ["c4", "books"] and es.seq_len == SEQ
    tokens = 4 * SEQ
    # every position routes k slots per layer application (MLP) and per head (attention)
    assert (z["counts_mlp"].sum(-1) == tokens * cfg.ff_k).all()
    assert (z["counts_att_v"].sum(-1) == tokens * cfg.n_heads * cfg.att_k).all()
    assert ((z["nmi_mlp"] >= 0) & (z["nmi_mlp"] <= 1)).all()
    assert summary["sources"]["c4"]["tokens"] == tokens
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert md.count("<!-- section:sources -->") == 1 and html.count("<!-- section:sources -->") == 1
    assert md.count("## Expert specialisation by source") == 1
    for f in ("sources_nmi", "sources_share_mlp", "sources_specialisation"):
        assert (out / "figures" / f"{f}.png").stat().st_size > 1000


def test_depth_at_trained_repeats_reproduces_the_forward(run, sources_result):
    from moeut.analysis.depth import DepthOptions, analyse
    out, es, src = sources_result
    o = opts_of(DepthOptions, run, out, repeats=[1, 2, 3])
    d = analyse(es, o)
    R = es.loaded.config.n_layers // es.loaded.config.group_size
    for name in ("c4", "books"):
        assert d["ppl_by_repeats"][name][str(R)] == src["sources"][name]["ppl"]
    assert list(d["ppl_by_repeats"]["c4"]) == ["1", "2", "3"]
    md = (out / "report.md").read_text()
    assert md.count("<!-- section:sources -->") == 1 and md.count("<!-- section:depth -->") == 1  # both kept


def test_knockout(run, sources_result):
    from moeut.analysis.knockout import KnockoutOptions, analyse
    out, es, _ = sources_result
    o = opts_of(KnockoutOptions, run, out, max_experts=3, groups=["mlp/1/0+2"])
    with pytest.warns(UserWarning, match="max_experts=3: 3 of"):
        k = analyse(es, o)
    z = np.load(out / "knockout" / "knockout.npz")
    names = list(z["target"])
    L = es.loaded.config.n_layers
    assert len(names) == 3 + 3 * L + 1 and names[-1] == "group mlp/1/0+2"
    v = {n: i for i, n in enumerate(names)}
    for l in range(L):  # all value experts or all output experts off: both remove the attention branch
        g, r = z["g"][v[f"att_v g{l % 2} r{l // 2} all experts"]], z["r"][v[f"att_v g{l % 2} r{l // 2} all experts"]]
        assert np.array_equal(z["delta"][:, v[f"att_v g{g} r{r} all experts"]], z["delta"][:, v[f"att_o g{g} r{r} all experts"]])
    assert set(k["base_loss"]) == {"c4", "books"}


def test_dynamics(run, tmp_path):
    from moeut.analysis.dynamics import DynamicsOptions, analyse, run_checkpoints
    from moeut.analysis.evalset import open_evalset
    o = opts_of(DynamicsOptions, run, tmp_path)
    es = open_evalset(o)
    d = analyse(es, o, run_checkpoints(es.run_dir))
    assert d["steps"] == [3, 5, 6]
    z = np.load(tmp_path / "dynamics" / "dynamics.npz")
    for kind in ("mlp", "att_v", "att_o"):
        assert (z[f"saturation_{kind}"][-1] == 1.0).all()  # the final checkpoint against itself
        assert (z[f"saturation_{kind}"][:-1] < 1.0).any()  # the perturbed earlier ones differ
    assert (tmp_path / "figures" / "dynamics_mlp.png").is_file()


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "moeut.analysis", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


@pytest.mark.parametrize("args, line", [
    (("knockout", "groups=[mlp/9/1]"), "moeut.analysis knockout: error: groups: 'mlp/9/1': layer application 9 is not in 0..3"),
    (("sources", "sources=[a:/nonexistent/x.txt]"), "moeut.analysis sources: error: sources: a:/nonexistent/x.txt: no such file or directory"),
    (("depth", "device=gpu"), "moeut.analysis depth: error: device: must be auto | cpu | cuda | cuda:N, got 'gpu'"),
    (("dynamics", "max_tokens=0"), "moeut.analysis dynamics: error: max_tokens: must be >= 1, got 0"),
])
def test_bad_input_is_one_line(run, tmp_path, args, line):
    out = tmp_path / "out"
    r = _cli(args[0], f"checkpoint={run}", f"out_dir={out}", *args[1:])
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1] == line
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("sub", ["sources", "dynamics", "knockout", "depth"])
def test_commands_run(run, tmp_path, sub):
    extra = {"knockout": ["max_experts=4"], "depth": ["repeats=[1,2]"]}.get(sub, [])
    r = _cli(sub, f"checkpoint={run}", f"out_dir={tmp_path}", "max_tokens=64", "batch_size=2",
             f"sources=[c4:{C4 / 'valid.jsonl.gz'}]", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / sub / f"{sub}.json").is_file()
    assert f"<!-- section:{sub} -->" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("sub, schema", [("sources", "SourcesOptions"), ("dynamics", "DynamicsOptions"),
                                         ("knockout", "KnockoutOptions"), ("depth", "DepthOptions")])
def test_help_lists_every_option(sub, schema):
    import importlib
    from moeut.cli import schema_options
    r = _cli(sub, "--help")
    assert r.returncode == 0, r.stderr
    names = [n for n, *_ in schema_options(getattr(importlib.import_module(f"moeut.analysis.{sub}"), schema))]
    assert "checkpoint" in names and "max_tokens" in names
    for n in names:
        assert any(line.split()[0].startswith(f"{n}=") for line in r.stdout.splitlines() if line.strip()), n


def test_keep_every_must_be_a_multiple_of_save_interval():
    from hydra import compose, initialize_config_dir
    from moeut.train_lib.config import to_typed

    def typed(*overrides):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            return to_typed(compose("config", overrides=["name=test", *overrides]))

    assert typed("train.save_interval=25", "train.keep_every=50").train.keep_every == 50
    assert typed().train.keep_every is None  # default: off
    with pytest.raises(ValueError, match=r"train.keep_every: must be a multiple of train.save_interval=25 .* got 30"):
        typed("train.save_interval=25", "train.keep_every=30")
