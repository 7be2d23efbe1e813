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
from moeut.cli import typed_options  # noqa: E402
from moeut.hf.export import HFExportOptions, export, run  # noqa: E402


def _opts(overrides):
    """The checked options of `python -m moeut.hf.export <overrides>`."""
    return typed_options(HFExportOptions, overrides, "moeut.hf.export")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, small_tokenizer):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = get_preset("tiny", vocab_size=small_tokenizer.vocab_size)
    model = build_model(cfg)
    save_checkpoint(root / "run" / "checkpoints", 7, model, cfg, tokenizer=small_tokenizer)
    out = root / "export"
    assert run(_opts([f"checkpoint={root / 'run'}", f"out={out}"])) == str(out)
    return root, out


def test_export_options_are_checked_before_writing(exported, tmp_path):
    """`python -m moeut.hf.export` options: a missing, unknown or bad one fails naming it, and
    nothing is written."""
    root, _ = exported
    out = tmp_path / "x"
    with pytest.raises(ValueError, match=r"^out: required"):
        run(_opts([f"checkpoint={root / 'run'}"]))
    with pytest.raises(ValueError, match=r"^checkpoint: required"):
        run(_opts([f"out={out}"]))
    with pytest.raises(ValueError, match=r"^dtype: must be one of null \| fp32 \| bf16 \| fp16, got 'int8'$"):
        run(_opts([f"checkpoint={root / 'run'}", f"out={out}", "dtype=int8"]))
    with pytest.raises(ValueError, match=r"dtype: use one of"):  # the library call checks it too
        export(str(root / "run"), str(out), dtype="fp8")
    with pytest.raises(FileNotFoundError, match=r"checkpoint=.*nowhere: no such file"):
        run(_opts([f"checkpoint={tmp_path / 'nowhere'}", f"out={out}"]))
    with pytest.raises(ValueError, match=r"^outdir: no such option"):
        run(_opts([f"checkpoint={root / 'run'}", f"out={out}", "+outdir=y"]))
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
    # every file with the mode a new file gets under the umask (safetensors writes 0600 on its own)
    import os
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert modes == {name: 0o666 & ~mask for name in modes}, modes
    # special tokens for the standard clients: EOS and pad are control pieces, no BOS
    assert cfg["eos_token_id"] == 2 and cfg["pad_token_id"] == 2 and cfg.get("bos_token_id") is None


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


def _until_eos(new_tokens, eos: int, pad: int, width: int):
    """A row's new tokens as transformers' `generate` returns them when it stops rows at `eos`:
    the native tokens up to the first EOS, then `pad`, `width` tokens in all."""
    out = list(new_tokens[:new_tokens.index(eos) + 1]) if eos in new_tokens else list(new_tokens)
    return (out + [pad] * width)[:width]


def _native_generate(native, ids, n, cfg):
    """The native greedy generate of `ids` [B, T], as transformers' generate with the export's
    eos/pad ids returns it (rows stopped at EOS; the call ends when every row has)."""
    T = ids.shape[1]
    ref = native.generate(ids, n, greedy=True)[:, T:].tolist()
    ends = [r.index(cfg.eos_token_id) + 1 if cfg.eos_token_id in r else n for r in ref]
    width = max(ends)
    rows = [_until_eos(r, cfg.eos_token_id, cfg.pad_token_id, width) for r in ref]
    return torch.cat([ids, torch.tensor(rows, dtype=ids.dtype).reshape(len(rows), width)], dim=1)


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
    ref = _native_generate(native, ids, 10, hf.config)
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
        want = _until_eos(native.generate(alone, 8, greedy=True)[0, alone.shape[1]:].tolist(),
                          hf.config.eos_token_id, pad_id, got.shape[1] - T)
        assert got[i, T:].tolist() == want, t
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
    assert torch.equal(hf.generate(ids, max_new_tokens=10, do_sample=False), _native_generate(native16, ids, 10, hf.config))
    with torch.no_grad():
        full = hf(ids, use_cache=False).logits.float()
        inc = _incremental_logits(hf, ids, prefill=5).float()
        fp32 = load_model(run).model(ids).logits
    # Tolerance: caching only reorders bf16 sums, so it may not add more error than bf16 itself
    # carries; that floor is measured on the same inputs as the full bf16 forward vs fp32.
    # (In bf16 a near-tie among the sigma-MoE gates can flip an expert choice, so that floor is
    # far above bf16's 2^-8 relative rounding for MoEUT; the bf16 numerics themselves are
    # tests/unit/model/test_precision.py's subject.)
    noise = (full - fp32).abs().max().item()
    assert noise > 0  # the export really ran in bf16
    assert (inc - full).abs().max().item() <= noise


# ------------------------------------------------------------------------------------------
# The exported tokenizer encodes any text as the native one; generate without a mask
# ------------------------------------------------------------------------------------------

def _edge_strings(sp):
    """Edge cases for a tokenizer: empty, whitespace runs, newlines/tabs, leading/trailing spaces,
    unicode (accents, CJK, emoji, combining marks), the spelling of every control and user-defined
    piece (and of byte pieces) and of the document separator, alone, glued to text and mixed."""
    # (the project's tokenizers have no user-defined pieces: SPEC 5.2 keeps SentencePiece's defaults)
    specials = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)
                or sp.is_byte(i)][:8] + ["<pad>", "<unk>", "<s>", "</s>", "<mask>", "<0x41>", "<STORY_SEP>"]
    base = ["", " ", "   ", "\n", "\n\n\t \n", "\t", " leading", "trailing ", "  both  ", "a  b   c",
            "line one\nline two\r\nthree", "naïve café", "日本語のテキスト", "emoji 😀🚀 ok", "e\u0301 combining",
            "Question: Z = 1", "x" * 300, "12345 67.89", "ﬁ ligature", "\u00a0nbsp\u3000ideographic space"]
    out = list(base)
    for s in sorted(set(specials)):
        out += [s, f"text{s}", f"{s}text", f"a {s} b", s * 3, f"Hello.{s}\n{s} world", f" {s} "]
    out.append(" ".join(specials) + " mixed 😀 text\t")
    return out


def test_tokenizer_encodes_every_text_as_the_native_one(exported, small_tokenizer):
    """Independent reference: the native tokenizer (SentencePiece). Also batches, decoding, and
    the special tokens lm-eval and generate read."""
    _, out = exported
    from transformers import AutoTokenizer
    auto = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    sp = small_tokenizer.sp
    texts = _edge_strings(sp)
    for t in texts:
        ids = small_tokenizer.encode(t)
        assert auto(t).input_ids == ids, repr(t)
        assert auto.encode(t) == ids and auto.encode(t, add_special_tokens=True) == ids, repr(t)
        assert auto.decode(ids) == small_tokenizer.decode(ids), repr(t)
        assert not any(sp.is_control(i) for i in ids)  # so an encoded text never holds the pad id
    batch = auto(texts, padding=True)
    for t, row, m in zip(texts, batch.input_ids, batch.attention_mask):
        ids = small_tokenizer.encode(t)
        assert row[len(row) - len(ids):] == ids and sum(m) == len(ids) and m[len(m) - len(ids):] == [1] * len(ids)
    # special tokens: EOS/pad are control pieces (rendered by name, dropped with skip_special_tokens), no BOS
    assert auto.bos_token is None and auto.add_bos_token is False
    assert auto.eos_token == "</s>" and auto.eos_token_id == sp.eos_id() and auto.pad_token_id == sp.eos_id()
    ids = small_tokenizer.encode("Hello world.") + [auto.eos_token_id] + small_tokenizer.encode(" More")
    assert auto.decode(ids) == "Hello world.</s> More"
    assert auto.decode(ids, skip_special_tokens=True) == small_tokenizer.decode(ids) == "Hello world. More"
    assert auto.decode(auto.eos_token_id) == "</s>"


@pytest.mark.parametrize("preset", ["tiny", "cpu_du_every2"])
def test_generate_without_mask_treats_every_id_as_text(exports, preset, small_tokenizer):
    """Without an attention_mask every input id is a real token, also ids equal to the pad/EOS id
    (transformers would otherwise infer padding from them): the native generate's tokens."""
    run, out, _ = exports(preset)
    hf, native = _auto(out), load_model(run).model
    pad = hf.config.pad_token_id
    ids = _ids((2, 10), small_tokenizer.vocab_size, seed=5)
    ids[0, 0] = ids[0, 4] = ids[1, 9] = pad  # leading, inner and trailing "pad" ids, as text
    ref = _native_generate(native, ids, 6, hf.config)
    assert torch.equal(hf.generate(ids, max_new_tokens=6, do_sample=False), ref)
    assert torch.equal(hf.generate(input_ids=ids, max_new_tokens=6, do_sample=False), ref)
    # the same with an explicit all-ones mask; and a padded row still needs (and uses) its mask
    assert torch.equal(hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False), ref)


def test_docs_export_example_runs_as_written_and_pads(exported, small_tokenizer):
    """The Python block of docs/evaluation.md's export section, run as written (only the export
    path replaced): its batch really is padded, and each row's greedy output is that row alone."""
    import re
    _, out = exported
    doc = (Path(__file__).resolve().parents[3] / "docs" / "evaluation.md").read_text()
    section = doc[doc.index("## 3. Hugging Face export"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "exports/c4_moeut_44m" in code
    ns = {}
    exec(compile(code.replace("exports/c4_moeut_44m", str(out)), "docs/evaluation.md", "exec"), ns)
    batch, gen, model = ns["batch"], ns["out"], ns["model"]
    assert (batch.attention_mask == 0).any(), "the example's prompts must have different lengths"
    T = batch.input_ids.shape[1]
    native = load_model(exported[0] / "run").model
    for i in range(batch.input_ids.shape[0]):
        alone = batch.input_ids[i][batch.attention_mask[i].bool()][None]
        want = _until_eos(native.generate(alone, 20, greedy=True)[0, alone.shape[1]:].tolist(),
                          model.config.eos_token_id, model.config.pad_token_id, gen.shape[1] - T)
        assert gen[i, T:].tolist() == want
