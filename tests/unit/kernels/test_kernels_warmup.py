"""`python -m moeut.tools.warmup` (WarmupOptions, a typed tool): options checked with errors naming
the option, and a real dry run on CPU (the PyTorch implementation; nothing is compiled) that does
the passes it was asked for."""
import re

import pytest

from moeut.cli import check_options
from moeut.tools import warmup

O = warmup.WarmupOptions


def test_options_are_checked():
    for opts, msg in ((O(batch=0), "batch: must be >= 1, got 0"), (O(steps=-1), "steps: must be >= 0, got -1"),
                      (O(dtype="fp8"), "dtype: must be one of bf16 | fp16 | fp32 | tf32, got 'fp8'")):
        with pytest.raises(ValueError, match="^" + re.escape(msg)):
            check_options(opts)
    with pytest.raises(ValueError, match=r"preset: 'nope': .*unknown preset"):
        warmup.check(O(preset="nope", device="cpu"))
    with pytest.raises(ValueError, match=r"device: expected cuda, cuda:N or cpu, got 'gpu'"):
        warmup.check(O(device="gpu"))
    # the library call refuses an unknown dtype instead of silently running fp32
    with pytest.raises(ValueError, match="dtype: expected one of"):
        warmup.warm("golden_tiny", "int8", 1, 8, steps=0, decode=False, device="cpu")
    a = O()
    check_options(a)
    assert (a.preset, a.dtype, a.batch, a.seq_len, a.steps, a.decode, a.prefill, a.device) == (
        "moeut_44m", "bf16", 64, 1024, 2, True, 100, "cuda")


def test_cpu_dry_run_does_the_requested_passes(capsys, monkeypatch):
    # the PyTorch implementation, as in a process without TRITON_INTERPRET (conftest sets it)
    monkeypatch.setenv("MOEUT_CVMM_BACKEND", "grouped_mm")
    res = warmup.run(O(preset="golden_tiny", dtype="fp32", batch=2, seq_len=16, steps=3, prefill=4, device="cpu"))
    out = capsys.readouterr().out
    assert len(res["step_s"]) == 3 and all(t > 0 for t in res["step_s"]) and res["decode_s"] > 0
    assert out.count("training step") == 3 and "decode (prefill 4 + 8 steps)" in out
    assert "Triton cache" in out
    res = warmup.run(O(preset="golden_tiny", dtype="fp32", batch=1, seq_len=8, steps=0, decode=False, device="cpu"))
    assert res["step_s"] == [] and "decode_s" not in res
