"""Hugging Face export round trip: AutoModelForCausalLM(trust_remote_code) gives the native
logits; the SentencePiece tokenizer is exported and loads (sentencepiece, ours, AutoTokenizer) and
pads; `generate` (greedy, beams, left-padded batches) equals the native decoder token for token,
and decoding through the transformers cache equals the cache-free full forward (fp32 and bf16)."""
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moeut.checkpoint import load_model, save_checkpoint  # noqa: E402
from moeut.registry import build_model, get_preset  # noqa: E402
from moeut.data.tokenizer import Tokenizer  # noqa: E402
from moeut.cli import compose  # noqa: E402
from moeut.hf.export import export, run  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory, small_tokenizer):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = get_preset("tiny", vocab_size=small_tokenizer.vocab_size)
    model = build_model(cfg)
    save_checkpoint(root / "run" / "checkpoints", 7, model, cfg, tokenizer=small_tokenizer)
    out = root / "export"
    assert run(compose("hf_export", [f"checkpoint={root / 'run'}", f"out={out}"])) == str(out)
    return root, out


def test_export_options_are_checked_before_writing(exported, tmp_path):
    """`python -m moeut.hf.export` options: a missing, unknown or bad one fails naming it, and
    nothing is written."""
    root, _ = exported
    out = tmp_path / "x"
    with pytest.raises(ValueError, match=r"^out: required"):
        run(compose("hf_export", [f"checkpoint={root / 'run'}"]))
    with pytest.raises(ValueError, match=r"^checkpoint: required"):
        run(compose("hf_export", [f"out={out}"]))
    with pytest.raises(ValueError, match=r"dtype: expected one of \['bf16', 'fp16', 'fp32'\] or null, got 'int8'"):
        run(compose("hf_export", [f"checkpoint={root / 'run'}", f"out={out}", "dtype=int8"]))
    with pytest.raises(ValueError, match=r"dtype: use one of"):  # the library call checks it too
        export(str(root / "run"), str(out), dtype="fp8")
    with pytest.raises(FileNotFoundError, match=r"checkpoint=.*nowhere: no such file"):
        run(compose("hf_export", [f"checkpoint={tmp_path / 'nowhere'}", f"out={out}"]))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['outdir'\]"):
        run(compose("hf_export", [f"checkpoint={root / 'run'}", f"out={out}", "+outdir=y"]))
    assert not out.exists()


def test_export_layout(exported):
    _, out = exported
    for name in ("config.json", "model.safetensors", "modeling_moeut.py", "configuration_moeut.py",
                 "tokenization_moeut.py", "tokenizer.model", "tokenizer_config.json", "moeut_export.json"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "moeut"
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_moeut.MoEUTForCausalLM"
    assert cfg["moeut_config"]["d_model"] == 64 and cfg["tie_word_embeddings"] is False
    assert json.loads((out / "moeut_export.json").read_text())["step"] == 7


def test_auto_model_gives_native_logits(exported, small_tokenizer):
    root, out = exported
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    native = load_model(root / "run").model
    ids = torch.randint(0, small_tokenizer.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = hf(ids).logits
        b = native(ids).logits
    assert a.shape == (3, 40, small_tokenizer.vocab_size)
    assert torch.equal(a, b)
    # labels give the shifted mean CE
    with torch.no_grad():
        loss = hf(ids, labels=ids).loss
    ref = torch.nn.functional.cross_entropy(b[:, :-1].reshape(-1, b.shape[-1]), ids[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    # an all-ones mask is no padding: the same batched call
    with torch.no_grad():
        assert torch.equal(hf(ids, attention_mask=torch.ones(3, 40, dtype=torch.long)).logits, b)
    with torch.no_grad():  # tuple output on request; unknown arguments are named, not dropped silently
        assert torch.equal(hf(ids, return_dict=False, use_cache=False)[0], b)
        with pytest.warns(UserWarning, match=r"ignoring unsupported arguments \['token_type_ids'\]"):
            hf(ids, token_type_ids=torch.zeros_like(ids))
    with pytest.raises(ValueError, match="row 0 is not one contiguous run"):
        hf(ids, attention_mask=torch.tensor([[1, 0] + [1] * 38] * 3))
    with pytest.raises(ValueError, match="row 2 has no real token"):
        hf(ids, attention_mask=torch.tensor([[1] * 40] * 2 + [[0] * 40]))


def test_tokenizer_exported_and_loadable(exported, small_tokenizer):
    _, out = exported
    import sentencepiece as spm
    from transformers import AutoTokenizer
    text = "Question: How do I ready a guinea pig cage?\nAnswer: Provide bedding.<STORY_SEP>"
    assert Tokenizer.load(out / "tokenizer.model").sha256 == small_tokenizer.sha256
    assert spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).encode(text) == small_tokenizer.encode(text)
    auto = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    assert auto(text).input_ids == small_tokenizer.encode(text)  # no BOS/EOS added
    assert auto.decode(small_tokenizer.encode("Hello world.")) == "Hello world."


def test_export_bf16(exported, tmp_path):
    root, _ = exported
    out = export(str(root / "run"), str(tmp_path / "bf16"), dtype="bf16")
    from safetensors.torch import load_file
    sd = load_file(str(Path(out) / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in sd.values() if v.is_floating_point())


# ------------------------------------------------------------------------------------------
# generate and the KV cache
# ------------------------------------------------------------------------------------------

# Dropless architectures: a position's output does not depend on how many tokens share the call.
DROPLESS = ["tiny", "dense_tiny", "cpu_sut"]
# cpu_du_every2 routes with a capacity limit: how many tokens share a forward changes which ones are
# dropped (issue 14.3), so cached decoding (1 token per call) need not equal the full forward; its
# generate is still compared with the native decoder, which makes the same calls.
ARCHS = DROPLESS + ["cpu_du_every2"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, small_tokenizer):
    """preset -> (run dir, export dir, bf16 export dir); built lazily."""
    root = tmp_path_factory.mktemp("hf_archs")
    made = {}

    def get(preset):
        if preset not in made:
            torch.manual_seed(0)
            cfg = get_preset(preset, vocab_size=small_tokenizer.vocab_size)
            save_checkpoint(root / preset / "checkpoints", 3, build_model(cfg), cfg, tokenizer=small_tokenizer)
            made[preset] = (root / preset, Path(export(str(root / preset), str(root / f"{preset}_hf"))),
                            Path(export(str(root / preset), str(root / f"{preset}_bf16"), dtype="bf16")))
        return made[preset]
    return get


def _auto(path, **kw):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, **kw).eval()


def _ids(shape, vocab, seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _incremental_logits(hf, ids, prefill):
    """Logits of `ids` computed as a prefill of `prefill` tokens, then one token per call through the
    transformers cache that the model returns."""
    out = hf(ids[:, :prefill], use_cache=True)
    parts, cache = [out.logits], out.cache if hasattr(out, "cache") else out.past_key_values
    for t in range(prefill, ids.shape[1]):
        out = hf(ids[:, t:t + 1], cache=cache)
        assert (out.cache if hasattr(out, "cache") else out.past_key_values) is cache
        assert cache.get_seq_length() == t + 1
        parts.append(out.logits)
    return torch.cat(parts, dim=1)


def _known_low_precision_failure(model, dtype):
    """The native models cast to bf16 fail on CPU until issue 14.2 is fixed; report that as xfail
    (it runs for real as soon as the native forward works in that dtype)."""
    try:
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
    except RuntimeError as e:
        if "mixed dtype" in str(e):
            pytest.xfail(f"native model in {dtype} fails on CPU (issue 14.2): {e}")
        raise


@pytest.mark.parametrize("preset", ARCHS)
def test_generate_greedy_equals_native(exports, preset, small_tokenizer):
    run, out, _ = exports(preset)
    hf = _auto(out)
    assert hf.can_generate()
    native = load_model(run).model
    ids = _ids((3, 12), small_tokenizer.vocab_size)
    ref = native.generate(ids, 10, greedy=True)
    got = hf.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, ref)
    if preset in DROPLESS:  # the cache-free path recomputes everything: an independent reference
        assert torch.equal(hf.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False), ref)
        # beam search reorders and repeats the cache rows (Cache.reorder_cache / batch_repeat_interleave)
        kw = dict(max_new_tokens=6, do_sample=False, num_beams=3, num_return_sequences=2)
        assert torch.equal(hf.generate(ids, **kw), hf.generate(ids, use_cache=False, **kw))


@pytest.mark.parametrize("preset", DROPLESS)
def test_cached_decoding_equals_full_forward(exports, preset, small_tokenizer):
    run, out, _ = exports(preset)
    hf = _auto(out)
    ids = _ids((2, 14), small_tokenizer.vocab_size, seed=2)
    with torch.no_grad():
        full = load_model(run).model(ids).logits  # native, no cache
        inc = _incremental_logits(hf, ids, prefill=5)
    # fp32: the cached path only changes the shapes of the attention matmuls (summation order)
    torch.testing.assert_close(inc, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "cpu_du_every2"])
def test_left_padded_batch_equals_each_prompt_alone(exports, preset, small_tokenizer):
    from transformers import AutoTokenizer
    run, out, _ = exports(preset)
    hf, native = _auto(out), load_model(run).model
    tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    assert tok.pad_token is not None and tok.padding_side == "left"
    pad_id = tok.pad_token_id
    assert small_tokenizer.sp.is_control(pad_id)  # never produced by encoding text
    texts = ["The history of the city goes back to the Roman settlement on the river.", "Hello", "A cat sat."]
    batch = tok(texts, return_tensors="pt", padding=True)
    assert batch.input_ids.shape[1] == max(len(small_tokenizer.encode(t)) for t in texts)
    for row, t in zip(batch.input_ids.tolist(), texts):  # left padded with the pad id, text unchanged
        n = len(small_tokenizer.encode(t))
        assert row[len(row) - n:] == small_tokenizer.encode(t) and set(row[:len(row) - n]) <= {pad_id}
    got = hf.generate(**batch, max_new_tokens=8, do_sample=False)
    T = batch.input_ids.shape[1]
    with torch.no_grad():
        logits = hf(**batch, use_cache=False).logits
    for i, t in enumerate(texts):
        alone = torch.tensor([small_tokenizer.encode(t)])
        assert got[i, T:].tolist() == native.generate(alone, 8, greedy=True)[0, alone.shape[1]:].tolist(), t
        with torch.no_grad():
            ref = native(alone).logits[0]
        torch.testing.assert_close(logits[i, T - alone.shape[1]:], ref, rtol=0, atol=1e-5)
    # a right-padded prompt cannot be continued: the next token would follow the pads
    tok.padding_side = "right"
    right = tok(texts, return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="padding_side='left'"):
        hf.generate(**right, max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("preset", ["tiny", "cpu_du_every2"])
def test_padded_rows_equal_each_row_alone(exports, preset, small_tokenizer):
    """Right and left padding: every row's real positions get the logits of that row run alone
    (also for a capacity-limited router, where pads must not take capacity); pads get 0."""
    run, out, _ = exports(preset)
    hf, native = _auto(out), load_model(run).model
    ids = _ids((3, 20), small_tokenizer.vocab_size, seed=4)
    spans = [(0, 20), (0, 13), (6, 20)]  # full, right padded, left padded
    mask = torch.zeros(3, 20, dtype=torch.long)
    for i, (s, e) in enumerate(spans):
        mask[i, s:e] = 1
    with torch.no_grad():
        got = hf(ids, attention_mask=mask, use_cache=False).logits
        for i, (s, e) in enumerate(spans):
            torch.testing.assert_close(got[i, s:e], native(ids[i:i + 1, s:e]).logits[0], rtol=0, atol=1e-5)
            assert not got[i, :s].any() and not got[i, e:].any()


@pytest.mark.parametrize("preset", ["tiny", "dense_tiny"])
def test_bf16_export_generate_and_cache(exports, preset, small_tokenizer):
    run, _, out16 = exports(preset)
    hf = _auto(out16)
    assert hf.dtype == torch.bfloat16  # loaded in the stored precision
    native16 = load_model(run).model.to(torch.bfloat16)
    _known_low_precision_failure(native16, "bf16")
    ids = _ids((3, 12), small_tokenizer.vocab_size)
    # Same weights (bf16 rounding of the fp32 checkpoint), same dtype, same calls: identical tokens.
    assert torch.equal(hf.generate(ids, max_new_tokens=10, do_sample=False), native16.generate(ids, 10, greedy=True))
    with torch.no_grad():
        full = hf(ids, use_cache=False).logits.float()
        inc = _incremental_logits(hf, ids, prefill=5).float()
        fp32 = load_model(run).model(ids).logits
    # Tolerance: caching only reorders bf16 sums, so it may not add more error than bf16 itself
    # carries; that floor is measured on the same inputs as the full bf16 forward vs fp32.
    # (In bf16 a near-tie among the sigma-MoE gates can flip an expert choice, so that floor is
    # far above bf16's 2^-8 relative rounding for MoEUT; the bf16 numerics themselves are
    # tests/test_precision.py's subject.)
    noise = (full - fp32).abs().max().item()
    assert noise > 0  # the export really ran in bf16
    assert (inc - full).abs().max().item() <= noise
