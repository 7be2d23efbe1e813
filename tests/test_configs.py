"""Every Hydra experiment composes and builds its model on the meta device; bad values fail
with a message naming the key."""
import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
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
    explicit = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
                if k not in ("preset", "overrides") and v is not None}
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
    # that the default job's tokens fit in one pass over the embedded text: tests/test_embedded.py (slow)


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
    with pytest.raises(ValueError, match=r"data.path: does not exist: /nonexistent/corpus"):
        to_typed(compose_cfg(["data.path=/nonexistent/corpus"]))
    with pytest.raises(ValueError, match=r"data.path: required for data.source=local"):
        to_typed(compose_cfg(["data=local", "data.path=null"]))
    with pytest.raises(ValueError, match=r"data.vocab_size: 8000 differs from the model's vocab_size 512"):
        to_typed(compose_cfg(["model=tiny"]))
    with pytest.raises(ValueError, match=r"train.precision"):
        to_typed(compose_cfg(["train.precision=fp8"]))
    with pytest.raises(Exception, match="nonexistent_key"):  # struct mode: typos fail at composition
        compose_cfg(["train.nonexistent_key=1"])
