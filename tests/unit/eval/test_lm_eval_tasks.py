"""The offline lm-eval tasks `moeut_*` (moeut/eval/lm_eval_tasks): lm-eval, through our adapter,
scores exactly the items `python -m moeut.evaluate` scores, with the same log-likelihood per option,
and its `acc` equals our accuracy with length normalisation off; the harness_cli wrapper adds the
task directory and says in `--help` what it adds, and its help's example runs as written."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from eval_fakes import generated_texts  # noqa: E402
from moeut.checkpoint import save_checkpoint  # noqa: E402
from moeut.eval import EvalOptions, evaluate_model, get_task  # noqa: E402
from moeut.eval.harness import MoEUTHarnessLM  # noqa: E402
from moeut.eval.harness_cli import WRAPPER_HELP, wrapper_help, with_task_dir  # noqa: E402
from moeut.eval.lm_eval_tasks import TASK_DIR, TASKS, item_docs, task_dataset  # noqa: E402
from moeut.eval.tasks.base import CARRIED, carried_data_dir  # noqa: E402
from moeut.registry import build_model, get_preset  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
LIMIT = 4  # items per task (per paradigm for BLiMP: 268 pairs)


@pytest.fixture(scope="module")
def tok():
    """A byte-fallback tokenizer trained on generated sentences (every character of the task
    files encodes; nothing outside the checkout is needed)."""
    from moeut.data.tokenizer import train_tokenizer
    return train_tokenizer(generated_texts(400), vocab_size=384, byte_fallback=True)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return build_model(get_preset("tiny", vocab_size=tok.vocab_size)).eval()


def _offline(mp, cache: Path):
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        mp.setenv(k, "1")
    mp.setenv("HF_DATASETS_CACHE", str(cache))


@pytest.fixture(scope="module")
def lm_eval_results(model, tok, tmp_path_factory):
    """lm-eval's results (samples logged) for our adapter on the four moeut_* tasks, found through
    the task directory alone (offline), `limit` passed as lm-eval metadata."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp, tmp_path_factory.mktemp("hf_cache"))
        tm = TaskManager(include_path=str(TASK_DIR), metadata={"limit": LIMIT})
        lm = MoEUTHarnessLM(model=model, tokenizer=tok, device="cpu")
        return simple_evaluate(model=lm, tasks=sorted(TASKS), task_manager=tm, log_samples=True,
                               bootstrap_iters=0)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_scores_our_items_as_moeut_evaluate(name, lm_eval_results, model, tok):
    """Per item: lm-eval's requests are our (context, option) pairs, its log-likelihoods our
    unnormalised option scores, its acc our strict choice (no tie among these items); the task's
    acc is `moeut.evaluate`'s accuracy with length_normalize=false (for BLiMP the mean over
    paradigms, equal to the pooled mean: every paradigm has LIMIT pairs)."""
    ours_task = TASKS[name]
    ours = evaluate_model(model, tok, [ours_task], EvalOptions(limit=LIMIT, length_normalize=False, keep_items=True),
                          device="cpu", progress=False)[ours_task]
    items = get_task(ours_task).load(EvalOptions(limit=LIMIT))
    samples = sorted(lm_eval_results["samples"][name], key=lambda s: s["doc_id"])
    assert len(samples) == len(items) == len(ours["items"]) == ours["n_items"]
    if ours_task == "blimp":
        assert len(items) == 67 * LIMIT
    else:
        assert len(items) == LIMIT
    for s, it, mine in zip(samples, items, ours["items"]):
        assert [tuple(a) for a in s["arguments"]] == [(it.context, o) for o in it.options]
        assert s["target"] == it.gold == mine["gold"]
        ll = [float(r[0]) for r in s["filtered_resps"]]
        # fp32 forwards in other batches (lm-eval orders requests its own way): equal to ~1e-9 relative
        assert ll == pytest.approx(mine["scores"], rel=1e-7)
        assert len(set(mine["scores"])) == len(mine["scores"])  # no tie: lm-eval's first-option rule is moot
        assert s["acc"] == float(mine["correct"])
    assert lm_eval_results["results"][name]["acc,none"] == pytest.approx(ours["accuracy"], abs=1e-12)


def test_acc_norm_divides_by_characters(lm_eval_results):
    """lm-eval's acc_norm (what docs/evaluation.md says differs from ours): the argmax of the
    log-likelihood per character of the option, computed here from the logged samples."""
    for name in sorted(TASKS):
        for s in lm_eval_results["samples"][name]:
            opts = [a[1] for a in s["arguments"]]
            ll = [float(r[0]) for r in s["filtered_resps"]]
            per_char = [x / len(o) for x, o in zip(ll, opts)]
            assert s["acc_norm"] == float(per_char.index(max(per_char)) == s["target"])


def test_every_task_file_names_a_dataset_function():
    """Each YAML in the task directory is one entry of TASKS and its custom_dataset resolves (as
    lm-eval resolves it) to the function of that task; nothing else is in the directory."""
    from lm_eval.tasks._yaml_loader import load_yaml
    yamls = sorted(TASK_DIR.glob("*.yaml"))
    assert sorted(p.stem for p in yamls) == sorted(TASKS)
    for p in yamls:
        cfg = load_yaml(str(p), resolve_func=True)
        assert cfg["task"] == p.stem
        assert cfg["custom_dataset"].__name__ == TASKS[p.stem]
        assert cfg["target_delimiter"] == ""  # our options carry their own leading space
    assert sorted(p.name for p in TASK_DIR.iterdir() if p.name != "__pycache__") == \
        sorted(["__init__.py"] + [p.name for p in yamls])


def test_fresh_clone_reads_the_carried_subset(monkeypatch):
    """Without the full sets (MOEUT_SHARED elsewhere) the documents are the carried subset's, the
    first items of the file, and the dataset says so on stderr."""
    monkeypatch.setenv("MOEUT_SHARED", "/nonexistent")
    docs, origin = item_docs("arc_easy", limit=3)
    assert origin == {"data": CARRIED, "data_from": str(carried_data_dir())}
    first = json.loads((carried_data_dir() / "arc" / "ARC-Easy-Test.jsonl").read_text().splitlines()[0])
    q = first["question"]
    assert docs[0]["context"] == "Question: " + q["stem"] + "\nAnswer:"
    assert docs[0]["options"] == [" " + c["text"] for c in q["choices"]]
    assert q["choices"][docs[0]["gold"]]["label"] == first["answerKey"]


def test_dataset_limit_from_metadata(capsys, monkeypatch):
    """`--metadata '{"limit": N}'` arrives as an int or a string; anything else is a ValueError
    naming `limit`; lm-eval's own metadata keys are ignored."""
    monkeypatch.setenv("MOEUT_SHARED", "/nonexistent")
    d = task_dataset("piqa", limit="2", version=1.0)
    assert len(d["validation"]) == 2
    assert "moeut lm-eval task piqa: 2 items, carried subset" in capsys.readouterr().err
    for bad in ("two", "-1", 0):
        with pytest.raises(ValueError, match="moeut_piqa .*limit"):
            task_dataset("piqa", limit=bad)
    with pytest.raises(ValueError, match="moeut_piqa .*data_dir='/nonexistent/eval'.*valid.jsonl"):
        task_dataset("piqa", data_dir="/nonexistent/eval")
    d = task_dataset("piqa", data_dir=str(carried_data_dir()), limit=1)
    assert len(d["validation"]) == 1 and "1 items, carried subset" in capsys.readouterr().err


def test_with_task_dir():
    base = ["run", "--model", "moeut", "--model_args", "checkpoint=x", "--tasks", "moeut_piqa"]
    assert with_task_dir(base) == base + ["--include_path", str(TASK_DIR)]
    legacy = base[1:]  # lm-eval inserts `run` when the first argument is an option
    assert with_task_dir(legacy) == legacy + ["--include_path", str(TASK_DIR)]
    assert with_task_dir(["ls", "tasks"]) == ["ls", "tasks", "--include_path", str(TASK_DIR)]
    own = base + ["--include_path", "/my/tasks"]
    assert with_task_dir(own) == own
    assert with_task_dir(["run", "--help"]) == ["run", "--help"]


def test_help_names_what_the_wrapper_adds():
    """`python -m moeut.eval.harness_cli --help`: the wrapper's block (model args of the adapter's
    signature, the device default, the task directory and names, an example), then lm-eval's help."""
    import inspect
    p = subprocess.run([sys.executable, "-m", "moeut.eval.harness_cli", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout
    assert out.startswith(wrapper_help())
    assert "usage: lm-eval" in out[len(wrapper_help()):]
    block = " ".join(wrapper_help().split())
    params = [k for k in inspect.signature(MoEUTHarnessLM.__init__).parameters
              if k not in ("self", "model", "tokenizer", "unused")]
    for k in params:
        assert f"{k}=" in block, k
    for name in TASKS:
        assert name in block
    for words in ("--model moeut", "device default", "cuda:0", "--device auto", "else cpu",
                  f"--include_path {TASK_DIR}", "python -m moeut.eval.harness_cli run --model moeut"):
        assert words in block, words


@pytest.mark.slow
def test_help_example_runs_as_written(model, tok, tmp_path):
    """The example of `--help` (no --include_path, no --device) on a saved tiny checkpoint, its
    --limit made 3 and more of the named model args added: the moeut_* tasks are found, it runs
    offline on the device the wrapper picks, and its acc equals moeut.evaluate's with
    length_normalize=false. The same command with `--metadata` naming a data_dir without the task
    files: one error line, exit 1."""
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, model, model.config, tokenizer=tok)
    help_text = " ".join(WRAPPER_HELP.replace("\\\n", " ").split())  # the shell continuation joined
    example = re.search(r"example\s+(python -m .*?--limit \d+)", help_text).group(1)
    argv = example.replace("runs/<run>", str(tmp_path / "run")).split()
    argv[-1] = "3"
    k = argv.index("--model_args") + 1
    argv[k] += ",batch_size=2,dtype=fp32,pad_multiple=8,max_length=512"  # more of the named args: same scores
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "c"),
               PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, *argv[1:], "--output_path", str(tmp_path / "res")], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    if not torch.cuda.is_available():
        assert "no --device given; using cpu" in p.stderr
    assert "moeut lm-eval task arc_easy: " in p.stderr  # what it read (--limit is applied by lm-eval after)
    (res_file,) = (tmp_path / "res").rglob("results_*.json")
    res = json.loads(res_file.read_text())["results"]
    ours = evaluate_model(model, tok, ["arc_easy", "piqa"], EvalOptions(limit=3, length_normalize=False),
                          device="cpu", progress=False)
    assert res["moeut_arc_easy"]["acc,none"] == pytest.approx(ours["arc_easy"]["accuracy"])
    assert res["moeut_piqa"]["acc,none"] == pytest.approx(ours["piqa"]["accuracy"])
    # task files missing under --metadata data_dir: one line naming the task, the option and the file
    p = subprocess.run([sys.executable, *argv[1:], "--metadata", '{"data_dir": "/nonexistent/eval"}'], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert re.match(r"moeut\.eval\.harness_cli: error: moeut_(arc_easy|piqa) \(--metadata limit=None, "
                    r"data_dir='/nonexistent/eval'\): .*/nonexistent/eval/", p.stderr.strip().splitlines()[-1])
