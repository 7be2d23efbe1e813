"""Every Hydra experiment composes and builds its model on the meta device; bad values fail
with a message naming the key."""
import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from omegaconf import OmegaConf  # noqa: E402

from param_formula import param_count_formula  # noqa: E402
from moeut.registry import PAPER_TRAIN, PRESETS, build_model, get_preset  # noqa: E402
from moeut.train_lib.config import build_model_config, to_typed  # noqa: E402

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
BOOKS = REPO / "data" / "books"
# data=gutenberg reads ../shared (or $MOEUT_DATA); without it, point its experiments at the embedded books
EMBEDDED_DATA = [f"data.path={BOOKS / 'train.jsonl.gz'}", f"data.valid_path={BOOKS / 'valid.jsonl.gz'}",
                 f"data.extra_valid.c4={REPO / 'data' / 'c4_sample' / 'valid.jsonl.gz'}"]


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        # `name` defaults to ${hydra:runtime.choices.experiment}, which only resolves in a real run
        return compose("config", overrides=["name=test"] + list(overrides))


def test_experiment_list_covers_the_paper():
    for size in ("44m", "126m", "244m", "319m", "728m", "1040m"):
        assert f"c4_moeut_{size}" in EXPERIMENTS and f"c4_dense_{size}" in EXPERIMENTS
    for g in ("g1", "g3", "g6", "g9", "g18", "aabb", "preln", "postln", "k8", "k24", "es256", "es512", "es1024"):
        assert f"c4_moeut_244m_{g}" in EXPERIMENTS
    assert "c4_moeut_44m_postln" in EXPERIMENTS and "c4_sigma_moe_44m" in EXPERIMENTS
    assert "cpu_small" in EXPERIMENTS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds_on_meta(experiment):
    # The Stack needs a mirror path; C4/SlimPajama/peS2o default to hub streaming (path null).
    cfg = compose_cfg([f"experiment={experiment}"] + (["data.path=/tmp"] if "thestack" in experiment else []))
    if cfg.data.source == "local" and not Path(cfg.data.path).exists():
        cfg = compose_cfg([f"experiment={experiment}"] + EMBEDDED_DATA)
    tc = to_typed(cfg)
    preset = cfg.model.preset
    # The composed model = the preset, changed exactly in the fields the experiment sets (paper
    # runs set none: they use their preset unchanged).
    # (an explicit field is one set by a value, not the default interpolation of the preset's value)
    explicit = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
                if k not in ("preset", "overrides") and v is not None and not OmegaConf.is_interpolation(cfg.model, k)}
    explicit.update(cfg.model.overrides or {})
    if not experiment.startswith("cpu"):
        assert explicit == {}, f"{experiment}: paper runs use their preset unchanged, got {explicit}"
    got, base = dataclasses.asdict(tc.model), dataclasses.asdict(PRESETS[preset])
    assert {k for k in base if got[k] != base[k]} <= set(explicit), experiment
    assert all(got[k] == v for k, v in explicit.items()), (experiment, explicit)
    with torch.device("meta"):
        model = build_model(tc.model)
    n = sum(p.numel() for p in model.parameters())
    assert n == param_count_formula(tc.model)  # SPEC §2 closed forms, independent of the modules
    # paper runs: warm-up and clip of their size (SPEC 2.1/2.2), the paper's batch and schedule
    size = next((s for s in PAPER_TRAIN if f"_{s}" in experiment), None)
    if size is not None:
        assert tc.optim.warmup == PAPER_TRAIN[size]["warmup"]
        assert tc.optim.grad_clip == PAPER_TRAIN[size]["grad_clip"]
        assert tc.train.steps == 100000 and tc.train.batch_size == 64 and tc.data.seq_len == 1024
        assert tc.optim.lr == 2.5e-4 and tc.optim.weight_decay == 0.01


def test_default_job_is_cpu_small_on_embedded_books(monkeypatch):
    """`python train.py` reads only the corpus carried in data/, whatever MOEUT_DATA says."""
    monkeypatch.setenv("MOEUT_DATA", "/nonexistent")
    tc = to_typed(compose_cfg([]))
    assert tc.model_preset == "mini" and tc.train.device == "cpu" and tc.train.precision == "fp32"
    assert Path(tc.data.path) == BOOKS / "train.jsonl.gz" and Path(tc.data.valid_path) == BOOKS / "valid.jsonl.gz"
    assert Path(tc.data.extra_valid["c4"]) == REPO / "data" / "c4_sample" / "valid.jsonl.gz"
    # that the default job's tokens fit in one pass over the embedded text: tests/unit/data/test_embedded.py (slow)


def test_model_overrides_and_errors():
    cfg = compose_cfg(["experiment=c4_moeut_244m", "model.ff_k=8"])
    tc = to_typed(cfg)
    assert tc.model == get_preset("moeut_244m", ff_k=8)
    with pytest.raises(ValueError, match=r"model.preset: unknown preset 'moeut_9b'; known presets: .*moeut_244m"):
        to_typed(compose_cfg(["model.preset=moeut_9b"]))
    with pytest.raises(ValueError, match=r"model: .*group_size.*n_layers=4 is not divisible by group_size=3"):
        to_typed(compose_cfg(["model.group_size=3"]))
    with pytest.raises(ValueError, match=r"model.d_ff: not a field of MoEUTConfig"):
        to_typed(compose_cfg(["model.d_ff=100"]))
    # the generic escape hatch for fields of architectures registered later
    assert build_model_config({"preset": "tiny", "overrides": {"ff_k": 2}}).ff_k == 2


def test_training_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"train.batch_size: global batch 16 is not divisible by world size 2 "
                                         r"x train.micro_batch_size 3"):
        to_typed(compose_cfg(["train.micro_batch_size=3"]), world_size=2)
    with pytest.raises(ValueError, match=r"train.batch_size: global batch 16 is not divisible by the world size 3"):
        to_typed(compose_cfg([]), world_size=3)
    with pytest.raises(ValueError, match=r"data.path: does not exist: /nonexistent/corpus$"):
        to_typed(compose_cfg(["data.path=/nonexistent/corpus"]))
    with pytest.raises(ValueError, match=r"data.path: required for data.source=local"):
        to_typed(compose_cfg(["data=local", "data.path=null"]))
    with pytest.raises(ValueError, match=r"data.vocab_size: 8000 differs from the model's vocab_size 512"):
        to_typed(compose_cfg(["model=tiny"]))
    with pytest.raises(ValueError, match=r"train.precision"):
        to_typed(compose_cfg(["train.precision=fp8"]))
    with pytest.raises(Exception, match="nonexistent_key"):  # struct mode: typos fail at composition
        compose_cfg(["train.nonexistent_key=1"])


# ------------------------------------------------------------------------------------------
# Data configs differ from the default job only where they say so; `--cfg job` shows real values
# ------------------------------------------------------------------------------------------

DATA_CONFIGS = sorted(p.stem for p in (REPO / "conf" / "data").glob("*.yaml"))
# What changes the compute or what the tokenizer can train on when a user switches data=...
KEPT = ("seq_len", "tokens_per_step", "tokenizer_split_paragraphs", "tokenizer_byte_fallback")


def _kept_values(cfg):
    d = cfg.data
    return {"seq_len": d.seq_len, "tokens_per_step": cfg.train.batch_size * d.seq_len,
            "tokenizer_split_paragraphs": d.tokenizer_split_paragraphs,
            "tokenizer_byte_fallback": d.tokenizer_byte_fallback}


def undocumented_differences(yaml_text, values, default):
    """The KEPT settings whose `values` differ from the default job's without the data config's own
    line saying so: a differing setting must be set in the file, on a line whose comment contains
    "differs from the default job" (tokens per step: the seq_len line must also name "tokens per step")."""
    lines = {ln.split(":", 1)[0]: ln for ln in yaml_text.splitlines() if ln and not ln[0].isspace() and ":" in ln}
    bad = []
    for key in KEPT:
        if values[key] == default[key]:
            continue
        line = lines.get("seq_len" if key == "tokens_per_step" else key, "")
        comment = line.split("#", 1)[1] if "#" in line else ""
        if "differs from the default job" not in comment or (key == "tokens_per_step" and "tokens per step" not in comment):
            bad.append(f"{key}: {values[key]} (default job: {default[key]})")
    return bad


def test_undocumented_difference_is_caught():
    """The checker itself (independent reference: hand-written files): a silent change of seq_len or
    splitting is reported, a stated one is not."""
    default = {"seq_len": 256, "tokens_per_step": 4096, "tokenizer_split_paragraphs": True,
               "tokenizer_byte_fallback": True}
    moved = dict(default, seq_len=1024, tokens_per_step=16384, tokenizer_split_paragraphs=False)
    assert undocumented_differences("source: local\npath: ???\n", moved, default) == [
        "seq_len: 1024 (default job: 256)", "tokens_per_step: 16384 (default job: 4096)",
        "tokenizer_split_paragraphs: False (default job: True)"]
    half = "seq_len: 1024  # differs from the default job\ntokenizer_split_paragraphs: false\n"
    assert undocumented_differences(half, moved, default) == [
        "tokens_per_step: 16384 (default job: 4096)", "tokenizer_split_paragraphs: False (default job: True)"]
    stated = ("seq_len: 1024  # differs from the default job: 4x the tokens per step\n"
              "tokenizer_split_paragraphs: false  # differs from the default job: paper\n")
    assert undocumented_differences(stated, moved, default) == []


@pytest.mark.parametrize("name", DATA_CONFIGS)
def test_data_config_differs_from_default_job_only_where_stated(name):
    """Switching `data=books` (the default job) to any other data config keeps seq_len, tokens per
    step, tokenizer splitting and byte fallback, or the config states the change on that line."""
    default = _kept_values(compose_cfg([]))
    assert default == {"seq_len": 256, "tokens_per_step": 16 * 256, "tokenizer_split_paragraphs": True,
                       "tokenizer_byte_fallback": True}
    cfg = compose_cfg([f"data={name}"] + (["data.path=/tmp"] if name in ("local", "thestack") else []))
    text = (REPO / "conf" / "data" / f"{name}.yaml").read_text()
    assert undocumented_differences(text, _kept_values(cfg), default) == [], f"conf/data/{name}.yaml"


def test_paper_data_configs_keep_the_papers_tokenizer_settings():
    """SPEC 5.2: the paper's corpora train SentencePiece with its defaults (no byte fallback, long
    documents skipped); every other data config maps no text to <unk>."""
    from moeut.data.sources import SOURCES
    for name in DATA_CONFIGS:
        d = compose_cfg([f"data={name}"]).data
        paper = d.source != "local"
        assert d.tokenizer_byte_fallback is (not paper), name
        if paper:
            assert d.source in SOURCES and not d.tokenizer_split_paragraphs and d.seq_len == 1024, name


def _cfg_job(*overrides):
    import subprocess
    import yaml
    if not overrides:  # the plain `train.py --cfg job`: tests/e2e/test_cli_help.py runs it once for both
        from test_cli_help import tool_output
        p = tool_output("train.py", "--cfg", "job")[0]
    else:
        env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
        p = subprocess.run([sys.executable, str(REPO / "train.py"), "--cfg", "job", *overrides], cwd=str(REPO),
                           capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return yaml.safe_load(p.stdout)


def test_cfg_job_shows_the_presets_real_values():
    """`train.py --cfg job` prints every model field with the preset's value (null only for fields
    the preset's architecture does not have), following model=<preset>, model.preset=<name> and a
    field override; the config the run is built from agrees."""
    for overrides, preset, changed in ((), "mini", {}), (("model=dense_tiny",), "dense_tiny", {}), \
            (("model.preset=moeut_244m", "model.ff_k=8"), "moeut_244m", {"ff_k": 8}):
        printed = _cfg_job(*overrides)["model"]
        assert printed["preset"] == preset
        want = {**dataclasses.asdict(PRESETS[preset]), **changed}
        for k, v in printed.items():
            if k not in ("preset", "overrides"):
                assert v == want.get(k), (preset, k, v, want.get(k))  # None: not a field of this architecture
        assert printed["d_model"] == want["d_model"] is not None
        assert dataclasses.asdict(build_model_config(compose_cfg(list(overrides)).model)) == want


def test_a_missing_shared_corpus_says_where_it_is_looked_for(monkeypatch, tmp_path):
    """data=gutenberg without ../shared or $MOEUT_DATA: the error names the option, the path and
    $MOEUT_DATA; with $MOEUT_DATA set (pointing nowhere) only the path, which then says it all."""
    monkeypatch.delenv("MOEUT_DATA", raising=False)
    missing = str(tmp_path / "shared" / "data" / "text" / "gutenberg" / "train.jsonl.gz")
    with pytest.raises(ValueError, match=r"^data.path: does not exist: .*train.jsonl.gz \(this data config reads "
                                         r"\$MOEUT_DATA, else ../shared/data/text beside the clone: set MOEUT_DATA="):
        to_typed(compose_cfg(["data=gutenberg", f"data.path={missing}"]))
    monkeypatch.setenv("MOEUT_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(ValueError, match=r"^data.path: does not exist: .*train.jsonl.gz$"):
        to_typed(compose_cfg(["data=gutenberg", f"data.path={missing}"]))
