"""benchmarks/train_step.py runs end to end on CPU (tiny presets) and times training's own step:
after its warm-up, the benchmark's state has taken exactly the steps `train_step` counts, and the
recorded markdown names both models and the ratio line (timings themselves are never asserted)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "benchmarks" / "train_step.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_step_fn_is_train_step():
    """Two benchmark steps equal two `train_step`s on an identical model and batch, bit for bit."""
    from moeut.registry import build_model, get_preset
    from moeut.train_lib.step import train_step
    bench = _module()
    torch.manual_seed(0)
    batch = torch.randint(0, 512, (2, 17))
    torch.manual_seed(1)
    a = build_model(get_preset("tiny"))
    b = build_model(get_preset("tiny"))
    b.load_state_dict(a.state_dict())
    init = {k: v.clone() for k, v in a.state_dict().items()}
    sa, sb = bench.new_state(a, torch.device("cpu")), bench.new_state(b, torch.device("cpu"))
    for _ in range(2):
        torch.manual_seed(2)
        bench.step_fn(sa, a, batch, None, 1, 0.25)
        torch.manual_seed(2)
        train_step(sb, b, batch, bench.LR, micro_batch_size=1, autocast_dtype=None, grad_clip=0.25)
    assert sa.step == sb.step == 2 and sa.tokens_seen == 2 * 2 * 16
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n
    assert any(not torch.equal(v, init[k]) for k, v in a.state_dict().items())   # the steps did train


def test_cli_records_both_models(tmp_path):
    rec = tmp_path / "bench.md"
    out = subprocess.run([sys.executable, str(SCRIPT), "--moeut", "tiny", "--dense", "dense_tiny", "--rounds", "1",
                          "--warmup", "1", "--seq-len", "16", "--record", str(rec)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    from moeut.compute import total_params
    from moeut.registry import get_preset
    text = rec.read_text()
    for name in ("tiny", "dense_tiny"):
        assert f"| {name} | {total_params(get_preset(name)):,} |" in text
    assert "MoEUT / dense: step time" in text
