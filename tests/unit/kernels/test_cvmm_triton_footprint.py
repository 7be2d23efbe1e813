"""The compile footprint (moeut.tools.footprint) and the per-precision config pruning.

The footprint is recorded by replaying the model's custom-op calls through the launchers, so the
key test here checks it against an independent source: the launches the kernels really make
when the same model runs under TRITON_INTERPRET=1."""
import re

import pytest
import torch

triton = pytest.importorskip("triton")

from moeut.kernels import cvmm_triton as kt  # noqa: E402
from moeut.tools import footprint as fp  # noqa: E402


def test_bucket_small_problems_share_one_untuned_bucket():
    assert kt._bucket(1) == kt._bucket(8) == kt._bucket(kt.SMALL_S) == 0
    assert kt._bucket(kt.SMALL_S + 1) == 4096 and kt._bucket(5000) == 8192 and kt._bucket(8192) == 8192
    # The slot count never selects a compiled variant: Triton must not specialise on it.
    assert {"S", "S_BUCKET"} <= set(kt._FWD_NO_SPECIALIZE) and "S_BUCKET" in kt._DW_NO_SPECIALIZE


@pytest.mark.parametrize("kind", ["fwd", "dw"])
def test_candidate_configs_per_precision(kind):
    fp32 = kt.candidate_configs(kind, torch.float32, 1 << 16)
    tf32 = kt.candidate_configs(kind, torch.float32, 1 << 16, tf32=True)
    bf16 = kt.candidate_configs(kind, torch.bfloat16, 1 << 16)
    small = kt.candidate_configs(kind, torch.bfloat16, 0)
    assert len(fp32) == 1 and len(small) == 1  # never autotuned
    assert fp32[0].kwargs["BM"] * fp32[0].kwargs["BN"] <= 64 * 64 and fp32[0].num_stages <= 2  # small fp32 tiles
    assert 1 < len(bf16) <= 2 and 1 < len(tf32) <= 2
    assert all(c.kwargs["BK"] <= 32 for c in tf32)  # fp32 tiles: half the BK of 16-bit ones
    # Every candidate is in the autotuner's list, so the prune hook can return it.
    known = {str(c) for c in (kt.FWD_CONFIGS if kind == "fwd" else kt.DW_CONFIGS)}
    assert {str(c) for c in fp32 + tf32 + bf16 + small} <= known
    with pytest.raises(ValueError, match="kind"):
        kt.candidate_configs("bwd", torch.float32, 0)


def test_prune_hook_keeps_the_candidates():
    class T:  # what the hook sees: tensors with a dtype
        def __init__(self, dtype):
            self.dtype = dtype
    prune = kt._prune("fwd")
    got = prune(kt.FWD_CONFIGS, {"A": T(torch.float32), "S_BUCKET": 1 << 16}, DOT_PREC="ieee")
    assert [str(c) for c in got] == [str(kt.FWD_CONFIG_FP32)]
    got = prune(kt.FWD_CONFIGS, {"A": T(torch.bfloat16), "S_BUCKET": 1 << 16}, DOT_PREC="tf32")
    assert [str(c) for c in got] == [str(c) for c in kt.FWD_CONFIGS_16]


def test_footprint_moeut_44m_bf16_is_small():
    """One moeut_44m bf16 training step + decoding: a handful of variants, <= 2 configs each for
    training and one untuned small config for decoding; decoding never autotunes."""
    traced = fp.trace(fp.model_config("moeut_44m"), "bf16", 64, 1024, ["train", "decode"], trace_tokens=16)
    s = fp.summarise(traced)
    assert 6 <= len(s["specs"]) <= 12 and s["compiles"] <= 24, fp.format_table(s, "44m")
    steps = [la for la in traced["decode"] if la.get("phase") == "decode step"]
    assert steps and all(len(la["configs"]) == 1 for la in steps)
    assert {la["key"][0] for la in steps} == {0}  # S_BUCKET: the small bucket
    assert all(la["constexprs"].get("UPCAST") is False for la in traced["train"])
    kinds = {la["kernel"] for la in traced["train"]}
    assert kinds == {"fwd", "dw"}


def test_footprint_fp32_golden_never_autotunes():
    traced = {}
    for p in ("golden_tiny", "golden_small_g3"):
        for step, ls in fp.trace(fp.model_config(p), "fp32", 2, 64, ["train", "eval", "decode"], prefill=32).items():
            traced[f"{p}:{step}"] = ls
    s = fp.summarise(traced)
    assert s["autotuned_keys"] == 0 and s["compiles"] == len(s["specs"])
    assert all(la["constexprs"]["DOT_PREC"] == "ieee" for ls in traced.values() for la in ls)


def test_cli_arguments_are_checked():
    """`python -m moeut.tools.footprint` options (FootprintOptions, a typed tool): ranges and
    choices from the schema, preset and steps by `check`; each error names the option."""
    from moeut.cli import check_options
    O = fp.FootprintOptions
    for opts, msg in ((O(seq_len=0), "seq_len: must be >= 1, got 0"),
                      (O(steps=["train", "bwd"]), "steps: must be one of train | eval | decode, got 'bwd'"),
                      (O(dtype="fp8"), "dtype: must be one of bf16 | fp16 | fp32 | tf32, got 'fp8'"),
                      (O(aot=0), "aot: must be >= 1, got 0")):
        with pytest.raises(ValueError, match="^" + re.escape(msg)):
            check_options(opts)
    with pytest.raises(ValueError, match=r"preset: 'nope': .*unknown preset 'nope'"):
        fp.check(O(preset=["tiny", "nope"]))
    with pytest.raises(ValueError, match=r"preset: expected a preset name or a non-empty list"):
        fp.check(O(preset=[]))
    with pytest.raises(ValueError, match=r"steps: expected a non-empty list of \['train', 'eval', 'decode'\], got \[\]"):
        fp.check(O(steps=[]))
    assert fp.check(O(preset=["golden_tiny", "tiny"])) == ["golden_tiny", "tiny"]
    a = O()
    check_options(a)
    assert (fp.check(a), a.steps, a.batch, a.seq_len, a.aot, a.json) == (
        ["moeut_44m"], ["train", "decode"], 64, 1024, None, None)
    with pytest.raises(ValueError, match="dtype"):
        fp.trace(fp.model_config("tiny"), "fp8")


@pytest.mark.triton
@pytest.mark.slow  # ~30-70 s: about a hundred interpreted launches
def test_footprint_equals_the_launches_under_the_interpreter(monkeypatch):
    """Run the tiny model (Triton backend, fp32, train + eval) under the interpreter with a spy
    on the launcher, and compare the launched (kernel, constexprs) with the recorded footprint."""
    if not (kt.interpreting() and isinstance(triton.language.sum, triton.runtime.interpreter.InterpretedFunction)):
        pytest.skip("Triton interpreter not active in this process")
    monkeypatch.setenv(kt.CONFIG_ENV, "BM=16,BN=16,BK=16,num_warps=1,num_stages=1")
    for var in (kt.DETERMINISTIC_ENV, kt.TILING_ENV, kt.DW_SPLIT_ENV, kt.TF32_ENV, "MOEUT_CVMM_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    import torch.nn.functional as F
    from moeut.registry import build_model
    cfg = fp.model_config("tiny")
    T = 8
    recorded = fp.trace(cfg, "fp32", 1, T, ["train"], trace_tokens=T)["train"]
    launched = []
    real = kt._launch

    def spy(kind, grid, args, kwargs):
        launched.append((kind, tuple(sorted(kwargs.items()))))
        return real(kind, grid, args, kwargs)

    monkeypatch.setattr(kt, "_launch", spy)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (1, T + 1))
    out = model(ids[:, :-1])
    (F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()) + out.reg_loss).backward()
    want = sorted((la["kernel"], tuple(sorted(la["constexprs"].items()))) for la in recorded)
    assert sorted(launched) == want
