"""Every preset builds on the meta device with the parameter count SPEC §2 gives."""
import pytest
import torch

from moeut.registry import PRESET_PARAMS, PRESETS, build_model
from param_formula import param_count_formula


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_count(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = build_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == param_count_formula(cfg)
    if name in PRESET_PARAMS:  # SPEC table (exact for the main ladder, 0.1% for derived ablations)
        assert abs(n - PRESET_PARAMS[name]) <= 1e-3 * PRESET_PARAMS[name], (n, PRESET_PARAMS[name])


def test_main_ladder_exact():
    for name in ("moeut_44m", "moeut_126m", "moeut_244m", "moeut_319m", "moeut_728m", "moeut_1040m"):
        assert param_count_formula(PRESETS[name]) == PRESET_PARAMS[name]
    assert PRESETS["moeut_728m"].d_model == 1280  # not the slim preset's 1024 (SPEC 10.2)


def test_rope_widths():
    assert PRESETS["moeut_44m"].n_rotate == 40  # 82 -> 41 -> 40 (SPEC 1.4); the slim code crashes here
    assert PRESETS["moeut_126m"].n_rotate == 48 and PRESETS["moeut_244m"].n_rotate == 64
    assert PRESETS["dense_44m"].n_rotate == 20


def test_44m_preset_runs_a_forward():
    from moeut.model import MoEUTLM
    model = MoEUTLM(PRESETS["moeut_44m"]).eval()
    with torch.no_grad():
        out = model(torch.randint(0, 8000, (1, 8)))
    assert out.logits.shape == (1, 8, 8000) and torch.isfinite(out.logits).all()


def test_registry_does_not_depend_on_import_order():
    """Issue 14.6: presets and architectures used to appear only once something imported
    moeut.baselines, so `pytest tests/unit/model/test_presets.py` alone collected 40 cases and 60 after
    test_baselines.py. A fresh interpreter that imports only moeut.registry must see everything."""
    import subprocess
    import sys
    from pathlib import Path

    from moeut.registry import ARCHS, BASELINE_PRESETS
    code = ("from moeut.registry import PRESETS, ARCHS; "
            "print(len(PRESETS)); print(','.join(sorted(PRESETS))); print(','.join(sorted(ARCHS)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert int(out[0]) == len(PRESETS)
    assert set(out[1].split(",")) == set(PRESETS) >= set(BASELINE_PRESETS)
    assert set(out[2].split(",")) == set(ARCHS) >= {"moeut", "dense", "moe_transformer", "sut"}
    # The symptom itself: this file collected alone has one param-count case per preset.
    repo = Path(__file__).resolve().parents[3]
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          str(Path(__file__).resolve())], capture_output=True, text=True, cwd=repo)
    cases = [line for line in res.stdout.splitlines() if "::test_param_count[" in line]
    assert len(cases) == len(PRESETS), res.stdout[-2000:]
