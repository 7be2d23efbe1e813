"""The documented route "export, then lm-eval's own `hf` model" works: lm-eval's HFLM loads the
Hugging Face export (trust_remote_code) and scores a small local multiple-choice task exactly as
our adapter (`moeut`) scores the same items on the source checkpoint; its greedy `generate_until`
equals the adapter's. Runs offline, in process, on a tiny model and a tokenizer trained here."""
import json
import os
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's hf model needs it (the [eval] extra installs it)

from eval_fakes import generated_texts  # noqa: E402
from moeut.checkpoint import save_checkpoint  # noqa: E402
from moeut.data.tokenizer import train_tokenizer  # noqa: E402
from moeut.eval.harness import MoEUTHarnessLM  # noqa: E402  (registers lm-eval's model "moeut")
from moeut.hf.export import export  # noqa: E402
from moeut.eval.lm_eval_tasks import TASK_DIR  # noqa: E402
from moeut.registry import build_model, get_preset  # noqa: E402

ITEMS = Path(__file__).resolve().parents[1] / "assets" / "lm_eval_mc_items.jsonl"  # 12 hand-written items
TASK = "moeut_hf_route_mc"


def _task_yaml(data: Path) -> str:
    return f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def route(tmp_path_factory):
    """(run dir, export dir, tokenizer, task dir): a tiny MoEUT checkpoint with a byte-fallback
    tokenizer trained on generated sentences and the items' text, and its export."""
    root = tmp_path_factory.mktemp("hf_lm_eval")
    items = [json.loads(l) for l in ITEMS.read_text().splitlines()]
    texts = generated_texts(500) + [f"Question: {d['question']}\nAnswer: {c}" for d in items for c in d["choices"]] * 3
    tok = train_tokenizer(texts, vocab_size=384, byte_fallback=True)
    torch.manual_seed(0)
    cfg = get_preset("tiny", vocab_size=tok.vocab_size)
    save_checkpoint(root / "run" / "checkpoints", 9, build_model(cfg), cfg, tokenizer=tok)
    out = Path(export(str(root / "run"), str(root / "export")))
    (root / "tasks").mkdir()
    (root / "tasks" / "task.yaml").write_text(_task_yaml(ITEMS))
    return root / "run", out, tok, root / "tasks"


def _go_offline(monkeypatch, cache: Path):
    """No network: hub and datasets offline, datasets' cache in `cache` (set here, whatever the shell says)."""
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache, raising=False)
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    _go_offline(monkeypatch, tmp_path / "hf_cache")


COMMON = dict(tasks=[TASK], log_samples=True, bootstrap_iters=0, batch_size=1, device="cpu")


@pytest.fixture(scope="module")
def adapter_eval(route, tmp_path_factory):
    """(lm-eval TaskManager of the local task, lm-eval's results for our adapter `moeut` on the
    source checkpoint): the reference both the in-process and the command-line hf route are held
    to, computed once (a TaskManager indexes all of lm-eval's tasks: seconds of CPU)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    run, _, _, tasks = route
    with pytest.MonkeyPatch.context() as mp:
        _go_offline(mp, tmp_path_factory.mktemp("hf_cache"))
        # this module's task and the package's offline moeut_* tasks (their `limit` items each)
        tm = TaskManager(include_path=[str(tasks), str(TASK_DIR)], metadata={"limit": 4})
        ours = simple_evaluate(model="moeut", model_args=f"checkpoint={run}", task_manager=tm, **COMMON)
    return tm, ours


def _per_item(res):
    """[(acc, [loglikelihood of each choice])] by doc_id."""
    out = []
    for s in sorted(res["samples"][TASK], key=lambda s: s["doc_id"]):
        out.append((s["acc"], [float(r[0]) for r in s["filtered_resps"]]))
    return out


def test_lm_eval_hf_model_scores_the_export_as_our_adapter(route, adapter_eval, offline):
    from lm_eval import simple_evaluate
    run, out, tok, tasks = route
    items = [json.loads(l) for l in ITEMS.read_text().splitlines()]
    # Same requests for both: lm-eval encodes context + continuation jointly and splits, the adapter
    # encodes them separately (SPEC 6.1); for these items both give the same ids (checked here).
    for d in items:
        ctx = f"Question: {d['question']}\nAnswer:"
        for c in d["choices"]:
            assert tok.encode(ctx + " " + c) == tok.encode(ctx) + tok.encode(" " + c), (ctx, c)
    tm, ours = adapter_eval
    hf = simple_evaluate(model="hf", model_args=f"pretrained={out},trust_remote_code=True,dtype=float32",
                         task_manager=tm, **COMMON)
    a, b = _per_item(hf), _per_item(ours)
    assert len(a) == len(b) == 12
    assert [x[0] for x in a] == [x[0] for x in b]  # the same choice on every item
    for (_, la), (_, lb) in zip(a, b):  # the same log-likelihoods (lm-eval: fp32 log-softmax; ours: fp64)
        assert la == pytest.approx(lb, abs=2e-5)
    assert hf["results"][TASK]["acc,none"] == ours["results"][TASK]["acc,none"]


def test_lm_eval_hf_model_on_the_offline_moeut_tasks(route, adapter_eval, offline):
    """docs/evaluation.md's offline hf route: lm-eval's `hf` model on the export, on the carried
    `moeut_arc_easy` and `moeut_piqa` tasks (4 items each), gives the adapter's log-likelihoods and
    choices (their joint and separate encodings agree on these items, checked)."""
    from lm_eval import simple_evaluate
    run, out, tok, _ = route
    tm, _ = adapter_eval
    names = ["moeut_arc_easy", "moeut_piqa"]
    kw = dict(COMMON, tasks=names)
    hf = simple_evaluate(model="hf", model_args=f"pretrained={out},trust_remote_code=True,dtype=float32",
                         task_manager=tm, **kw)
    ours = simple_evaluate(model="moeut", model_args=f"checkpoint={run}", task_manager=tm, **kw)
    for name in names:
        a = sorted(hf["samples"][name], key=lambda s: s["doc_id"])
        b = sorted(ours["samples"][name], key=lambda s: s["doc_id"])
        assert len(a) == len(b) == 4
        for sa, sb in zip(a, b):
            for ctx, cont in sb["arguments"]:
                assert tok.encode(ctx + cont) == tok.encode(ctx) + tok.encode(cont), (ctx, cont)
            assert sa["acc"] == sb["acc"]
            assert [float(r[0]) for r in sa["filtered_resps"]] == pytest.approx(
                [float(r[0]) for r in sb["filtered_resps"]], rel=1e-6, abs=2e-5)  # lm-eval: fp32 log-softmax
        assert hf["results"][name]["acc,none"] == ours["results"][name]["acc,none"]


def test_lm_eval_hf_generate_until_equals_our_adapter(route, offline):
    """lm-eval's HFLM greedy generation on the export (its stop string: the EOS piece, which it
    decodes) equals the adapter's on the checkpoint."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    run, out, tok, _ = route
    hf = HFLM(pretrained=str(out), trust_remote_code=True, device="cpu", batch_size=1, dtype="float32")
    assert hf.eot_token_id == hf.tokenizer.eos_token_id and tok.sp.is_control(hf.eot_token_id)
    assert hf.tok_decode(hf.eot_token_id, skip_special_tokens=False) == "</s>"
    ours = MoEUTHarnessLM(checkpoint=str(run), device="cpu")
    reqs = [Instance(request_type="generate_until", doc={}, idx=i,
                     arguments=(f"Question: {q}\nAnswer:", {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}))
            for i, q in enumerate(["What do cows give?", "If x = 2, what is x + 1?", "Which one is an animal?"])]
    got = hf.generate_until(reqs)
    assert got == ours.generate_until(reqs)
    assert all(isinstance(g, str) for g in got)


def test_pyproject_eval_extra_installs_the_hf_route():
    """`pip install .[eval]` brings what lm-eval's hf model imports (accelerate) and lm-eval itself."""
    import tomllib
    extras = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for extra in ("eval", "dev"):
        names = {r.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip() for r in extras[extra]}
        assert {"accelerate", "lm-eval", "transformers"} <= names, extra


@pytest.mark.slow
def test_lm_eval_cli_hf_route_as_documented(route, adapter_eval, tmp_path, offline):
    """docs/evaluation.md's command, `lm-eval run --model hf --model_args pretrained=<export>,
    trust_remote_code=True,dtype=float32 --tasks ... --device cpu`, in a subprocess (offline, a
    local task via --include_path): its accuracy equals the adapter's on the same items."""
    import shutil
    import subprocess
    run, out, tok, tasks = route
    exe = shutil.which("lm-eval") or shutil.which("lm_eval")
    if exe is None:
        pytest.skip("lm-eval's command is not on PATH")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "c"), PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    p = subprocess.run([exe, "run", "--model", "hf", "--model_args",
                        f"pretrained={out},trust_remote_code=True,dtype=float32", "--tasks", TASK,
                        "--include_path", str(tasks), "--device", "cpu", "--batch_size", "1",
                        "--output_path", str(tmp_path / "res")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(next((tmp_path / "res").rglob("results_*.json")).read_text())
    ref = adapter_eval[1]  # the adapter on the checkpoint, the same items (shared with the test above)
    assert res["results"][TASK]["acc,none"] == ref["results"][TASK]["acc,none"]


def test_byte_fallback_export_tokenizer_encodes_as_the_native_one(route):
    """The export of a byte-fallback tokenizer (the default job's kind; needs nothing outside the
    checkout): the edge strings of tests/unit/eval/test_hf_export.py, arbitrary unicode included, encode to the
    native ids, never to <unk>, and decode back as the native decode does."""
    from transformers import AutoTokenizer
    from test_hf_export import _edge_strings
    _, out, tok, _ = route
    auto = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    for t in _edge_strings(tok.sp):
        ids = tok.encode(t)
        assert auto(t).input_ids == ids and auto.encode(t) == ids, repr(t)
        assert tok.sp.unk_id() not in ids, repr(t)
        assert auto.decode(ids) == tok.decode(ids), repr(t)
