"""One home per model config: each config class lives with its model, declares its ranges in its
field metadata and gets its derived geometry from one definition; every preset is a Hydra `model`
config-group entry registered from the registry (no YAML files)."""
import dataclasses
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore

from moeut import registry as R
from moeut import validate as V
from moeut.baselines.dense import DenseConfig, MoETransformerConfig
from moeut.baselines.sut import SUTConfig
from moeut.model_config import MoEUTConfig
from moeut.train_lib import config as TC

REPO = Path(__file__).resolve().parents[3]
CLASSES = [MoEUTConfig, DenseConfig, MoETransformerConfig, SUTConfig]
# one preset of each architecture
EXAMPLE = {MoEUTConfig: "tiny", DenseConfig: "dense_tiny", MoETransformerConfig: "cpu_du_every2", SUTConfig: "cpu_sut"}


def test_each_config_class_lives_with_its_model():
    """MoEUTConfig in moeut.model_config (beside moeut.model, which imports it); every other config
    class in the module of the model class the registry names for its arch."""
    assert {a.config_cls for a in R.ARCHS.values()} == set(CLASSES)
    for arch in R.ARCHS.values():
        home = arch.model_path.split(":")[0]
        assert arch.config_cls.__module__ == ("moeut.model_config" if home == "moeut.model" else home)
    import moeut.model
    assert moeut.model.MoEUTConfig is MoEUTConfig
    assert not (REPO / "moeut" / "config.py").exists()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_numeric_field_declares_a_range_that_construction_enforces(cls):
    base = R.PRESETS[EXAMPLE[cls]]
    assert isinstance(base, cls)
    numeric = list(V.numeric_fields(cls))
    assert numeric
    for name, f, _ in numeric:
        rng = V.field_range(f)
        assert rng is not None, f"{cls.__name__}.{name}: numeric field without a declared range"
        for bad in rng.outside():
            bad = int(bad) if f.type in ("int", "Optional[int]") else bad
            with pytest.raises(ValueError, match=rf"^{cls.__name__}\.{name}: must be "):
                dataclasses.replace(base, **{name: bad})
    int_field = next(name for name, f, _ in numeric if f.type == "int")
    with pytest.raises(ValueError, match=rf"^{cls.__name__}\.{int_field}: must be an integer, got 2.5"):
        dataclasses.replace(base, **{int_field: 2.5})


def test_derived_geometry_is_defined_once_and_right():
    """n_repeats / n_rotate / init_scale come from the mixins only, and equal hand-computed values."""
    for cls in CLASSES:
        for prop in ("n_repeats", "n_rotate", "init_scale"):
            assert prop not in vars(cls), f"{cls.__name__} redefines {prop}"
    p = R.PRESETS
    # R = L / G; n_rot = floor(d_head / 2) rounded down to even; sqrt(2 / L), 1 for post-LN
    assert (p["tiny"].n_repeats, p["tiny"].n_rotate, p["tiny"].init_scale) == (2, 8, math.sqrt(2 / 4))
    assert (p["moeut_44m"].n_repeats, p["moeut_44m"].n_rotate) == (8, 40)  # d_head 82 -> 41 -> 40
    assert p["moeut_44m_postln"].init_scale == 1.0
    assert (p["moeut_319m"].n_repeats, p["moeut_728m"].n_repeats) == (8, 9)
    assert (p["dense_44m"].n_repeats, p["dense_44m"].n_rotate) == (1, 20)  # d_head 41 -> 20
    assert (p["naive_ut_44m"].n_repeats, p["cpu_naive_ut"].n_repeats) == (16, 4)
    du = p["du_every4_44m"]
    assert (du.group_size, du.n_repeats, du.init_scale) == (16, 1, math.sqrt(2 / 16))
    assert (p["sut_44m"].group_size, p["sut_44m"].n_repeats) == (1, 16)


def test_config_fields_are_the_union_with_one_meaning_per_name(monkeypatch):
    fields = R.config_fields()
    want = set().union(*({f.name for f in dataclasses.fields(c)} for c in CLASSES)) - {"arch"}
    assert set(fields) == want
    assert V.field_range(fields["halt_threshold"][1]) == V.Range(0.5, 1, lo_open=True, hi_open=True)

    @dataclasses.dataclass
    class Odd:
        """A user config whose d_model means something else."""
        d_model: float = 0.5
        arch: str = "odd"

    monkeypatch.setattr(R, "ARCHS", dict(R.ARCHS))
    R.register_arch("odd", Odd, "moeut.model:MoEUTLM")
    with pytest.raises(ValueError, match=r"config field 'd_model': MoEUTConfig declares <class 'int'>.*Odd <class 'float'>"):
        R.config_fields()


def _compose(overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=["name=test"] + list(overrides))


def test_every_preset_is_a_model_group_entry_and_nothing_else():
    assert not (REPO / "conf" / "model").exists()
    TC.register_configs()
    entries = {n[:-len(".yaml")] for n in ConfigStore.instance().repo["model"]}
    assert entries == set(R.PRESETS)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for name in sorted(R.PRESETS):
            cfg = compose("config", overrides=["name=test", f"model={name}"])
            assert TC.build_model_config(cfg.model) == R.get_preset(name), name


def test_a_preset_registered_before_register_configs_is_selectable(monkeypatch):
    monkeypatch.setattr(R, "PRESETS", dict(R.PRESETS))
    monkeypatch.setattr(TC, "PRESETS", R.PRESETS)
    R.register_preset("my_tiny", R.get_preset("tiny", ff_k=2))
    repo = ConfigStore.instance().repo["model"]
    try:
        with pytest.raises(Exception, match="my_tiny"):  # not an entry yet
            _compose(["model=my_tiny"])
        TC.register_configs()
        cfg = _compose(["model=my_tiny", "model.d_model=32"])
        assert TC.build_model_config(cfg.model) == R.get_preset("tiny", ff_k=2, d_model=32)
        node = repo["my_tiny.yaml"]
        TC.register_configs()  # nothing new: the stored entries are kept, not stored again
        assert repo["my_tiny.yaml"] is node
        R.register_preset("my_tiny2", R.get_preset("tiny", ff_k=3))
        TC.register_configs()  # a preset registered since the last call: stored
        assert TC.build_model_config(_compose(["model=my_tiny2"]).model) == R.get_preset("tiny", ff_k=3)
    finally:
        repo.pop("my_tiny.yaml", None)
        repo.pop("my_tiny2.yaml", None)


def test_model_options_are_range_checked_with_the_config_classes_ranges():
    with pytest.raises(ValueError, match=r"^model.halt_threshold: must be in \(0.5, 1\), got 0.2"):
        TC.to_typed(_compose(["experiment=cpu_tiny", "model=cpu_sut", "model.halt_threshold=0.2"]))
    with pytest.raises(ValueError, match=r"^model.overrides.rotate_fraction: must be in \(0, 1\], got 0"):
        TC.to_typed(_compose(["experiment=cpu_tiny", "+model.overrides.rotate_fraction=0"]))
