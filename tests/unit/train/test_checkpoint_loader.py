"""One checkpoint loader for every reader (moeut.checkpoint.open_checkpoint; issue 18.2).

A run whose newest model.pt was cut in half: evaluation, analysis, the HF export and training's
resume fall back to the previous checkpoint with a warning naming the skipped file; pointing at the
damaged checkpoint (its dir or the file) stops with an error naming the file; a run dir with no
readable checkpoint names the run dir and the `checkpoint=` option. Needs no ../shared data.
"""
import json
import os
import random
import re
import warnings
from pathlib import Path

import pytest
import torch

from moeut.checkpoint import (CheckpointError, find_checkpoints, load_model, open_checkpoint,
                              resolve_checkpoint, save_checkpoint)
from moeut.registry import build_model, get_preset

WORDS = ("the cat dog bird sat ran flew over under a mat tree house river quickly slowly red green blue "
         "small big old young man woman child saw heard found took gave").split()


def _text(n_sentences: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
                    for _ in range(n_sentences))


@pytest.fixture(scope="module")
def tokenizer():
    from moeut.data.tokenizer import train_tokenizer
    return train_tokenizer([_text(20, s) for s in range(40)], vocab_size=160, hard_vocab_limit=False)


@pytest.fixture()
def run(tmp_path, tokenizer):
    """A run with checkpoints at steps 2 and 4 (different weights); step 4's model.pt is cut in half.
    Returns (run dir, state dict of step 2, path of the damaged file)."""
    cfg = get_preset("tiny", vocab_size=tokenizer.vocab_size)
    states = {}
    for step in (2, 4):
        torch.manual_seed(step)
        model = build_model(cfg)
        states[step] = {k: v.clone() for k, v in model.state_dict().items()}
        save_checkpoint(tmp_path / "run" / "checkpoints", step, model, cfg, tokenizer=tokenizer,
                        meta={"tokens_seen": 100 * step})
    bad = tmp_path / "run" / "checkpoints" / "step_0000004" / "model.pt"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # a truncated copy
    return tmp_path / "run", states[2], bad


SKIP_RE = r"skipping unreadable checkpoint .*step_0000004.*model\.pt"


def _assert_fell_back(record, bad):
    msgs = [str(w.message) for w in record]
    assert any("skipping unreadable checkpoint" in m and str(bad) in m for m in msgs), msgs
    assert any("using" in m and "step_0000002" in m for m in msgs), msgs


def test_load_model_falls_back_to_previous(run):
    run_dir, state2, bad = run
    with pytest.warns(UserWarning, match=SKIP_RE) as rec:
        loaded = load_model(run_dir)
    _assert_fell_back(rec, bad)
    assert loaded.meta["step"] == 2 and loaded.path.endswith("step_0000002")
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], state2[k]) for k in state2)  # the weights of step 2, not step 4
    # the cheap resolver (completeness check without loading) agrees
    with pytest.warns(UserWarning, match=SKIP_RE):
        assert resolve_checkpoint(run_dir).endswith("step_0000002")


@pytest.mark.parametrize("target", ["dir", "file"])
def test_pointing_at_the_damaged_checkpoint_names_the_file(run, target):
    run_dir, _, bad = run
    path = bad.parent if target == "dir" else bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent fallback to another checkpoint
        with pytest.raises(CheckpointError) as e:
            load_model(path)
        assert e.value.file == str(bad) and str(bad) in str(e.value) and "truncated or corrupt" in str(e.value)
        with pytest.raises(CheckpointError, match="model.pt"):
            resolve_checkpoint(path)


def test_corrupt_middle_is_found_by_loading(run):
    """A damaged file whose zip directory is intact passes the cheap check; loading still falls back."""
    run_dir, _, bad = run
    good = bad.parent.parent / "step_0000002" / "model.pt"
    ckpt4 = bad.parent
    torch.manual_seed(9)
    cfg = get_preset("tiny", vocab_size=json.loads((ckpt4 / "model_config.json").read_text())["vocab_size"])
    torch.save(build_model(cfg).state_dict(), bad)  # repair step 4, then damage its tokenizer instead
    (ckpt4 / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.warns(UserWarning, match=r"skipping unreadable checkpoint .*step_0000004.*tokenizer\.model"):
        assert load_model(run_dir).path == str(good.parent)


def test_no_readable_checkpoint_names_run_dir_and_option(run, tmp_path):
    run_dir, _, bad = run
    p2 = run_dir / "checkpoints" / "step_0000002" / "meta.json"
    p2.write_text('{"step": 2')  # truncated JSON
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        with pytest.raises(FileNotFoundError) as e:
            load_model(run_dir)
    msg = str(e.value)
    assert str(run_dir) in msg and "checkpoint=" in msg and str(bad) in msg and str(p2) in msg
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no valid checkpoint in .*empty_run.*checkpoint="):
        load_model(empty)
    with pytest.raises(FileNotFoundError, match=r"no valid checkpoint: train\.init_from=.*nowhere does not exist"):
        load_model(tmp_path / "nowhere", option="train.init_from")
    with pytest.raises(ValueError, match=r"checkpoint: required"):
        load_model("???")


def test_other_errors_are_not_mistaken_for_corruption(run, tokenizer):
    """A vocabulary mismatch is a user error, not a damaged file: no fallback, the error propagates."""
    run_dir, _, bad = run
    calls = []

    def read(c):
        calls.append(os.path.basename(c))
        raise ValueError("vocab_size 160 != expected 8000")
    with pytest.raises(ValueError, match="expected 8000"):
        open_checkpoint(run_dir, read)
    assert calls == ["step_0000004"]


def test_export_falls_back(run, tmp_path):
    pytest.importorskip("transformers")
    from moeut.hf.export import export
    run_dir, _, bad = run
    with pytest.warns(UserWarning, match=SKIP_RE):
        out = export(str(run_dir), str(tmp_path / "export"))
    assert json.loads((Path(out) / "moeut_export.json").read_text())["step"] == 2
    with pytest.raises(CheckpointError, match=str(bad).replace(".", r"\.")):
        export(str(bad.parent), str(tmp_path / "export2"))
    assert not (tmp_path / "export2").exists()  # nothing written for a refused export


def test_analyze_falls_back(run, tmp_path):
    from moeut.analysis import routing_command as Z
    run_dir, _, bad = run
    data = tmp_path / "valid.txt"
    data.write_text(_text(60, 123))
    cfg = Z.RoutingOptions(checkpoint=str(run_dir), data=Z.DataOptions(path=str(data)), seq_len=16, batch_size=4,
                          max_tokens=256, device="cpu", out_dir=str(tmp_path / "an"),
                          figures=Z.FigureOptions(formats=["png"], dpi=30), report=False)
    with pytest.warns(UserWarning, match=SKIP_RE):
        res = Z.run_analysis(cfg)
    from moeut.analysis.stats import load_stats
    meta = load_stats(res["stats"])["meta"]
    assert meta["step"] == 2 and meta["checkpoint"].endswith("step_0000002")
    cfg.checkpoint = str(bad)
    with pytest.raises(CheckpointError, match="step_0000004"):
        Z.run_analysis(cfg)


def test_evaluate_falls_back(run, tmp_path):
    from moeut.eval.tasks.base import EvalOptions
    from moeut.eval.zeroshot import evaluate_checkpoint
    run_dir, _, bad = run
    lam = tmp_path / "lambada.jsonl"
    lam.write_text("".join(json.dumps({"text": _text(2, s)[:-1]}) + "\n" for s in range(3)))
    opts = EvalOptions(paths={"lambada": str(lam)}, limit=3)
    with pytest.warns(UserWarning, match=SKIP_RE):
        res = evaluate_checkpoint(str(run_dir), ["lambada"], opts, out_dir=str(tmp_path / "ev"), device="cpu",
                                  progress=False)
    assert res["step"] == 2 and res["checkpoint"].endswith("step_0000002")
    with pytest.raises(CheckpointError, match="step_0000004"):
        evaluate_checkpoint(str(bad.parent), ["lambada"], opts, out_dir=str(tmp_path / "ev2"), device="cpu",
                            progress=False)


def test_training_resume_uses_the_same_loader(run):
    """Training's resume (moeut.checkpoint's training part) reads through open_checkpoint as well: a
    damaged train_state.pt of the newest checkpoint is skipped, naming the file."""
    from moeut import checkpoint as tl
    run_dir, _, bad = run
    logged = []
    # step 2 has no train_state.pt (save_checkpoint without extra files): nothing is readable
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # each warning goes to the log once, not also as a UserWarning
        with pytest.raises(FileNotFoundError, match=r"train\.resume="):
            tl.load_latest_training_checkpoint(str(run_dir), log=logged.append)
    import re
    assert sum(bool(re.search(SKIP_RE, m)) for m in logged) == 1, logged
    assert any(str(bad) in m for m in logged)
    assert any("train_state.pt" in m and "missing" in m for m in logged)
    with pytest.raises(CheckpointError, match="step_0000004"):
        tl.load_training_checkpoint(str(bad.parent))
    assert find_checkpoints(run_dir)  # nothing was deleted or rewritten


def test_compare_reads_the_newest_readable_config(run):
    """moeut.analysis compare reads only model_config.json: a damaged one is skipped, named."""
    from moeut.analysis import compare
    run_dir, _, bad = run
    cfg4 = bad.parent / "model_config.json"
    cfg4.write_text(cfg4.read_text()[:20])
    with pytest.warns(UserWarning, match=r"skipping unreadable checkpoint .*step_0000004.*model_config\.json"):
        r = compare.load_run(str(run_dir))
    assert r.config.d_model == 64 and r.params > 0


# ------------------------------------------------------------------------------------------
# Rotation counts only valid checkpoints; unreadable ones are moved aside, never deleted
# ------------------------------------------------------------------------------------------

def test_rotation_never_deletes_a_valid_checkpoint_while_keeping_an_unreadable_one(tmp_path, tokenizer):
    """Checkpoints 2, 4, 6 and a truncated 5 (newer than 4): keep_last=2 must keep 4 and 6 (the
    newest VALID ones), delete 2, and move 5 to checkpoints/unreadable/ byte-for-byte with one
    warning naming it (the old rotation deleted 4 and kept the unreadable 5)."""
    from moeut.checkpoint import prune_checkpoints
    cfg = get_preset("tiny", vocab_size=tokenizer.vocab_size)
    root = tmp_path / "run" / "checkpoints"
    for step in (2, 4, 5, 6):
        torch.manual_seed(step)
        save_checkpoint(root, step, build_model(cfg), cfg, tokenizer=tokenizer)
    bad = root / "step_0000005" / "model.pt"
    bad.write_bytes(bad.read_bytes()[:1000])
    cut = bad.read_bytes()
    msgs = []
    prune_checkpoints(str(tmp_path / "run"), 2, log=msgs.append)
    assert [os.path.basename(c) for c in find_checkpoints(tmp_path / "run")] == ["step_0000004", "step_0000006"]
    assert (root / "unreadable" / "step_0000005" / "model.pt").read_bytes() == cut  # kept, not deleted
    assert len(msgs) == 1 and "step_0000005" in msgs[0] and "unreadable" in msgs[0], msgs
    for c in find_checkpoints(tmp_path / "run"):
        load_model(c)  # both kept checkpoints load


def test_fallback_warns_once_naming_the_setting_in_effect(run):
    """With a log, each fallback message goes to the log once and is not also a UserWarning;
    the setting named is the one the caller gives (train.resume=auto), not "option=<dir>"."""
    run_dir, _, bad = run
    msgs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no duplicate UserWarning
        open_checkpoint(run_dir, resolve_checkpoint, option="train.resume", log=msgs.append,
                        setting="train.resume=auto (run dir x)")
    assert len(msgs) == 2 and sum("skipping unreadable checkpoint" in m and str(bad) in m for m in msgs) == 1, msgs
    assert msgs[1].startswith("[ckpt] WARNING train.resume=auto (run dir x): using "), msgs


def test_nonfinite_weights_are_never_checkpointed(tmp_path, tokenizer):
    """A training checkpoint of NaN weights is refused before anything is written: the error names
    the checkpoint and a tensor, the existing checkpoints stay byte-for-byte (no rotation)."""
    from moeut.checkpoint import NonFiniteWeightsError, save_training_checkpoint
    cfg = get_preset("tiny", vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg)
    run_dir = tmp_path / "run"
    kw = dict(train_state={"tokens_seen": 0}, tokenizer=tokenizer, raw_config={}, keep_last=1)
    good = save_training_checkpoint(str(run_dir), 2, model, cfg, **kw)
    files = {p: p.read_bytes() for p in Path(good).iterdir()}
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"step_0000004: not written: .*lm_head\.weight"):
        save_training_checkpoint(str(run_dir), 4, model, cfg, **kw)
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_0000002"]  # no step 4, no .tmp, 2 kept
    assert {p: p.read_bytes() for p in Path(good).iterdir()} == files


def test_other_dtype_is_cast_to_the_models_with_a_warning_naming_the_file(tmp_path, tokenizer):
    """Checkpoint dtype policy (docs/architecture.md): a bf16-stored model.pt loads into the fp32
    model as fp32 (the bf16 values, cast), with one warning naming the file; every loader path
    (load_model, training resume's restore_model, official weights) follows it."""
    from moeut.checkpoint import load_training_checkpoint, restore_model, save_training_checkpoint
    from moeut.official import from_official
    cfg = get_preset("tiny", vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg).to(torch.bfloat16)
    bf16 = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = save_training_checkpoint(str(tmp_path / "run"), 1, model, cfg, train_state={"tokens_seen": 0},
                                    tokenizer=tokenizer, raw_config={})
    model_pt = os.path.join(ckpt, "model.pt")
    loaders = {"load_model": lambda: load_model(ckpt).model,
               "resume": lambda: _restored(cfg, load_training_checkpoint(ckpt), restore_model)}
    for name, load in loaders.items():
        with pytest.warns(UserWarning, match=re.escape(model_pt) + r": \d+ tensor\(s\) stored as bfloat16 cast to float32"):
            got = load()
        for k, v in got.state_dict().items():
            assert v.dtype == torch.float32, (name, k)
            assert torch.equal(v, bf16[k].float()), (name, k)
    golden = torch.load(Path(__file__).resolve().parents[2] / "assets" / "golden" / "tiny.pt", weights_only=True)
    sd16 = {k: v.bfloat16() if v.is_floating_point() else v for k, v in golden["state_dict"].items()}
    with pytest.warns(UserWarning, match=r"weights\.pt: \d+ tensor\(s\) stored as bfloat16 cast to float32"):
        m = from_official(golden["config"], sd16, source="weights.pt")
    assert all(torch.equal(v, sd16[k].float()) for k, v in m.state_dict().items())
    assert all(v.dtype == torch.float32 for v in m.state_dict().values())
    with warnings.catch_warnings():  # the same dtype: no warning
        warnings.simplefilter("error")
        load_model(save_training_checkpoint(str(tmp_path / "run32"), 1, build_model(cfg), cfg,
                                            train_state={"tokens_seen": 0}, tokenizer=tokenizer, raw_config={})).model


def _restored(cfg, ckpt, restore_model):
    model = build_model(cfg)
    restore_model(ckpt, model)
    return model


def test_model_config_diff_accepts_only_new_options_at_their_default():
    """A checkpoint that predates an option matches when the run leaves it at its default; set away
    from the default, or any other changed option, it is a difference (hand-written configs)."""
    import dataclasses
    from moeut.model_config import MoEUTConfig
    from moeut.train_lib.start import model_config_diff
    now = json.loads(json.dumps(dataclasses.asdict(get_preset("tiny"))))
    old = {k: v for k, v in now.items() if k not in ("router_zloss", "bias_balance_rate")}
    assert model_config_diff(old, now, MoEUTConfig) == ([], ["bias_balance_rate", "router_zloss"])
    assert model_config_diff(now, now, MoEUTConfig) == ([], [])
    assert model_config_diff(old, dict(now, router_zloss=1e-3), MoEUTConfig) == (["router_zloss"], ["bias_balance_rate"])
    assert model_config_diff(dict(old, d_model=now["d_model"] + 1), now, MoEUTConfig)[0] == ["d_model"]
    # a key only the checkpoint has (an option since removed) is a difference too
    assert model_config_diff(dict(now, gone=1), now, MoEUTConfig) == (["gone"], [])


def test_a_refused_resume_names_an_absent_option_as_absent():
    from moeut.train_lib.start import _describe_change
    assert _describe_change("router_zloss", {}, {"router_zloss": 0.01}) == \
        "model.router_zloss=absent (an older checkpoint) (now 0.01)"
    assert _describe_change("d_model", {"d_model": 64}, {"d_model": 65}) == "model.d_model=64 (now 65)"
    assert _describe_change("gone", {"gone": 1}, {}) == "model.gone=1 (not an option now)"


def test_load_model_names_options_a_checkpoint_predates(tmp_path, tokenizer):
    """A finished checkpoint written before two options existed loads with their defaults (the same
    weights, the same logits) and one warning naming both options, their values and the file; a
    checkpoint with every option loads silently."""
    from moeut.checkpoint import save_training_checkpoint
    cfg = get_preset("tiny", vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ckpt = save_training_checkpoint(str(tmp_path / "run"), 1, model, cfg, train_state={"tokens_seen": 0},
                                    tokenizer=tokenizer, raw_config={})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(ckpt)
    cfg_file = Path(ckpt) / "model_config.json"
    stored = json.loads(cfg_file.read_text())
    assert stored.pop("router_zloss") == 0.0 and stored.pop("bias_balance_rate") == 0.0
    cfg_file.write_text(json.dumps(stored))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_model(ckpt)
    said = [str(w.message) for w in caught]
    assert said == [f"{cfg_file} predates model.bias_balance_rate, model.router_zloss; loaded with "
                    "model.bias_balance_rate=0.0, model.router_zloss=0.0 (their defaults)"]
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.model(tokens).logits, model(tokens).logits)
