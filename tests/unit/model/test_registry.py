"""moeut.registry: one explicit table of architectures and presets that does not depend on import
order; `model=<name>` and `model.preset=<name>` select the same preset; compute.total_params is
the one parameter counter."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from moeut import compute as C
from moeut import registry as R
from param_formula import param_count_formula

REPO = Path(__file__).resolve().parents[3]


def _fresh(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter that imports this checkout's moeut."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)


def test_import_registry_alone_gives_every_preset_and_arch():
    res = _fresh("import json, moeut.registry as R; "
                 "print(json.dumps([sorted(R.PRESETS), sorted(R.ARCHS), sorted(R.BASELINE_PRESETS)]))")
    assert res.returncode == 0, res.stderr
    presets, archs, baselines = json.loads(res.stdout)
    assert presets == sorted(R.PRESETS) and archs == sorted(R.ARCHS)
    assert set(baselines) <= set(presets) and {"sut_44m", "du_every4_44m", "naive_ut_44m", "tiny"} <= set(presets)
    assert set(archs) == {"moeut", "dense", "moe_transformer", "sut"}


def test_import_config_loads_no_model_code():
    """moeut.model_config is a leaf: importing it (and so the package __init__) loads no model, kernel,
    baseline or registry module."""
    res = _fresh("import sys, json, moeut.model_config; "
                 "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'moeut')))")
    assert res.returncode == 0, res.stderr
    loaded = set(json.loads(res.stdout))
    assert loaded <= {"moeut", "moeut.model_config", "moeut.outputs", "moeut.validate"}, loaded


def test_a_broken_baseline_module_fails_the_import_not_silently():
    """Were a baseline module unimportable, the registry must not come up without its archs and
    presets (the old lazy registration could): the import itself fails, naming the module."""
    res = _fresh("import sys; sys.modules['moeut.baselines.sut'] = None; import moeut.registry")
    assert res.returncode != 0 and ("ImportError" in res.stderr or "ModuleNotFoundError" in res.stderr)
    assert "moeut.baselines.sut" in res.stderr


def test_baseline_package_registers_nothing():
    res = _fresh("import sys, moeut.baselines; print(sorted(m for m in sys.modules if m.startswith('moeut.')))")
    assert res.returncode == 0, res.stderr
    assert "moeut.registry" not in res.stdout and "moeut.model" not in res.stdout


# --------------------------------------------------------------------------- the `model` config group
# (one ConfigStore entry per preset, no YAML files: tests/unit/model/test_model_configs.py)

def _compose(overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=["name=test"] + list(overrides))


@pytest.mark.parametrize("name", ["tiny", "sut_44m", "du_every4_44m"])
def test_model_group_and_model_preset_select_the_same_config(name):
    """`model=<name>` (the preset's model-group entry) and `model.preset=<name>` compose to the
    same preset."""
    from moeut.train_lib.config import build_model_config
    by_group = build_model_config(_compose([f"model={name}"]).model)
    by_field = build_model_config(_compose([f"model.preset={name}"]).model)
    assert by_group == by_field == R.get_preset(name)


# --------------------------------------------------------------------------- registry API

def test_get_preset_is_a_fresh_validated_copy():
    cfg = R.get_preset("tiny", ff_k=2)
    assert cfg.ff_k == 2 and R.PRESETS["tiny"].ff_k == 4
    cfg.d_model = 1
    assert R.PRESETS["tiny"].d_model == 64
    with pytest.raises(ValueError, match=r"model.preset: unknown preset 'nope'"):
        R.get_preset("nope")
    with pytest.raises(ValueError, match=r"MoEUTConfig.ff_k"):
        R.get_preset("tiny", ff_k=99)


def test_config_from_dict_round_trips_every_preset():
    for name, cfg in R.PRESETS.items():
        d = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as model_config.json stores it
        assert R.config_from_dict(d) == cfg, name
    with pytest.raises(ValueError, match=r"unknown arch 'nope'.*'dense'"):
        R.config_from_dict({"arch": "nope"})
    with pytest.raises(ValueError, match=r"unknown fields \['bogus'\]"):
        R.config_from_dict({**dataclasses.asdict(R.PRESETS["tiny"]), "bogus": 1})


def test_build_model_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"model.arch: unknown architecture 'nope'"):
        R.build_model(dataclasses.replace(R.PRESETS["tiny"], arch="nope"))
    wrong = dataclasses.replace(R.PRESETS["dense_tiny"])
    wrong.arch = "moeut"
    with pytest.raises(TypeError, match=r"arch 'moeut' takes a MoEUTConfig, got DenseConfig"):
        R.build_model(wrong)


@dataclasses.dataclass
class ToyConfig:
    """A user architecture for the registry test: embedding + head."""
    vocab_size: int = 11
    d_model: int = 3
    arch: str = "toy"


class ToyLM(torch.nn.Module):
    """Model class of ToyConfig: (V*d) embedding + (d*V + V) head."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.emb = torch.nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.head = torch.nn.Linear(cfg.d_model, cfg.vocab_size)


def test_register_arch_and_preset_for_a_user_model(monkeypatch):
    monkeypatch.setattr(R, "ARCHS", dict(R.ARCHS))
    monkeypatch.setattr(R, "PRESETS", dict(R.PRESETS))
    path = f"{__name__}:ToyLM"
    with pytest.raises(ValueError, match=r"needs a field `arch: str = 'other'`"):
        R.register_arch("other", ToyConfig, path)
    with pytest.raises(ValueError, match=r"model_path must be 'package.module:ModelClass'"):
        R.register_arch("toy", ToyConfig, "no_colon")
    R.register_arch("toy", ToyConfig, path)
    R.register_arch("toy", ToyConfig, path)  # the same entry again: no-op
    with pytest.raises(ValueError, match=r"already registered"):
        R.register_arch("toy", ToyConfig, f"{__name__}:ToyConfig")
    R.register_preset("toy_small", ToyConfig(vocab_size=7))
    with pytest.raises(ValueError, match=r"a preset of that name exists"):
        R.register_preset("toy_small", ToyConfig())
    cfg = R.get_preset("toy_small", d_model=5)
    model = R.build_model(cfg)
    assert isinstance(model, ToyLM)
    assert R.config_from_dict(dataclasses.asdict(cfg)) == cfg
    assert C.total_params(cfg) == C.total_params(model) == 7 * 5 + 5 * 7 + 7  # hand count
    R.ARCHS["broken"] = R.Arch(ToyConfig, f"{__name__}:NoSuchClass")
    with pytest.raises(ImportError, match=r"ARCHS\['broken'\].*NoSuchClass"):
        R.model_class("broken")


# --------------------------------------------------------------------------- one parameter counter

@pytest.mark.parametrize("name", ["tiny", "dense_tiny", "cpu_sut", "cpu_du_every2", "cpu_moeut_deepseek"])
def test_total_params_of_config_and_of_module_agree_with_the_closed_form(name):
    cfg = R.get_preset(name, vocab_size=97)
    model = R.build_model(cfg)
    assert C.total_params(cfg) == C.total_params(model) == param_count_formula(cfg)


def test_total_params_counts_a_shared_tensor_once_and_sees_through_compile_wrappers():
    lin = torch.nn.Linear(4, 3)  # 12 + 3
    shared = torch.nn.Sequential(lin, torch.nn.ReLU(), lin)
    assert C.total_params(shared) == 15
    compiled = torch.compile(shared)  # an OptimizedModule wrapping it (not compiled until called)
    assert C.total_params(compiled) == 15


def test_summary_counts_through_the_counter():
    from moeut.analysis.summary import count_params
    for name in ("tiny", "sut_44m", "du_every4_44m"):
        cfg = R.PRESETS[name]
        assert count_params(dataclasses.asdict(cfg)) == C.total_params(cfg) == param_count_formula(cfg)


def test_no_second_counter_in_the_package():
    """The closed forms live in tests/param_formula.py only; nothing in moeut, train.py or the
    benchmarks sums p.numel() over a model's parameters except compute.total_params itself."""
    files = sorted((REPO / "moeut").rglob("*.py")) + [REPO / "train.py"] + sorted((REPO / "benchmarks").glob("*.py"))
    offenders = []
    for path in files:
        if path == REPO / "moeut" / "compute.py":
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "param_count_formula" in line or (".numel() for p in" in line and "parameters()" in line):
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert offenders == [], offenders
