"""`python -m moeut.kernels.warmup` (conf/warmup.yaml): options checked with errors naming the
option, and a real dry run on CPU (the PyTorch implementation; nothing is compiled) that does
the passes it was asked for."""
import pytest

from moeut.cli import compose
from moeut.kernels import warmup


def test_options_are_checked():
    with pytest.raises(ValueError, match="batch: expected an integer >= 1, got 'many'"):
        warmup.options(compose("warmup", ["batch=many"]))
    with pytest.raises(ValueError, match="steps: expected an integer >= 0, got -1"):
        warmup.options(compose("warmup", ["steps=-1"]))
    with pytest.raises(ValueError, match="decode: expected true or false, got 'yes'"):
        warmup.options(compose("warmup", ["decode=yes"]))
    with pytest.raises(ValueError, match=r"dtype: expected one of \['bf16', 'fp16', 'fp32', 'tf32'\], got 'fp8'"):
        warmup.options(compose("warmup", ["dtype=fp8"]))
    with pytest.raises(ValueError, match=r"preset: 'nope': .*unknown preset"):
        warmup.options(compose("warmup", ["preset=nope"]))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['seqlen'\]"):
        warmup.options(compose("warmup", ["+seqlen=3"]))
    # the library call refuses an unknown dtype instead of silently running fp32
    with pytest.raises(ValueError, match="dtype: expected one of"):
        warmup.warm("golden_tiny", "int8", 1, 8, steps=0, decode=False, device="cpu")
    a = warmup.options(compose("warmup"))
    assert (a["preset"], a["dtype"], a["batch"], a["seq_len"], a["steps"], a["decode"], a["prefill"],
            a["device"]) == ("moeut_44m", "bf16", 64, 1024, 2, True, 100, None)


def test_cpu_dry_run_does_the_requested_passes(capsys, monkeypatch):
    # the PyTorch implementation, as in a process without TRITON_INTERPRET (conftest sets it)
    monkeypatch.setenv("MOEUT_CVMM_BACKEND", "grouped_mm")
    res = warmup.run(compose("warmup", ["preset=golden_tiny", "dtype=fp32", "batch=2", "seq_len=16",
                                        "steps=3", "prefill=4", "device=cpu"]))
    out = capsys.readouterr().out
    assert len(res["step_s"]) == 3 and all(t > 0 for t in res["step_s"]) and res["decode_s"] > 0
    assert out.count("training step") == 3 and "decode (prefill 4 + 8 steps)" in out
    assert "Triton cache" in out
    res = warmup.run(compose("warmup", ["preset=golden_tiny", "dtype=fp32", "batch=1", "seq_len=8",
                                        "steps=0", "decode=false", "device=cpu"]))
    assert res["step_s"] == [] and "decode_s" not in res
