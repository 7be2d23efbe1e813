"""lm-evaluation-harness adapter (moeut.eval.harness), in-process on a task defined from local
files, plus its request methods against the paper scorer and naive references."""
import json
import math
import os
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from moeut.checkpoint import save_checkpoint  # noqa: E402
from moeut.registry import build_model, get_preset  # noqa: E402
from eval_fakes import BigramLM, generated_texts  # noqa: E402
from moeut.eval.harness import MoEUTHarnessLM  # noqa: E402
from moeut.eval.scoring import MCItem, Scorer, evaluate_multiple_choice  # noqa: E402

from conftest import EVAL  # noqa: E402  ($MOEUT_SHARED/data/eval: not in the repository)
PIQA = EVAL / "piqa"


class Inst:  # the part of lm_eval.api.instance.Instance the adapter reads
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def small_tokenizer():
    """Shadows conftest's (which needs ../shared): a tokenizer trained on generated sentences."""
    from moeut.data.tokenizer import train_tokenizer
    extra = ["It was a bright cold day in April, and the clocks were striking thirteen.",
             "Once upon a time, the cat sat on the mat and slept. Question: Answer:"] * 20
    return train_tokenizer(generated_texts(600) + extra, vocab_size=256)


@pytest.fixture(scope="module")
def tiny_model(small_tokenizer):
    torch.manual_seed(0)
    return build_model(get_preset("tiny", vocab_size=small_tokenizer.vocab_size)).eval()


def test_loglikelihood_separate_tokenisation_and_no_bos(tiny_model, small_tokenizer):
    tok = small_tokenizer
    lm = MoEUTHarnessLM(model=tiny_model, tokenizer=tok, device="cpu", pad_multiple=8)
    ctx, cont = "The cat sat on the", " mat and slept."
    (lp, greedy), (lp_empty, _), (lp_none, g_none) = lm.loglikelihood(
        [Inst(ctx, cont), Inst("", "The cat sat."), Inst("The cat", "")])
    ids = tok.encode(ctx) + tok.encode(cont)
    with torch.no_grad():
        lsm = torch.log_softmax(tiny_model(torch.tensor([ids])).logits[0].double(), -1)
    c = len(tok.encode(ctx))
    ref = sum(float(lsm[p - 1, ids[p]]) for p in range(c, len(ids)))
    assert lp == pytest.approx(ref, abs=1e-6)
    ids2 = tok.encode("The cat sat.")
    with torch.no_grad():
        lsm2 = torch.log_softmax(tiny_model(torch.tensor([ids2])).logits[0].double(), -1)
    assert lp_empty == pytest.approx(sum(float(lsm2[p - 1, ids2[p]]) for p in range(1, len(ids2))), abs=1e-6)
    assert (lp_none, g_none) == (0.0, True)


def test_loglikelihood_rolling_windows(small_tokenizer):
    """A bigram model needs one token of context, so windowed rolling scores must equal the naive
    full-sequence sum over tokens 1..n-1 for any window length."""
    tok = small_tokenizer
    V = tok.vocab_size
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(0))
    text = "It was a bright cold day in April, and the clocks were striking thirteen. " * 3
    ids = tok.encode(text)
    lsm = torch.log_softmax(table.double(), -1)
    ref = math.fsum(float(lsm[ids[p - 1], ids[p]]) for p in range(1, len(ids)))
    for max_length in (7, 16, 1024):
        lm = MoEUTHarnessLM(model=BigramLM(table), tokenizer=tok, device="cpu", pad_multiple=8,
                            max_length=max_length)
        windows = lm.rolling_requests(text)
        assert sum(len(w.ids) - w.score_from for w in windows) == len(ids) - 1
        assert all(len(w.ids) <= max_length for w in windows)
        assert lm.loglikelihood_rolling([Inst(text)])[0] == pytest.approx(ref, abs=1e-8)


def test_generate_until_greedy(tiny_model, small_tokenizer):
    tok = small_tokenizer
    lm = MoEUTHarnessLM(model=tiny_model, tokenizer=tok, device="cpu")
    ctx = "Once upon a time"
    ids = torch.tensor([tok.encode(ctx)])
    # reference: greedy argmax, full recompute per token
    x = ids
    for _ in range(12):
        with torch.no_grad():
            nxt = tiny_model(x).logits[0, -1].argmax()
        x = torch.cat([x, nxt.view(1, 1)], 1)
    full = tok.decode(x[0, ids.shape[1]:].tolist())
    out = lm.generate_until([Inst(ctx, {"until": [], "max_gen_toks": 12})])[0]
    assert out == full
    stop = full[len(full) // 2:len(full) // 2 + 2]
    if stop:
        cut = lm.generate_until([Inst(ctx, {"until": [stop], "max_gen_toks": 12})])[0]
        assert cut == full.split(stop, 1)[0]


def test_simple_evaluate_on_local_task_matches_paper_scorer(tmp_path, tiny_model, small_tokenizer, monkeypatch):
    if not PIQA.is_dir():
        pytest.skip(f"shared data missing: {PIQA}")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache", raising=False)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    goals = [json.loads(l) for l in (PIQA / "valid.jsonl").read_text().splitlines()[:12]]
    labels = [int(l) for l in (PIQA / "valid-labels.lst").read_text().split()[:12]]
    data = tmp_path / "piqa_local.jsonl"
    data.write_text("".join(json.dumps({**g, "goal": g["goal"].strip(), "label": y}) + "\n"
                            for g, y in zip(goals, labels)))
    (tmp_path / "task.yaml").write_text(f"""task: moeut_piqa_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    lm = MoEUTHarnessLM(model=tiny_model, tokenizer=small_tokenizer, device="cpu", pad_multiple=8)
    res = simple_evaluate(model=lm, tasks=["moeut_piqa_local"], task_manager=TaskManager(include_path=str(tmp_path)),
                          log_samples=True, bootstrap_iters=0)
    acc = res["results"]["moeut_piqa_local"]["acc,none"]
    per_item = [s["acc"] for s in sorted(res["samples"]["moeut_piqa_local"], key=lambda s: s["doc_id"])]
    # the paper scorer, unnormalised, on the same items: same choice item by item (no ties here)
    items = [MCItem("Question: " + g["goal"].strip() + "\nAnswer:", [" " + g["sol1"], " " + g["sol2"]], y)
             for g, y in zip(goals, labels)]
    m = evaluate_multiple_choice(items, Scorer(tiny_model, device="cpu", progress=False), small_tokenizer,
                                 normalize=False, keep_items=True)
    assert per_item == [float(r["correct"]) for r in m["items"]]
    assert acc == pytest.approx(m["seq_average"])


def test_adapter_from_checkpoint_arg_string(tmp_path, tiny_model, small_tokenizer):
    cfg = tiny_model.config
    save_checkpoint(tmp_path / "run" / "checkpoints", 5, tiny_model, cfg, tokenizer=small_tokenizer)
    from lm_eval.api.registry import get_model
    cls = get_model("moeut")
    assert cls is MoEUTHarnessLM
    lm = cls.create_from_arg_string(f"checkpoint={tmp_path / 'run'},pad_multiple=8",
                                    {"batch_size": "auto", "device": "cpu"})
    assert lm.tokenizer.sha256 == small_tokenizer.sha256
    from lm_eval.api.registry import model_registry
    assert "hf" in list(model_registry.keys())  # registering ours does not hide lm-eval's built-ins
    with pytest.raises(ValueError, match="checkpoint="):
        MoEUTHarnessLM()


@pytest.mark.slow
def test_harness_cli_wrapper(tmp_path, tiny_model, small_tokenizer):
    """`python -m moeut.eval.harness_cli run --model moeut ...` on a task from local files."""
    import subprocess
    import sys
    if not PIQA.is_dir():
        pytest.skip(f"shared data missing: {PIQA}")
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, tiny_model, tiny_model.config, tokenizer=small_tokenizer)
    goals = [json.loads(l) for l in (PIQA / "valid.jsonl").read_text().splitlines()[:4]]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({**g, "label": 0}) + "\n" for g in goals))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "t.yaml").write_text(
        f"task: moeut_cli_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {data}\n"
        "validation_split: validation\noutput_type: multiple_choice\ndoc_to_text: \"{{goal}}\"\n"
        "doc_to_target: label\ndoc_to_choice: \"{{[sol1, sol2]}}\"\nmetric_list:\n  - metric: acc\n")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "c"))
    # no device named anywhere: the wrapper picks the one that exists (lm-eval's default is cuda:0)
    out = subprocess.run([sys.executable, "-m", "moeut.eval.harness_cli", "run", "--model", "moeut",
                          "--model_args", f"checkpoint={tmp_path / 'run'}",
                          "--tasks", "moeut_cli_local", "--include_path", str(tmp_path / "tasks"),
                          "--output_path", str(tmp_path / "res")],
                         cwd=Path(__file__).resolve().parents[3], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    if not torch.cuda.is_available():
        assert "no --device given; using cpu" in out.stderr
    (res_file,) = (tmp_path / "res").rglob("results_*.json")
    acc = json.loads(res_file.read_text())["results"]["moeut_cli_local"]["acc,none"]
    # the paper scorer, unnormalised, on the same 4 items (gold = sol1, lm-eval's " " delimiter)
    items = [MCItem(g["goal"], [" " + g["sol1"], " " + g["sol2"]], 0) for g in goals]
    m = evaluate_multiple_choice(items, Scorer(tiny_model, device="cpu", progress=False), small_tokenizer,
                                 normalize=False)
    assert acc == pytest.approx(m["seq_average"])


def test_harness_cli_device_default():
    from moeut.eval.harness_cli import with_default_device
    base = ["run", "--model", "moeut", "--model_args", "checkpoint=x"]
    assert with_default_device(base, cuda_available=False) == base + ["--device", "cpu"]
    assert with_default_device(base, cuda_available=True) == base + ["--device", "cuda"]
    named = ["run", "--model", "moeut", "--model_args", "checkpoint=x,device=cpu"]
    assert with_default_device(named, cuda_available=True) == named
    assert with_default_device(base + ["--device", "cuda:1"], cuda_available=False) == base + ["--device", "cuda:1"]
    assert with_default_device(["ls", "tasks"], cuda_available=False) == ["ls", "tasks"]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: 'cuda:0' asked for but torch sees no CUDA GPU"):
            MoEUTHarnessLM(model=BigramLM(torch.zeros(4, 4)), tokenizer=object(), device="cuda:0")
