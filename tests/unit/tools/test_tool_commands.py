"""The converted command lines as a user runs them (subprocesses in an empty working directory):
`--help` is generated from the schema and lists every option of it (walked from the dataclasses
here), and bad input is exactly one line `<tool>: error: <message naming the option>`, exit
status 1, nothing written."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_tool_options import _dotted_fields  # noqa: E402  (one copy: the options test's)

REPO = Path(__file__).resolve().parents[3]


def _run(argv, cwd):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(PYTHONPATH=str(REPO), WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)




def _schema(tool):
    if tool == "moeut.evaluate":
        from moeut.evaluate import EvaluateOptions as S
    elif tool == "moeut.sweep":
        from moeut.sweep import SweepOptions as S
    elif tool == "moeut.hf.export":
        from moeut.hf.export import HFExportOptions as S
    else:
        from moeut.prepare_data import PrepareOptions as S
        return _dotted_fields(S, "prepare.") + ["data.seq_len", "train.steps", "model.preset", "name"]
    return _dotted_fields(S)


@pytest.mark.parametrize("tool", ["moeut.evaluate", "moeut.sweep", "moeut.hf.export", "moeut.prepare_data"])
def test_help_lists_every_schema_option(tool):
    from test_cli_help import tool_output  # the one `--help` run of the tool (test_cli_help reads it too)
    r, left = tool_output(tool, "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    starts = {ln.split("=", 1)[0].strip() for ln in r.stdout.splitlines() if ln.startswith("  ") and "=" in ln}
    assert set(_schema(tool)) - starts == set(), r.stdout
    assert "Exit status: 0 done; 1 bad input" in r.stdout and "== Current config ==" not in r.stdout
    assert left == []


@pytest.mark.parametrize("argv, line", [
    (["-m", "moeut.evaluate", "checkpoint=x", "dtype=float32"],
     "moeut.evaluate: error: dtype: must be one of auto | fp32 | bf16 | fp16, got 'float32'"),
    (["-m", "moeut.evaluate", "checkpoint=x", "device=gpu"],
     "moeut.evaluate: error: device: must be auto | cpu | cuda | cuda:N, got 'gpu'"),
    (["-m", "moeut.evaluate", "checkpoint=x", "+limitt=3"],
     "moeut.evaluate: error: limitt: no such option (a '+' override adds a key that nothing reads; "
     "moeut.evaluate --help lists the options)"),
    (["-m", "moeut.hf.export", "checkpoint=x", "out=y", "dtype=bfloat16"],
     "moeut.hf.export: error: dtype: must be one of null | fp32 | bf16 | fp16, got 'bfloat16'"),
    (["-m", "moeut.hf.export", "checkpoint=nowhere", "out=y"],
     "moeut.hf.export: error: checkpoint=nowhere: no such file or directory (pass a run dir or a "
     "checkpoints/step_XXXXXXX dir)"),
    (["-m", "moeut.sweep", "action=go"],
     "moeut.sweep: error: action: must be one of list | dry-run | launch, got 'go'"),
    (["-m", "moeut.prepare_data", "prepare.workers=-1"],
     "moeut.prepare_data: error: prepare.workers: must be >= 0, got -1"),
    (["train.py", "train.device=gpu", "hydra.run.dir=run"],
     "train.py: error: train.device: must be auto | cpu | cuda | cuda:N, got 'gpu'"),
    (["-m", "moeut.eval.harness_cli", "run", "--model", "moeut", "--model_args", "checkpoint=x", "--tasks", "piqa",
      "--device", "mps"],
     "moeut.eval.harness_cli: error: --device: must be auto | cpu | cuda | cuda:N, got 'mps'"),
])
def test_bad_input_is_exactly_one_line_and_exit_1(argv, line, tmp_path):
    if argv[0].endswith(".py"):
        argv = [str(REPO / argv[0]), *argv[1:]]
    r = _run(argv, tmp_path)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert [ln for ln in r.stderr.splitlines() if ln.strip()] == [line]
    assert list(tmp_path.iterdir()) == []
