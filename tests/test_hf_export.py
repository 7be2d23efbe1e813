"""Hugging Face export round trip: AutoModelForCausalLM(trust_remote_code) gives the native
logits; the SentencePiece tokenizer is exported and loads (sentencepiece, ours, AutoTokenizer)."""
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moeut.checkpoint import build_model, load_model, save_checkpoint  # noqa: E402
from moeut.config import get_preset  # noqa: E402
from moeut.data.tokenizer import Tokenizer  # noqa: E402
from moeut.hf.export import export, main  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory, small_tokenizer):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = get_preset("tiny", vocab_size=small_tokenizer.vocab_size)
    model = build_model(cfg)
    save_checkpoint(root / "run" / "checkpoints", 7, model, cfg, tokenizer=small_tokenizer)
    out = root / "export"
    main([f"checkpoint={root / 'run'}", f"out={out}"])
    return root, out


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
    with pytest.raises(ValueError, match="right padding only"):
        hf(ids, attention_mask=torch.tensor([[0] + [1] * 39] * 3))


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
