"""Golden equivalence with the official implementation (tests/golden, README there).

Covers every model file in tests/assets/golden/ and $MOEUT_SHARED/golden/, so new golden files are
covered automatically; the large v8000.pt is optional (shared only) and skips, naming itself, when absent."""
import pytest
import torch
import torch.nn.functional as F

from moeut.model import KVCache
from moeut.official import from_official, to_official

from conftest import GOLDEN_MODEL_FILES, OPTIONAL_GOLDEN, REPO_GOLDEN, SHARED_GOLDEN, golden_or_skip, golden_path

# Known files first (the optional ones skip by name), then any other model file found in either folder.
MODEL_FILES = list(GOLDEN_MODEL_FILES) + sorted(
    {p.name for d in (REPO_GOLDEN, SHARED_GOLDEN) if d.is_dir() for p in d.glob("*.pt")}
    - set(GOLDEN_MODEL_FILES) - {"cvmm_cases.pt"})


def _load(path):
    d = torch.load(path, weights_only=True)
    if "logits_eval" not in d:  # e.g. tiny_training_format: expected outputs live in its source file
        src = d.get("source_golden", path.name.replace("_training_format", ""))
        ref = torch.load(golden_or_skip(src if src.endswith(".pt") else src + ".pt"), weights_only=True)
        return d, ref
    return d, d


@pytest.fixture(params=MODEL_FILES, ids=lambda name: name[:-3])
def golden(request):
    return _load(golden_or_skip(request.param))


def test_golden_files_present():
    """Every golden file except the optional large ones is carried in tests/assets/golden/."""
    required = [n for n in (*GOLDEN_MODEL_FILES, "cvmm_cases.pt") if n not in OPTIONAL_GOLDEN]
    missing = [n for n in required if not (REPO_GOLDEN / n).is_file()]
    assert not missing, f"golden files missing from {REPO_GOLDEN}: {missing}"


def test_logits_reg_ce_and_grads(golden):
    weights, ref = golden
    model = from_official(weights["config"], weights["state_dict"])
    ids = ref["input_ids"]
    tol = lambda r: 1e-4 + 1e-4 * r.abs()  # noqa: E731  (golden README tolerances)

    model.eval()
    with torch.no_grad():
        out_eval = model(ids)
    assert (out_eval.logits - ref["logits_eval"]).abs().le(tol(ref["logits_eval"])).all()
    assert out_eval.reg_loss.item() == 0.0 and out_eval.reg_loss.dim() == 0

    model.train()
    out = model(ids)
    assert (out.logits - ref["logits_train"]).abs().le(tol(ref["logits_train"])).all()
    assert abs(out.reg_loss.item() - ref["reg_loss_train"].item()) <= 1e-5
    V = out.logits.shape[-1]
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    assert abs(ce.item() - ref["ce_loss"].item()) <= 1e-5
    total = ce + out.reg_loss
    assert abs(total.item() - ref["total_loss"].item()) <= 2e-5
    total.backward()
    params = dict(model.named_parameters())
    for name in ref["grad_names"]:
        g_ref = ref["grads"][name]
        err = (params[name].grad - g_ref).abs().max().item()
        assert err <= 1e-3 * g_ref.abs().max().item(), f"gradient of {name}: max err {err}"


def test_kv_decode(golden):
    weights, ref = golden
    model = from_official(weights["config"], weights["state_dict"]).eval()
    kv = ref["kv_decode"]
    P, n = kv["prefill_len"], kv["n_steps"]
    ids = ref["input_ids"]
    cache = KVCache()
    with torch.no_grad():
        out = model(ids[:, :P], cache=cache)
        assert (out.logits - ref["logits_eval"][:, :P]).abs().max() <= 1e-4
        for s in range(n):
            out = model(ids[:, P + s:P + s + 1], cache=cache)
            err = (out.logits[:, 0] - ref["logits_eval"][:, P + s]).abs().max().item()
            assert err <= 1e-4, f"decode step {s}: {err}"


def test_official_round_trip(golden):
    weights, _ = golden
    model = from_official(weights["config"], weights["state_dict"])
    sd = to_official(model)
    again = from_official(weights["config"], sd)
    for k, v in again.state_dict().items():
        assert torch.equal(v, sd[k])
    if "unique_layers.0.pkm.keys" not in weights["state_dict"]:  # slim names: exact identity
        assert set(sd) == set(weights["state_dict"])
        for k in sd:
            assert torch.equal(sd[k], weights["state_dict"][k].float())


def test_official_bad_keys_are_named():
    weights, _ = _load(golden_path("tiny.pt"))
    sd = dict(weights["state_dict"])
    sd.pop("transformer.layers.1.ffn.keys")
    sd["transformer.layers.0.ffn.bogus"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"transformer\.layers\.1\.ffn\.keys.*|bogus"):
        from_official(weights["config"], sd)
    cfg = dict(weights["config"], vocab_size=1000)
    with pytest.raises(ValueError, match="vocab_size"):
        from_official(cfg, weights["state_dict"])
    with pytest.raises(ValueError, match="unknown arguments.*not_an_arg"):
        from_official(dict(weights["config"], not_an_arg=1), weights["state_dict"])
