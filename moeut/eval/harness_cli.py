"""`lm_eval` command line with the `moeut` model registered and the offline `moeut_*` tasks included:

    python -m moeut.eval.harness_cli run --model moeut --model_args checkpoint=runs/x \\
        --tasks moeut_arc_easy,moeut_piqa --limit 50

(lm-eval 0.4.13's CLI has sub-commands `run`, `ls`, `validate`; the arguments are lm_eval's own.)
Its CLI only knows models whose modules were imported; this wrapper imports the adapter first.

Why this tool is not a Hydra app like the package's other command-line tools (moeut.cli): it
is lm-eval's own command line, which users know from lm-eval's documentation, with sub-commands
and `--flag value` options that lm-eval parses and validates itself; a Hydra layer would have to
re-declare (and track, across lm-eval releases) every one of them. So argv goes to lm-eval
unchanged, except for the device default and the task directory below; `--help` is lm-eval's
own, after a short block (`WRAPPER_HELP`) naming what this wrapper adds.

Tasks: `run`, `ls` and `validate` get `--include_path <moeut/eval/lm_eval_tasks>` (the offline
tasks `moeut_arc_easy`, `moeut_piqa`, `moeut_hellaswag`, `moeut_blimp` over the package's own
zero-shot items; moeut.eval.lm_eval_tasks) unless the command names an `--include_path` itself,
which lm-eval takes as one directory: then the wrapper keeps the user's and says so on stderr.

Device: lm-eval's CLI defaults to `--device cuda:0`, which fails on a machine without CUDA. Unless
the command names a device (`--device ...` or `device=` in `--model_args`), or with `--device auto`,
this wrapper passes the one that exists: `cuda` when torch sees a GPU, else `cpu` (and says so).
A named device is spelt as everywhere in the package, `auto | cpu | cuda | cuda:N`; another
spelling, or a CUDA device on a machine without one, is one line `moeut.eval.harness_cli: error:
...` naming the option, exit 1, before lm-eval starts.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional

log = logging.getLogger(__name__)


WRAPPER_HELP = """\
moeut.eval.harness_cli: lm-evaluation-harness's command line (its help follows), plus:
  --model moeut   MoEUT / baseline checkpoints (moeut.eval.harness.MoEUTHarnessLM). Model args
                  (--model_args k=v,...): checkpoint=<run dir or checkpoints/step_XXXXXXX> (required),
                  tokenizer_path= (default: the checkpoint's), device=, batch_size= (16),
                  dtype= (auto | fp32 | bf16 | fp16; auto: bf16 autocast on CUDA, fp32 on CPU),
                  max_length= (1024 tokens), pad_multiple= (1), max_gen_toks= (256), progress= (false)
  device default  lm-eval's is cuda:0; with no --device (nor device= in --model_args), or with
                  --device auto, the wrapper passes cuda when torch sees a GPU, else cpu
  local tasks     {tasks}:
                  offline, the items `python -m moeut.evaluate` scores (the full sets in
                  $MOEUT_SHARED/data/eval, else the subsets carried in data/eval); lm-eval's acc is
                  our length_normalize=false choice; --metadata '{{"limit": N}}' = items per task
                  (per paradigm for BLiMP). run/ls/validate get --include_path {task_dir}
                  unless the command names its own
  example         python -m moeut.eval.harness_cli run --model moeut \\
                      --model_args checkpoint=runs/<run> --tasks moeut_arc_easy,moeut_piqa --limit 50
  more            docs/evaluation.md, section 2 (lm-evaluation-harness)
"""

TASK_SUBCOMMANDS = ("run", "ls", "validate")  # lm-eval's sub-commands that take --include_path


def wrapper_help() -> str:
    """The block `--help` prints before lm-eval's own help: what this wrapper adds."""
    from .lm_eval_tasks import TASK_DIR, task_names
    return WRAPPER_HELP.format(task_dir=TASK_DIR, tasks=", ".join(task_names()))


def wants_help(argv: List[str]) -> bool:
    """Whether lm-eval will print a help text for argv (`-h`/`--help` anywhere, or no arguments)."""
    return not argv or any(a in ("-h", "--help") for a in argv)


def with_task_dir(argv: List[str]) -> List[str]:
    """argv plus `--include_path <moeut.eval.lm_eval_tasks.TASK_DIR>` for lm-eval's `run`, `ls`
    and `validate` (also `run` implied by a first argument that is an option), unless argv names an
    `--include_path` itself: lm-eval takes one directory, so the user's stays and a note on stderr
    says the `moeut_*` tasks are not included."""
    if not argv or wants_help(argv):
        return argv
    sub = argv[0] if argv[0] in TASK_SUBCOMMANDS else ("run" if argv[0].startswith("-") and len(argv) > 1 else None)
    if sub is None:
        return argv
    from .lm_eval_tasks import TASK_DIR
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        print(f"moeut.eval.harness_cli: --include_path given: the moeut_* tasks of {TASK_DIR} are not "
              f"included (lm-eval takes one directory; copy their YAML files into yours to use both)",
              file=sys.stderr)
        return argv
    return argv + ["--include_path", str(TASK_DIR)]


def with_default_device(argv: List[str], cuda_available: Optional[bool] = None) -> List[str]:
    """argv plus `--device cuda|cpu` when it runs a model and names no device itself."""
    if "--model" not in argv and not any(a.startswith("--model=") for a in argv):
        return argv
    if _cli_device(argv) == "auto":  # `--device auto`: the default below, said so
        argv = _without_device_flag(argv)
    if any(a == "--device" or a.startswith("--device=") for a in argv):
        return argv
    for i, a in enumerate(argv):
        if a == "--model_args" and i + 1 < len(argv) and "device=" in argv[i + 1]:
            return argv
        if a.startswith("--model_args=") and "device=" in a:
            return argv
    if cuda_available is None:
        import torch
        cuda_available = torch.cuda.is_available()
    device = "cuda" if cuda_available else "cpu"
    print(f"moeut.eval.harness_cli: no --device given; using {device}", file=sys.stderr)
    return argv + ["--device", device]


def _cli_device(argv: List[str]) -> Optional[str]:
    """The value of the last `--device X` / `--device=X` of argv, or None."""
    found = None
    for i, a in enumerate(argv):
        if a == "--device" and i + 1 < len(argv):
            found = argv[i + 1]
        elif a.startswith("--device="):
            found = a.split("=", 1)[1]
    return found


def _without_device_flag(argv: List[str]) -> List[str]:
    """argv less its `--device X` / `--device=X` arguments."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a == "--device" and i + 1 < len(argv):
            skip = True
        elif not a.startswith("--device="):
            out.append(a)
    return out


def named_device(argv: List[str]) -> Optional[str]:
    """The device the command names (`--device X`, `--device=X`, or `device=X` in `--model_args`;
    the last one wins, as lm-eval passes --device after the model_args), or None."""
    found = None
    for i, a in enumerate(argv):
        args = argv[i + 1] if a == "--model_args" and i + 1 < len(argv) else (
            a.split("=", 1)[1] if a.startswith("--model_args=") else None)
        if args is not None:
            for kv in args.split(","):
                if kv.strip().startswith("device="):
                    found = kv.strip().split("=", 1)[1]
    return _cli_device(argv) or found


def check_device(argv: List[str], cuda_available: Optional[bool] = None) -> None:
    """Raise ValueError, naming the option, when the command names a device not spelt `auto | cpu |
    cuda | cuda:N`, or a CUDA device while torch sees no CUDA GPU (before lm-eval is imported and
    the model loaded)."""
    from ..cli import check_device as check_spelling

    device = named_device(argv)
    if device is not None:
        check_spelling(device, "--device")
    if device is None or not device.startswith("cuda"):
        return
    if cuda_available is None:
        import torch
        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        raise ValueError(f"--device {device}: torch sees no CUDA GPU on this machine; use --device cpu "
                         f"(or leave --device out: the wrapper then picks cpu)")


def main() -> None:
    """`python -m moeut.eval.harness_cli ...` (also the `moeut-lm-eval` script): register the
    "moeut" model with lm-eval, add the device default and the `moeut_*` task directory, and run
    lm-eval's CLI on sys.argv; `--help` prints `wrapper_help()` first.
    A CUDA device without a GPU, an error building the model from `--model_args` (e.g. a
    missing checkpoint) and a `moeut_*` task without its files (`--metadata` data_dir) or with a bad
    `--metadata` limit are one line `moeut.eval.harness_cli: error: ...`, exit 1. When stderr
    is not a terminal, lm-eval's progress bars are off (TQDM_DISABLE=1 unless set)."""
    from ..cli import INPUT_ERRORS, bad_input_exits, exit_bad_input, raised_in
    with bad_input_exits("moeut.eval.harness_cli"):  # also: no HF progress frames in a log file
        check_device(sys.argv[1:])
    if not sys.stderr.isatty():  # lm-eval's own tqdm bars would fill a log file with `\r` frames
        os.environ.setdefault("TQDM_DISABLE", "1")
    if wants_help(sys.argv[1:]):
        print(wrapper_help(), flush=True)
    from . import harness  # noqa: F401  (registers "moeut")
    from lm_eval.__main__ import cli_evaluate
    sys.argv = [sys.argv[0]] + with_task_dir(with_default_device(sys.argv[1:]))
    try:
        cli_evaluate()
    except INPUT_ERRORS as err:  # the model (--model_args) or a moeut_* task's data (--metadata): bad input
        if raised_in(err, "create_from_arg_string", "create_from_arg_obj", "task_dataset"):
            exit_bad_input("moeut.eval.harness_cli", err)
        raise


if __name__ == "__main__":
    main()
