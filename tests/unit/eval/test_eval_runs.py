"""`moeut.evaluate` runs that have nothing to do fail with a named error and write nothing;
`python -m moeut.analysis summary` on files written by `moeut.evaluate`; `dataset_name_of` on the config train.py
saves. Self-contained: the model, tokenizer and text are made here."""
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from eval_fakes import generated_texts, make_tiny_run
from moeut.eval.zeroshot import NoTaskData, dataset_name_of

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("runs"))


def compose(overrides):
    """The checked options of `python -m moeut.evaluate <overrides>`."""
    from moeut.cli import typed_options
    from moeut.evaluate import EvaluateOptions
    return typed_options(EvaluateOptions, overrides, "moeut.evaluate")


def test_missing_checkpoint_names_the_option(tmp_path):
    from moeut.evaluate import run
    with pytest.raises(ValueError, match=r"checkpoint: required: pass checkpoint="):
        run(compose(["tasks=[piqa]"]))
    with pytest.raises(FileNotFoundError, match=r"checkpoint=.*nothing: no such file or directory"):
        run(compose([f"checkpoint={tmp_path / 'nothing'}", "tasks=[piqa]"]))
    # a directory that exists but holds no checkpoint
    (tmp_path / "emptyrun").mkdir()
    with pytest.raises(FileNotFoundError, match="no valid checkpoint in .*checkpoint="):
        run(compose([f"checkpoint={tmp_path / 'emptyrun'}", "tasks=[perplexity]",
                     f"perplexity.path={__file__}"]))


def test_wrong_data_dir_fails_and_writes_nothing(tiny_run, tmp_path):
    from moeut.evaluate import run
    run_dir, _, _ = tiny_run
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"data_dir=.*/does_not_exist: no such directory"):
        run(compose([f"checkpoint={run_dir}", f"data_dir={tmp_path / 'does_not_exist'}", f"out_dir={out}"]))
    (tmp_path / "empty").mkdir()
    empty = tmp_path / "empty"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no per-task warning: the one error names each task once
        with pytest.raises(NoTaskData) as e:
            run(compose([f"checkpoint={run_dir}", f"data_dir={empty}", f"out_dir={out}",
                         "tasks=[lambada,blimp,piqa]"]))
    assert str(e.value) == (
        f"nothing was evaluated, no task found its data: lambada: file not found: {empty}/lambada/lambada_test.jsonl; "
        f"blimp: BLiMP directory not found: {empty}/blimp (expects the 67 <paradigm>.jsonl files); "
        f"piqa: PIQA needs {empty}/piqa/valid.jsonl and {empty}/piqa/valid-labels.lst")
    assert sorted(e.value.skipped) == ["blimp", "lambada", "piqa"]
    assert not out.exists()  # nothing written for a run that evaluated nothing
    # data present but empty: not an accuracy of nan, a task with no items
    (empty / "lambada").mkdir()
    (empty / "lambada" / "lambada_test.jsonl").write_text("\n")
    with pytest.raises(NoTaskData, match=r": lambada: its data holds no items \(empty file\?\) in "):
        run(compose([f"checkpoint={run_dir}", f"data_dir={empty}", f"out_dir={out}", "tasks=[lambada]"]))
    assert not out.exists()


def test_command_line_exit_codes(tiny_run, tmp_path):
    run_dir, _, _ = tiny_run
    (tmp_path / "empty").mkdir()
    for args, expect in (([], "checkpoint: required"),
                         ([f"checkpoint={run_dir}", f"data_dir={tmp_path / 'empty'}", "tasks=[piqa]"],
                          "no task found its data")):
        r = subprocess.run([sys.executable, "-m", "moeut.evaluate", *args, "progress=false"], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and expect in r.stderr, (args, r.returncode, r.stderr[-2000:])


def _evaluate(run_dir, tmp_path, extra=()):
    from moeut.evaluate import run
    text = tmp_path / "t.txt"
    text.write_text("\n".join(generated_texts(20, seed=7)))
    (tmp_path / "empty").mkdir(exist_ok=True)
    with pytest.warns(UserWarning, match="skipped, data missing"):
        return run(compose([f"checkpoint={run_dir}", "tasks=[perplexity,piqa,lambada]",
                            f"perplexity.path={text}", "perplexity.context_length=32",
                            f"data_dir={tmp_path / 'empty'}", "progress=false", *extra]))


def test_summary_reads_moeut_evaluate_files(tiny_run, tmp_path):
    """The columns summary makes from the files moeut.evaluate writes: one per task, named
    after it, with the results file's own numbers; no junk such as eval/.../options/batch_size."""
    from moeut.analysis import summary as summ
    run_dir, _, _ = tiny_run
    res = _evaluate(run_dir, tmp_path)
    row = summ.summarize_run(run_dir, run_dir.parent).row
    eval_cols = {k: v for k, v in row.items() if k.startswith(("eval", "lm_eval"))}
    assert eval_cols == {"eval_step": 50, "eval_limit": None,
                         "eval/piqa": "skipped", "eval/lambada": "skipped",
                         "eval/text_ppl": res["tasks"]["perplexity"]["perplexity"],
                         "eval/bits_per_byte": res["tasks"]["perplexity"]["bits_per_byte"]}
    md = summ.to_markdown([row])
    assert "eval/text_ppl" in md and "options" not in md
    # an lm-eval results file next to it: its own prefix, filter suffix and stderr dropped
    (run_dir / "eval" / "lm_eval_results.json").write_text(json.dumps(
        {"results": {"piqa": {"alias": "piqa", "acc,none": 0.61, "acc_stderr,none": 0.01}}, "config": {"x": 1}}))
    (run_dir / "eval" / "notes.json").write_text(json.dumps({"batch_size": 16}))
    with pytest.warns(UserWarning, match="notes.json: not a moeut.evaluate or lm-eval results file"):
        row = summ.summarize_run(run_dir, run_dir.parent).row
    assert row["lm_eval/piqa/acc"] == 0.61
    assert not [k for k in row if "stderr" in k or "batch_size" in k or "config" in k]


def test_dataset_name_from_the_config_train_writes(tmp_path):
    """config.yaml as train.py saves it in a checkpoint (the resolved Hydra config) for a hub
    corpus and for local files; and a run dir's .hydra/config.yaml (unresolved) as fallback."""
    from hydra import compose as hcompose, initialize_config_dir
    from omegaconf import OmegaConf
    import moeut.train_lib.config  # noqa: F401  (registers the ${moeut.repo:} resolver)
    for data, expect in (("c4", "C4"), ("slimpajama", "SlimPajama"), ("gutenberg", "gutenberg"),
                         ("c4_sample", "c4_sample")):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = hcompose(config_name="config", overrides=[f"data={data}"])
        ck = tmp_path / data / "checkpoints" / "step_0000001"
        ck.mkdir(parents=True)
        with open(ck / "config.yaml", "w") as f:  # as moeut/checkpoint.py (save_training_checkpoint) writes it
            # (the `name` key needs a live HydraConfig; the data section is what is read)
            raw = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "data", "train")}
            yaml.safe_dump(raw, f, sort_keys=False)
        assert dataset_name_of(str(ck)) == expect, data
        (ck / "config.yaml").unlink()
        (tmp_path / data / ".hydra").mkdir()
        (tmp_path / data / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        assert dataset_name_of(str(ck)) == expect, data
    assert dataset_name_of(str(tmp_path / "nothing")) is None


def test_analyze_and_compare_refuse_nothing_to_do(tiny_run, tmp_path):
    """moeut.analysis routing: a checkpoint path that does not exist, or no figure format, is a named
    error before any work; moeut.analysis compare: runs of which none logged the compared metric."""
    from moeut.analysis import compare as cmp
    from moeut.analysis.routing_command import RoutingOptions, run_analysis
    run_dir, _, _ = tiny_run
    with pytest.raises(FileNotFoundError, match=r"checkpoint=.*nothing: no such file or directory"):
        run_analysis(RoutingOptions(checkpoint=str(tmp_path / "nothing")))
    cfg = RoutingOptions(checkpoint=str(run_dir), out_dir=str(tmp_path / "an"))
    cfg.figures.formats = []
    with pytest.raises(ValueError, match=r"figures.formats: empty"):
        run_analysis(cfg)
    assert not (tmp_path / "an").exists()

    # the tiny run has a checkpoint but no metrics.jsonl: no validation perplexity anywhere
    with pytest.raises(ValueError, match=r"no run has a validation perplexity.*run/metrics.jsonl"):
        cmp.compare([str(run_dir)], str(tmp_path / "cmp"), seq_len=32, plot=False)
    with pytest.raises(ValueError, match=r"no run has a metric=piqa/accuracy"):
        cmp.compare([str(run_dir)], str(tmp_path / "cmp"), seq_len=32, plot=False, metric="piqa/accuracy")
    assert not (tmp_path / "cmp").exists()


def test_default_eval_data_dir_follows_moeut_shared(tmp_path, monkeypatch):
    """The zero-shot sets are not in the repository: their default place is $MOEUT_SHARED/data/eval
    (as the README says), else shared/ beside the checkout."""
    from moeut.eval.tasks.base import default_data_dir
    monkeypatch.setenv("MOEUT_SHARED", str(tmp_path / "elsewhere"))
    assert default_data_dir() == tmp_path / "elsewhere" / "data" / "eval"
    monkeypatch.delenv("MOEUT_SHARED")
    assert default_data_dir() == Path(__file__).resolve().parents[3].parent / "shared" / "data" / "eval"


def _cli(*args, env_extra=None):
    import os
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "moeut.evaluate", *args, "progress=false"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)


def test_cli_skipped_task_is_one_line(tiny_run, tmp_path):
    """Fresh-clone mode (no shared data): CBT, which nothing carries, is reported on exactly one
    stderr line naming the task, the folder looked in and the option; nowhere else in the output.
    The task-data line says PIQA was scored on the carried subset, with its item count."""
    run_dir, _, _ = tiny_run
    r = _cli(f"checkpoint={run_dir}", "tasks=[piqa,cbt]", "limit=4", f"out_dir={tmp_path / 'out'}",
             env_extra={"MOEUT_SHARED": "/nonexistent"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.splitlines() == [
        "moeut.evaluate: warning: cbt: skipped, data missing: no CBT test files (cbtest_{CN,NE,P,V}_test_2500ex.txt) "
        "in /nonexistent/data/eval/cbt; extract CBTest.tgz there or pass paths.cbt=<dir>"]
    assert "cbtest" not in r.stdout and "cbt:" not in r.stdout  # the CBT cell reads "skipped"; the reason: stderr
    assert ("moeut.evaluate: task data: piqa CARRIED SUBSET (4 items, limit=4); carried subsets (data/eval) are a "
            "few hundred items per task: not the paper's numbers") in r.stdout.splitlines()


def test_cli_perplexity_errors_name_file_and_option(tiny_run, tmp_path):
    """A missing, an empty and a non-UTF-8 perplexity.path: one stderr line each, naming the
    file and `perplexity.path`, and no hint about the zero-shot tasks' data; exit 1."""
    run_dir, _, _ = tiny_run
    empty, bad = tmp_path / "empty.txt", tmp_path / "latin1.txt"
    empty.write_text("\n \n")
    bad.write_bytes("first line\ncaf\u00e9 au lait\n".encode("latin-1"))
    cases = ((tmp_path / "nope.txt", "moeut.evaluate: error: NoTaskData: nothing was evaluated, no task found its data: "
                                     f"perplexity: perplexity.path={tmp_path / 'nope.txt'}: file not found"),
             (empty, "moeut.evaluate: error: NoTaskData: nothing was evaluated, no task found its data: "
                     f"perplexity: perplexity.path={empty}: no text in it (empty or blank)"),
             (bad, f"moeut.evaluate: error: TaskFormatError: perplexity.path: {bad}:2: not UTF-8 text (byte 0xe9 at column 4); "
                   "save the file as UTF-8"))
    for path, line in cases:
        r = _cli(f"checkpoint={run_dir}", "tasks=[perplexity]", f"perplexity.path={path}",
                 f"out_dir={tmp_path / 'out'}")
        assert r.returncode == 1 and r.stderr.splitlines() == [line], (path, r.stderr[-2000:])
        assert "data_dir" not in r.stderr and not (tmp_path / "out").exists()
