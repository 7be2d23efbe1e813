"""End to end: a tiny checkpoint evaluated on every task with limit=20 through the Hydra config
(moeut.evaluate.EvaluateOptions), producing the results JSON and the paper-layout table; bad inputs."""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeut.checkpoint import save_checkpoint
from moeut.registry import build_model, get_preset
from moeut.analysis.table import row_from_results, to_latex, to_markdown
from moeut.eval.tasks import get_task
from moeut.eval.tasks.base import EvalOptions

REPO = Path(__file__).resolve().parents[2]
from conftest import C4, EVAL  # noqa: E402  (EVAL: $MOEUT_SHARED/data/eval, not in the repository)
pytestmark = pytest.mark.skipif(not EVAL.is_dir(), reason=f"zero-shot sets missing: {EVAL} (set MOEUT_SHARED)")
CANDS = ["Tom", "cat", "dog", "fox", "hen", "pig", "cow", "owl", "bee", "ant"]


def write_cbt(d: Path):
    """CBT items written for this test in the documented 21-line format (no real CBT copy)."""
    d.mkdir()
    for t in ("CN", "NE", "P", "V"):
        text = ""
        for k, ans in enumerate(["fox", "ant", "Tom"]):
            story = [f"{i} The {CANDS[(i + k) % 10]} went to the market number {i} ." for i in range(1, 21)]
            text += "\n".join(story + [f"21 Then the XXXXX came home .\t{ans}\t\t{'|'.join(CANDS)}"]) + "\n\n"
        (d / f"cbtest_{t}_test_2500ex.txt").write_text(text)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_tokenizer):
    root = tmp_path_factory.mktemp("e2e")
    torch.manual_seed(0)
    cfg = get_preset("tiny", vocab_size=small_tokenizer.vocab_size)
    save_checkpoint(root / "run" / "checkpoints", 50, build_model(cfg), cfg, tokenizer=small_tokenizer)
    with open(root / "run" / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 25, "train/loss": 6.0}) + "\n")
        f.write(json.dumps({"step": 50, "validation/val/perplexity": 431.257}) + "\n")
    write_cbt(root / "cbt")
    # ARC-Challenge is not in shared/data: a stand-in file (ARC-Easy lines) exercises its path.
    (root / "ARC-Challenge-Test.jsonl").write_text(
        "".join((EVAL / "arc" / "ARC-Easy-Test.jsonl").read_text().splitlines(True)[100:130]))
    return root


def compose(overrides):
    """The checked options of `python -m moeut.evaluate <overrides>`."""
    from moeut.cli import typed_options
    from moeut.evaluate import EvaluateOptions
    return typed_options(EvaluateOptions, overrides, "moeut.evaluate")


def test_end_to_end_every_task_limit_20(run_dir, small_tokenizer):
    from moeut.evaluate import run
    # pad_multiple=16 (paper: 128) and bigger batches keep this CPU test cheap; results do not
    # depend on either (causal model, padded positions never read)
    cfg = compose([f"checkpoint={run_dir / 'run'}", "limit=20", "progress=false", "dataset=c4-sample",
                   "pad_multiple=16", "batch_size=64", f"data_dir={EVAL}",
                   f"+paths.cbt={run_dir / 'cbt'}", f"+paths.arc_challenge={run_dir / 'ARC-Challenge-Test.jsonl'}"])
    res = run(cfg)
    tasks = res["tasks"]
    assert set(tasks) == {"lambada", "blimp", "cbt", "hellaswag", "piqa", "arc_easy", "arc_challenge"}
    expect_n = {"lambada": 20, "blimp": 67 * 20, "cbt": 4 * 3, "hellaswag": 20, "piqa": 20, "arc_easy": 20,
                "arc_challenge": 20}
    for name, n in expect_n.items():
        assert tasks[name]["n_items"] == n, name
    assert tasks["blimp"]["n_groups"] == 67
    assert res["val_perplexity"] == pytest.approx(431.257) and res["step"] == 50

    # files: JSON in <run dir>/eval and the table in three formats
    out = run_dir / "run" / "eval"
    saved = json.loads((out / "results_step_0000050.json").read_text())
    assert saved["tasks"]["piqa"]["accuracy"] == tasks["piqa"]["accuracy"]
    md = (out / "table_step_0000050.md").read_text()
    rows = list(csv.DictReader(open(out / "table_step_0000050.csv")))
    assert len(rows) == 1 and rows[0]["val PPL"] == "431.26" and rows[0]["dataset"] == "c4-sample"
    six = [tasks[n]["accuracy"] for n in ("lambada", "blimp", "cbt", "hellaswag", "piqa", "arc_easy")]
    assert rows[0]["Average"] == f"{100 * sum(six) / 6:.1f}"
    assert rows[0]["PIQA"] == f"{100 * tasks['piqa']['accuracy']:.1f}" and rows[0]["model"] == "MoEUT"
    assert "| dataset | #params | model | val PPL | LAMBADA | BLiMP | CBT | HellaSwag | PIQA | ARC-E | Average |" in md
    assert r"\begin{tabular}" in (out / "table_step_0000050.tex").read_text()

    # every task's accuracy against an unbatched, unpadded reference: one forward per sequence
    from moeut.checkpoint import load_model
    model = load_model(run_dir / "run").model
    opts = EvalOptions(data_dir=str(EVAL), limit=20, paths={"cbt": str(run_dir / "cbt"),
                                        "arc_challenge": str(run_dir / "ARC-Challenge-Test.jsonl")})
    for name, normalize in (("piqa", True), ("arc_easy", True), ("arc_challenge", True), ("hellaswag", True),
                            ("cbt", True), ("blimp", False)):
        ref = naive_mc_accuracy(model, small_tokenizer, get_task(name).load(opts), normalize)
        assert tasks[name]["accuracy"] == pytest.approx(ref, abs=1e-12), name
    assert tasks["lambada"]["accuracy"] == pytest.approx(
        naive_lambada_accuracy(model, small_tokenizer, get_task("lambada").load(opts)), abs=1e-12)


def _logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)


def naive_mc_accuracy(model, tok, items, normalize):
    """Mean over groups of the per-group accuracy (a single group for PIQA/ARC/HellaSwag), each
    option scored alone: sum (or per-token mean) of log P(continuation | context), no BOS, ties wrong."""
    groups = {}
    for it in items:
        c = tok.encode(it.context) if it.context else []
        scores = []
        for opt in it.options:
            ids = c + tok.encode(opt)
            start = max(len(c), 1)
            lsm = _logprobs(model, ids)
            s = sum(float(lsm[p - 1, ids[p]]) for p in range(start, len(ids)))
            scores.append(s / (len(ids) - start) if normalize else s)
        ok = all(scores[it.gold] > s for j, s in enumerate(scores) if j != it.gold)
        groups.setdefault(it.group, []).append(ok)
    return sum(sum(v) / len(v) for v in groups.values()) / len(groups)


def naive_lambada_accuracy(model, tok, items):
    """The paper's rule, per passage: argmax predictions of the last len(word) positions,
    detokenised, last space-separated piece == the gold word."""
    n_ok = 0
    for it in items:
        ids = tok.encode(it["text"])
        word = it["text"].split(" ")[-1]
        with torch.no_grad():
            pred = model(torch.tensor([ids])).logits[0, :-1].argmax(-1).tolist()
        n_ok += tok.decode(pred[max(0, len(ids) - 1 - len(word)):]).split(" ")[-1] == word
    return n_ok / len(items)


def test_missing_cbt_gives_partial_average_marked(run_dir):
    from moeut.evaluate import run
    res = run(compose([f"checkpoint={run_dir / 'run' / 'checkpoints' / 'step_0000050'}", "limit=2",
                       "progress=false", "tasks=[piqa,cbt]", f"out_dir={run_dir / 'other'}",
                       f"data_dir={EVAL}"]))
    assert "no CBT test files" in res["tasks"]["cbt"]["skipped"]
    assert res["table_row"]["CBT"] == "skipped" and res["table_row"]["Average"].endswith("* (1/6)")
    assert (run_dir / "other" / "results_step_0000050.json").is_file()


def test_bad_inputs(run_dir, small_tokenizer, tmp_path):
    from moeut.evaluate import run
    with pytest.raises(ValueError, match=r"unknown task 'mmlu'; known tasks: \['arc_challenge'"):
        run(compose([f"checkpoint={run_dir / 'run'}", "tasks=[piqa,mmlu]"]))
    # architecture mismatch: the stored config says d_model=96 but the weights are d_model=64
    bad = tmp_path / "bad" / "checkpoints" / "step_0000001"
    shutil.copytree(run_dir / "run" / "checkpoints" / "step_0000050", bad)
    cfgj = json.loads((bad / "model_config.json").read_text())
    cfgj["d_model"] = 96
    (bad / "model_config.json").write_text(json.dumps(cfgj))
    with pytest.raises(ValueError, match="does not match the model architecture"):
        run(compose([f"checkpoint={bad}", "tasks=[piqa]", "limit=1", "progress=false"]))
    # vocabulary mismatch: a tokenizer of another size
    from moeut.data.tokenizer import train_tokenizer
    import gzip
    texts = [json.loads(l)["text"] for l in gzip.open(C4 / "train.jsonl.gz", "rt")][:100]
    other = train_tokenizer(texts, vocab_size=300)
    other.save(tmp_path / "other.model")
    with pytest.raises(ValueError, match="tokenizer has 300 pieces but the model's vocab_size is 512"):
        run(compose([f"checkpoint={run_dir / 'run'}", f"tokenizer={tmp_path / 'other.model'}", "tasks=[piqa]"]))
    with pytest.raises(FileNotFoundError, match=r"checkpoint=.*nothing: no such file"):
        run(compose([f"checkpoint={tmp_path / 'nothing'}", "tasks=[piqa]"]))


def test_command_line(run_dir):
    """The documented command, in a subprocess (Hydra main)."""
    out = subprocess.run([sys.executable, "-m", "moeut.evaluate", f"checkpoint={run_dir / 'run'}",
                          "tasks=[piqa,arc_easy]", "limit=3", "progress=false", f"out_dir={run_dir / 'cli'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| dataset | #params | model |" in out.stdout
    assert (run_dir / "cli" / "table_step_0000050.csv").is_file()


def test_table_formats_from_results_dict():
    res = {"dataset": "C4", "n_params": 44_345_792, "arch": "moeut", "val_perplexity": 18.3,
           "tasks": {"lambada": {"accuracy": 0.3012}, "blimp": {"accuracy": 0.782}, "cbt": {"accuracy": 0.85},
                     "hellaswag": {"accuracy": 0.291}, "piqa": {"accuracy": 0.6249}, "arc_easy": {"accuracy": 0.4}}}
    row = row_from_results(res)
    assert row == {"dataset": "C4", "#params": "44M", "model": "MoEUT", "val PPL": "18.30", "LAMBADA": "30.1",
                   "BLiMP": "78.2", "CBT": "85.0", "HellaSwag": "29.1", "PIQA": "62.5", "ARC-E": "40.0",
                   "Average": f"{100 * (0.3012 + 0.782 + 0.85 + 0.291 + 0.6249 + 0.4) / 6:.1f}"}
    assert row["Average"] == "54.2"  # (30.12+78.2+85+29.1+62.49+40)/6 = 54.15
    assert "C4 & 44M & MoEUT & 18.30 & 30.1" in to_latex([row])
    assert to_markdown([row]).count("\n") == 3
