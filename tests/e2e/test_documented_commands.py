"""Every shell command in README.md and docs/*.md (not docs/SPEC.md) is classified here, and the
ones that can run on CPU run as written, from a working directory laid out like a fresh clone.

Extraction: each non-comment line of a ```bash block (backslash continuations joined, trailing
`# comments` dropped, a `for ...; do` ... `done` loop joined into one command), each line of an
indented (4-space) code block that starts with python/moeut-/torchrun/sbatch/srun/bash, plus inline
`python -m moeut...`, `python train.py ...`, `python tools/...`, `moeut-...` commands in backticks
that are commands rather than a tool's name (`moeut-train`, `python -m moeut.evaluate` or
`python -m moeut.analysis summary` alone) or
a synopsis (no `...`, ` [optional]`, ` | `, or placeholder other than `<run>`). Whitespace is collapsed.

REGISTRY classifies every extracted command once (a command in several docs shares one entry):
  ("run", extra)      run by test_documented_command_runs as written, with `extra` (size-reducing
                      overrides only) appended; `<run>`, `runs/<run>`, `runs/x`, `runs/c4_...` are
                      substituted with the run dir that the README's `python train.py` made;
  ("covered", node)   run (the same command, its paths made temporary) by the named test;
  ("skip", reason)    needs a GPU, SLURM, the hub, a corpus not in the clone, or hours of CPU.
A command in the docs but not in REGISTRY fails (new docs must be classified), and so does a
REGISTRY entry that is no longer in any doc (stale).
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md"] + sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "SPEC.md")
INLINE_START = re.compile(r"`((?:python -m moeut|python train\.py|python tools/|moeut-)[^`]*)`")


def _norm(cmd: str) -> str:
    return " ".join(cmd.split())


def _strip_comment(line: str) -> str:
    """Drop a trailing shell comment: `#` at the start or after whitespace, outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def extract(text: str) -> list:
    """The shell commands of one markdown text, in order, each normalised to one line."""
    cmds = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S):
        loop = None
        for line in block.replace("\\\n", " ").splitlines():
            line = _norm(_strip_comment(line))
            if not line:
                continue
            if loop is not None:
                loop.append(line)
                if line == "done":
                    cmds.append("; ".join(loop).replace("do;", "do"))
                    loop = None
                continue
            if line.startswith("for ") and line.endswith("do"):
                loop = [line]
                continue
            cmds.append(line)
        assert loop is None, f"unterminated for loop in a bash block: {loop}"
    # indented (4-space) code lines outside the fences that start with a command
    unfenced = re.sub(r"```.*?```", "", text, flags=re.S)
    for m in re.finditer(r"^ {4,}((?:python|moeut-|torchrun|sbatch|srun|bash) (?:[^\n]*\\\n)*[^\n]*)$",
                         unfenced, flags=re.M):
        cmds.append(_norm(_strip_comment(m.group(1).replace("\\\n", " "))))
    for m in INLINE_START.finditer(text):
        cmd = _norm(m.group(1))
        synopsis = ("..." in cmd or " [" in cmd or " | " in cmd
                    or re.search(r"<(?!run>)[^>]*>", cmd) is not None)
        words = cmd.split()
        bare_tool = len(words) == (3 if words[:2] == ["python", "-m"] else 1)  # a tool's name in the text
        bare_tool |= words[:3] == ["python", "-m", "moeut.analysis"] and len(words) == 4  # a subcommand's name
        if not bare_tool and not synopsis:
            cmds.append(cmd)
    return cmds


def documented() -> dict:
    """{command: [doc file names]} over README.md and docs/*.md."""
    found = {}
    for doc in DOCS:
        for cmd in extract(doc.read_text()):
            where = found.setdefault(cmd, [])
            if doc.name not in where:
                where.append(doc.name)
    return found


SMALL_TRAIN = "train.steps=3 optim.warmup=1 data.valid_tokens=512"
SMALL_ANALYZE = "max_tokens=1024"
GPU = "GPU only (device=cuda / kernels compiled for a GPU); tests/e2e/test_gpu_suite.py holds the GPU checks"
SLURM = "submits to a SLURM cluster (sbatch/srun/submitit); tests/e2e/test_sweeps.py::test_submitit_preset_with_fake_slurm"
C4 = "needs a local C4 mirror at /data/c4 (not in the clone)"
SUITE = "a pytest invocation: the suite (or part of it) itself, which CI runs"
CPU_RESULT = "the CPU result recipe: hours of CPU training on the Gutenberg corpus from ../shared (not in the clone)"
MUTATION = ("a mutation pass: minutes to hours of test runs per mutant (tools/mutation.py; "
            "tests/unit/tools/test_mutation.py tests the driver)")
HUB = ("lm-eval's tasks load their data from the Hugging Face hub; tests/unit/eval/test_harness.py and "
       "tests/e2e/test_hf_lm_eval.py run the adapter and the export under lm-eval offline")
LM_EVAL_SMALL = "--limit 2"  # lm-eval's: the first 2 documents of each task
CONSOLE = ("the console script installed by `pip install` (not on PATH in a clone); the same entry as "
           "`python train.py`, mapping checked by tests/e2e/test_cli_help.py::test_every_package_tool_has_a_console_script")

REGISTRY = {
    # README.md
    'pip install torch==2.13.0': ("skip", "pip install: needs the package index"),
    'pip install -e ".[dev]"': ("skip", "pip install: needs the package index"),
    'pip install .': ("skip", "pip install: needs the package index"),
    'pip install torch==2.13.0 && pip install -e ".[dev]"': ("skip", "pip install: needs the package index"),
    'python train.py': ("run", SMALL_TRAIN),  # also the module fixture: the run dir the others use
    'moeut-train': ("skip", CONSOLE),
    'python -m pytest -q': ("skip", SUITE),
    'python -m moeut.sweep --help': ("covered", "tests/e2e/test_cli_help.py::test_help_lists_every_option"),
    'python train.py --help': ("covered", "tests/e2e/test_cli_help.py::test_help_lists_every_option"),
    'python -m moeut.evaluate --help': ("covered", "tests/unit/tools/test_tool_commands.py::test_help_lists_every_schema_option"),
    'python train.py --cfg job': ("covered", "tests/e2e/test_cli_help.py::test_help_lists_every_option"),
    'python -m moeut.eval.harness_cli run --model moeut --model_args checkpoint=runs/<run> --tasks moeut_arc_easy,moeut_piqa':
        ("run", LM_EVAL_SMALL),
    'python -m moeut.hf.export checkpoint=runs/<run> out=exports/<run>': ("run", ""),
    'python -m moeut.analysis routing checkpoint=runs/<run>': ("run", SMALL_ANALYZE),
    'python -m moeut.tools.footprint preset=moeut_44m dtype=bf16': ("run", ""),
    # docs/analysis.md
    'python -m moeut.analysis routing checkpoint=runs/c4_moeut_244m': ("run", SMALL_ANALYZE),
    'python -m moeut.analysis routing checkpoint=runs/x/checkpoints/step_0100000 max_tokens=null device=cuda precision=bf16':
        ("skip", GPU),
    'python -m moeut.analysis routing checkpoint=runs/x reuse_stats=true figures.dpi=200': ("run", ""),
    'python -m moeut.analysis routing checkpoint=runs/x execute_notebooks=true': ("run", SMALL_ANALYZE),
    'python -m moeut.analysis routing --help': ("covered", "tests/e2e/test_cli_help.py::test_help_lists_every_option"),
    'python -m moeut.analysis routing checkpoint=runs/x reuse_stats=true execute_notebooks=true':
        ("covered", "tests/e2e/test_notebooks.py::test_documented_notebook_commands_run"),
    'MOEUT_RUN_DIR=runs/x jupytext --execute --to ipynb -o runs/x/analysis/expert_usage.ipynb analysis/expert_usage.py':
        ("covered", "tests/e2e/test_notebooks.py::test_documented_notebook_commands_run"),
    'MOEUT_RUN_DIR=runs/x jupyter lab analysis/expert_usage.ipynb': ("skip", "starts an interactive JupyterLab server"),
    'jupytext --sync analysis/*.ipynb':
        ("skip", "rewrites the repository's notebooks; tests/e2e/test_notebooks.py checks the notebook sources"),
    # docs/architecture.md, docs/baselines.md
    'python train.py experiment=c4_switch_44m': ("skip", "the paper's C4 from the hub (data=c4): " + C4),
    'python train.py experiment=cpu_tiny model.preset=cpu_sut model.vocab_size=512': ("run", ""),
    'python -m moeut.analysis compare runs=[runs/c4_moeut_44m,runs/c4_dense_44m,runs/c4_switch_44m] out=compare_44m':
        ("run", ""),  # the three placeholders become the one fixture run
    "python -m moeut.analysis compare 'runs=[runs/*]' out=compare measure=true device=cuda dtype=bf16 batch_size=64":
        ("skip", GPU),
    'python -m moeut.analysis compare --help': ("covered", "tests/e2e/test_cli_help.py::test_help_lists_every_option"),
    'python -m moeut.analysis compare runs=[runs/A,runs/B] out=cmp':
        ("covered", "tests/unit/train/test_rundir.py::test_cli_compare_plot_table_end_to_end"),
    'python tools/import_graph.py': ("run", ""),
    'python -m moeut.analysis routing --cfg job checkpoint=runs/x': ("run", ""),
    # docs/evaluation.md
    'python -m moeut.evaluate checkpoint=runs/c4_moeut_44m': ("run", "limit=2"),
    'python -m moeut.evaluate checkpoint=runs/c4_moeut_44m/checkpoints/step_0100000 tasks=[lambada,blimp,piqa] limit=100':
        ("run", "limit=2"),
    'python -m moeut.evaluate checkpoint=runs/x +paths.cbt=/data/CBTest/data '
    '+paths.arc_challenge=/data/ARC-V1-Feb2018-2/ARC-Challenge/ARC-Challenge-Test.jsonl +normalize_by_task.cbt=false':
        ("skip", "needs the CBT and ARC-Challenge corpora under /data (licensed, not in the clone)"),
    'python -m moeut.evaluate checkpoint=runs/x tasks=[perplexity,piqa] perplexity.path=book.txt '
    'perplexity.context_length=1024 perplexity.stride=512': ("run", "limit=2"),
    "python -m moeut.analysis table 'results=[runs/*/*]' out=paper_table": ("run", ""),
    'python -m moeut.evaluate checkpoint=<run>': ("run", "limit=2"),
    'python -m moeut.eval.harness_cli run --model moeut --model_args checkpoint=runs/c4_moeut_44m '
    '--tasks moeut_arc_easy,moeut_piqa,moeut_hellaswag,moeut_blimp': ("run", LM_EVAL_SMALL),
    'python -m moeut.eval.harness_cli run --model moeut --model_args checkpoint=runs/c4_moeut_44m,batch_size=32 '
    '--tasks lambada_openai,piqa,arc_easy,hellaswag,blimp': ("skip", HUB),
    'pip install -e ".[eval]"': ("skip", "pip install: needs the package index"),
    'python -m moeut.eval.harness_cli --help':
        ("covered", "tests/unit/eval/test_lm_eval_tasks.py::test_help_names_what_the_wrapper_adds"),
    'python -m moeut.hf.export checkpoint=runs/c4_moeut_44m out=exports/c4_moeut_44m': ("run", ""),
    'python -m moeut.hf.export checkpoint=runs/c4_moeut_44m out=exports/c4_moeut_44m_bf16 dtype=bf16': ("run", ""),
    'lm-eval run --model hf --model_args pretrained=exports/c4_moeut_44m,trust_remote_code=True,dtype=float32 '
    '--include_path moeut/eval/lm_eval_tasks --tasks moeut_arc_easy,moeut_piqa --device cpu': ("run", LM_EVAL_SMALL),
    'lm-eval run --model hf --model_args pretrained=exports/c4_moeut_44m,trust_remote_code=True,dtype=float32 '
    '--tasks piqa,arc_easy --device cpu': ("skip", HUB),
    # docs/kernels.md
    'python -m moeut.tools.footprint preset=[golden_tiny,golden_small_g3] dtype=fp32 batch=2 seq_len=64 '
    'steps=[train,eval,decode]': ("run", ""),
    'python -m moeut.tools.footprint preset=moeut_44m dtype=bf16 aot=90':
        ("skip", "AOT-compiles every kernel for sm_90 (minutes); tests/unit/kernels/test_cvmm_triton_aot.py (slow) covers it"),
    'python -m moeut.tools.warmup preset=moeut_44m dtype=bf16': ("skip", GPU),
    'python -m moeut.tools.warmup preset=moeut_244m dtype=bf16 batch=16 seq_len=1024 decode=false': ("skip", GPU),
    'python -m pytest tests/unit/kernels/test_cvmm_triton.py tests/unit/kernels/test_cvmm_triton_footprint.py tests/unit/kernels/test_compile.py -q':
        ("skip", SUITE),
    'python -m pytest -m "not triton and not slow" -q': ("skip", SUITE),
    'python -m pytest tests/unit/kernels/test_cvmm_triton_aot.py -q': ("skip", SUITE),
    'python -m pytest -m gpu tests/': ("skip", SUITE),
    'bash benchmarks/gpu_suite.sh': ("skip", GPU),
    # docs/results.md
    'python train.py experiment=cpu_result_moeut train.seed=0 hydra.run.dir=runs/results/moeut_s0': ("skip", CPU_RESULT),
    'TOK=runs/results/moeut_s0/tokenizer.model': ("skip", CPU_RESULT),
    'python train.py experiment=cpu_result_dense_params train.seed=0 hydra.run.dir=runs/results/dense_params_s0 '
    'data.tokenizer_path=$TOK': ("skip", CPU_RESULT),
    'python train.py experiment=cpu_result_dense_macs train.seed=0 hydra.run.dir=runs/results/dense_macs_s0 '
    'data.tokenizer_path=$TOK': ("skip", CPU_RESULT),
    'for r in moeut dense_params dense_macs; do python -m moeut.evaluate checkpoint=runs/results/${r}_s0 '
    'tasks=[lambada,blimp,hellaswag,piqa,arc_easy] limit=200 pad_multiple=8 batch_size=64 dataset=Gutenberg; done':
        ("skip", CPU_RESULT),
    'python -m moeut.analysis routing checkpoint=runs/results/moeut_s0 data.path=../shared/data/text/gutenberg/valid.jsonl.gz '
    'seq_len=256 batch_size=16 max_tokens=131072': ("skip", CPU_RESULT),
    'python -m moeut.analysis routing checkpoint=runs/results/moeut_s0 data.path=../shared/data/text/gutenberg/valid.jsonl.gz '
    'seq_len=256 max_tokens=131072': ("skip", CPU_RESULT),
    'python -m moeut.analysis curves runs=[runs/results/moeut_s0,runs/results/dense_params_s0,runs/results/dense_macs_s0] '
    '\'labels=[MoEUT,"dense (param-matched)","dense (MAC-matched)"]\' out=docs/figures/cpu_results_curves':
        ("skip", CPU_RESULT),
    'python -m moeut.analysis compare runs=[runs/results/moeut_s0,runs/results/dense_params_s0,'
    'runs/results/dense_macs_s0] measure=true device=cpu batch_size=16 seq_len=256 out=runs/results/compare':
        ("skip", CPU_RESULT),
    'python -m moeut.analysis cpu-result root=docs/results_runs out=/tmp/cpu_result':
        ("covered", "tests/unit/analysis/test_cpu_result.py::test_results_page_is_the_report_of_its_run_logs"),
    'python -m moeut.sweep action=dry-run sweep=cpu_result': ("run", ""),
    'python -m moeut.sweep action=launch sweep=cpu_result local=true': ("skip", CPU_RESULT),
    'python -m moeut.analysis collapse lr=1e-3 steps=150 split_every=10 out=DIR '
    '"compare=\'docs/results_runs/experiment=cpu_result_moeut,optim.lr=0.001/metrics.jsonl\'"': ("skip", CPU_RESULT),
    'python -m moeut.analysis collapse lr=2e-3 steps=150 split_every=10 out=DIR '
    '"compare=\'docs/results_runs/experiment=cpu_result_moeut,train.steps=610/metrics.jsonl\'"': ("skip", CPU_RESULT),
    'python -m moeut.analysis collapse "runs=[DIR/collapse_lr0.001_s0.npz,DIR/collapse_lr0.002_s0.npz]" out=docs/figures':
        ("skip", CPU_RESULT),
    'python -m moeut.sweep action=dry-run sweep=lr_stability local=true': ("run", ""),
    'python -m moeut.sweep action=launch sweep=lr_stability local=true root=/work/runs/lr_stability workers=2': ("skip", CPU_RESULT),
    'python -m moeut.analysis lr-sweep "early=[\'docs/results_runs/experiment=cpu_result_moeut,optim.lr=0.001\','
    '\'docs/results_runs/experiment=cpu_result_moeut,train.steps=610\',\'docs/results_runs/experiment=cpu_result_moeut,'
    'optim.lr=0.004\',\'docs/results_runs/experiment=cpu_result_dense_params,train.steps=610\','
    '\'docs/results_runs/experiment=cpu_result_dense_params,optim.lr=0.004\',docs/results_runs/screens]" '
    '"early_steps=[40,60,100]"':
        ("covered", "tests/unit/analysis/test_lr_sweep.py::test_results_page_screens_table_is_the_documented_commands_output"),
    'python -m moeut.analysis lr-sweep dir=/work/runs/lr_stability/lr_stability': ("skip", CPU_RESULT),
    # docs/sweeps.md
    'python -m moeut.sweep': ("run", ""),
    'python -m moeut.sweep action=dry-run sweep=g_ablation': ("run", ""),
    'python -m moeut.sweep action=launch sweep=g_ablation '
    '\'set=["hydra.launcher.partition=gpu","hydra.launcher.account=myproj"]\'': ("skip", SLURM),
    'python -m moeut.sweep action=launch sweep=cpu_smoke local=true root=/tmp/sweeps':
        ("covered", "tests/e2e/test_sweeps.py::test_local_multirun_two_tiny_jobs_and_summary"),
    'python -m moeut.analysis summary dir=outputs/sweeps/g_ablation': ("run", ""),
    'python train.py -m experiment=c4_moeut_44m,c4_dense_44m hydra/launcher=submitit_slurm_1gpu '
    'hydra.sweep.dir=outputs/sweeps/mine \'hydra.sweep.subdir=${hydra.job.override_dirname}\' '
    '\'hydra.job.config.override_dirname.exclude_keys=[seed,logger.group]\'': ("skip", SLURM),
    'sbatch sweeps/slurm/train.sbatch experiment=c4_moeut_244m': ("skip", SLURM),
    'sbatch --nodes=4 --partition=gpu --account=myproj --time=48:00:00 '
    '--export=ALL,MOEUT_RUN_DIR=runs/c4_moeut_1040m sweeps/slurm/train.sbatch experiment=c4_moeut_1040m':
        ("skip", SLURM),
    # docs/testing.md
    'python tools/mutation.py --check':
        ("covered", "tests/unit/tools/test_mutation.py::test_every_listed_mutant_applies_exactly_once"),
    'python tools/mutation.py': ("skip", MUTATION),
    'python tools/mutation.py --sample 3 --seed "$(date +%j)" --time-budget 240 --timeout 240 --out "$(mktemp -d)"':
        ("skip", MUTATION + "; .ci/run runs this sample"),
    'python tools/mutation.py --only sampler-epoch-seed': ("skip", MUTATION),
    'python tools/mutation.py --file moeut/eval/scoring.py': ("skip", MUTATION),
    'python tools/mutation.py --sample 5 --seed 3 --time-budget 300': ("skip", MUTATION),
    'python tools/mutation.py --without tests/unit/data/test_sampler_epochs.py': ("skip", MUTATION),
    'python tools/mutation.py --merge a/report.json b/report.json':
        ("covered", "tests/unit/tools/test_mutation.py::test_merge_combines_partial_runs_later_file_wins"),
    # docs/analysis.md "Beyond the paper" (tests/unit/analysis/test_expert_tools.py checks the numbers)
    'python train.py train.save_interval=25 train.keep_every=25':
        ("skip", "the default CPU training (minutes); tests/unit/analysis/test_expert_tools.py checks train.keep_every"),
    'python -m moeut.analysis sources checkpoint=runs/x': ("run", "max_tokens=256"),
    'python -m moeut.analysis dynamics checkpoint=runs/x': ("run", "max_tokens=256"),
    'python -m moeut.analysis knockout checkpoint=runs/x': ("run", "max_tokens=256 max_experts=8 kinds=[mlp]"),
    'python -m moeut.analysis depth checkpoint=runs/x': ("run", "max_tokens=256"),
    "python -m moeut.analysis sources checkpoint=runs/x 'sources=[books:data/books/valid.jsonl.gz,c4:data/c4_sample/valid.jsonl.gz]'":
        ("run", "max_tokens=256"),
    "python -m moeut.analysis knockout checkpoint=runs/x scope=unique max_experts=20 'groups=[mlp/0/3+17]'":
        ("run", "max_tokens=256"),
    # docs/training.md
    'python train.py experiment=c4_moeut_44m data.path=/data/c4': ("skip", C4),
    'torchrun --standalone --nproc_per_node=8 train.py experiment=c4_moeut_1040m train.parallel=fsdp '
    'train.activation_checkpointing=true hydra.run.dir=runs/moeut1040': ("skip", "8-GPU torchrun; " + C4),
    'python train.py -m': ("skip", "a flag named in the text (Hydra multirun), not a command on its own"),
    'python train.py experiment=c4_moeut_244m model.ff_k=8': ("skip", "the paper's C4 from the hub (data=c4): " + C4),
    'torchrun --standalone --nproc_per_node=8 train.py experiment=c4_moeut_244m hydra.run.dir=runs/moeut244':
        ("skip", "8-GPU torchrun"),
    'srun python train.py experiment=c4_moeut_244m hydra.run.dir=runs/moeut244': ("skip", SLURM),
    'python -m moeut.prepare_data experiment=c4_moeut_244m data.path=/data/c4': ("skip", C4),
    'python -m moeut.prepare_data experiment=c4_moeut_244m data.path=/data/c4 prepare.workers=32': ("skip", C4),
    'python -m moeut.prepare_data experiment=c4_moeut_244m data.path=/data/c4 prepare.check=true': ("skip", C4),
    'torchrun --standalone --nproc_per_node=8 train.py experiment=c4_moeut_244m data.path=/data/c4':
        ("skip", "8-GPU torchrun; " + C4),
    'python train.py experiment=c4_moeut_44m train.zeroshot.interval=10000 \'train.zeroshot.tasks=[lambada,blimp,piqa]\' '
    'train.zeroshot.limit=1000': ("skip", "the paper's C4 from the hub (data=c4): " + C4),
    'python train.py train.profile.start=20 train.profile.end=22':  # the same options at steps 2-3 of 4
        ("covered", "tests/e2e/test_train_extras.py::test_profile_covers_exactly_the_asked_steps"),
    'python -m pytest tests/unit/train/test_schedule.py tests/unit/data/test_data.py tests/unit/model/test_configs.py tests/unit/train/test_train_setup.py '
    'tests/e2e/test_train.py -q': ("skip", SUITE),
}

# The run dir placeholders the docs use for "a run you trained".
RUN_PLACEHOLDER = r"(?:runs/(?:<run>|x|c4_\w+)|<run>)"  # runs/<run>, runs/x, runs/c4_moeut_44m, ...


def test_every_documented_command_is_classified():
    unclassified = [f"{', '.join(where)}: {cmd}" for cmd, where in documented().items() if cmd not in REGISTRY]
    assert not unclassified, ("documented commands missing from REGISTRY in tests/e2e/test_documented_commands.py "
                              "(classify each as run / covered / skip):\n" + "\n".join(unclassified))


def test_no_stale_registry_entries():
    found = documented()
    stale = [cmd for cmd in REGISTRY if cmd not in found]
    assert not stale, "REGISTRY entries no longer in README.md or docs/*.md:\n" + "\n".join(stale)


def test_registry_entries_are_well_formed():
    for cmd, (kind, what) in REGISTRY.items():
        assert kind in ("run", "covered", "skip"), (cmd, kind)
        if kind == "skip":
            assert what, f"skip without a reason: {cmd}"


@pytest.mark.parametrize("node", sorted({w for k, w in REGISTRY.values() if k == "covered"}))
def test_covering_test_exists(node):
    """The named test exists as a test function in the named file (no collection needed)."""
    path, func = node.split("::")
    text = (REPO / path).read_text()
    assert re.search(rf"^def {re.escape(func)}\(", text, flags=re.M), f"{node} not found"


def test_extraction_rules():
    """The extractor joins continuations and loops, drops comments, keeps `<run>` commands and
    drops synopses, on a hand-written doc."""
    text = ("```bash\npython a.py x=1 \\\n   y='#2'    # note\n# only a comment\n"
            "for r in a b; do\n  echo $r\ndone\n```\n\n    python b.py \\\n      z=3   # indented\n\n"
            "Run `python -m moeut.analysis routing checkpoint=runs/<run>`, see `python -m moeut.evaluate [limit=N]`, "
            "`moeut-train`, `python train.py experiment=<name>` and `python -m moeut.prepare_data ...`.\n"
            "```python\nprint(1)\n```\n")
    assert extract(text) == ["python a.py x=1 y='#2'", "for r in a b; do echo $r; done", "python b.py z=3",
                             "python -m moeut.analysis routing checkpoint=runs/<run>"]


# ------------------------------------------------------------------------------------------
# Running the `run` commands
# ------------------------------------------------------------------------------------------

def _env():
    """A user's environment: the interpreter's bin first on PATH (`python`, `jupytext`), the
    checkout importable, and none of the offline switches or run-dir variables a test might set."""
    env = dict(os.environ)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "MOEUT_RUN_DIR",
                "MOEUT_ANALYSIS_DIR"):
        env.pop(key, None)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _sh(cmd: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A working directory laid out like the clone root (its files linked in, runs/ and outputs/
    real), where README's `python train.py` (with SMALL_TRAIN) has made runs/cpu_small/<time>."""
    cwd = tmp_path_factory.mktemp("clone")
    own_outputs = ("runs", "outputs", "exports", "multirun", "paper_table")  # what the commands write
    for entry in REPO.iterdir():
        if entry.name not in own_outputs and not entry.name.startswith("."):
            (cwd / entry.name).symlink_to(entry)
    r = _sh(f"python train.py {SMALL_TRAIN}", cwd)
    assert r.returncode == 0, f"README `python train.py` failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    runs = list((cwd / "runs" / "cpu_small").iterdir())
    assert len(runs) == 1 and list((runs[0] / "checkpoints").iterdir()), runs
    run = runs[0].relative_to(cwd).as_posix()
    # the documented inputs of the commands below: a book to score, a sweep dir to summarise
    (cwd / "book.txt").write_text(" ".join(["The quick brown fox jumps over the lazy dog."] * 300))
    shutil.copytree(cwd / run, cwd / "outputs" / "sweeps" / "g_ablation" / "cpu_small")
    return cwd, run


def _prepared(cmd: str, extra: str, run: str) -> str:
    """The command with the documented run dir (and its `checkpoints/step_...`) replaced by the
    fixture's, and the registry's size-reducing overrides appended."""
    cmd = re.sub(RUN_PLACEHOLDER + r"(?=[/\s,\]]|$)", run, cmd)
    cmd = re.sub(r"(?<=/checkpoints/)step_\d{7}", "step_0000003", cmd)  # SMALL_TRAIN's 3 steps
    return f"{cmd} {extra}".strip()


def _run_cases() -> list:
    """One case per distinct command after substitution (the README's `runs/<run>` and a doc's
    `runs/x` run once), in an order where a command that reads what another wrote (the stats,
    the evaluation results) comes after it; the id names every documented form."""
    cases = {}
    for cmd, (kind, extra) in REGISTRY.items():
        if kind == "run" and cmd != "python train.py":
            cases.setdefault(_prepared(cmd, extra, "RUN"), []).append(cmd)
    order = sorted(cases, key=lambda c: (c.startswith("python train.py experiment="),  # a second run last
                                         "reuse_stats" in c or "execute_notebooks" in c, "moeut.analysis table" in c,
                                         c.startswith("lm-eval ")))  # reads what the export commands wrote
    return [pytest.param(cases[c][0], id=" == ".join(cases[c])) for c in order]


@pytest.mark.slow
def test_readme_train_made_a_checkpoint(clone):
    cwd, run = clone
    assert (cwd / run / "metrics.jsonl").read_text().count("validation/val/perplexity") == 1


@pytest.mark.slow
@pytest.mark.parametrize("cmd", _run_cases())
def test_documented_command_runs(cmd, clone):
    """Exit 0 and no traceback; the cases share the clone, so run the module whole (the results
    table and the redraw read what the evaluate and analyze cases wrote)."""
    cwd, run = clone
    full = _prepared(cmd, REGISTRY[cmd][1], run)
    r = _sh(full, cwd)
    assert r.returncode == 0, f"documented command failed (exit {r.returncode}): {full}\n" \
                              f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert "Traceback (most recent call last)" not in r.stderr, f"{full}\n{r.stderr[-3000:]}"


def test_testing_doc_states_the_current_counts():
    """docs/testing.md's "Documented commands" counts are this registry's."""
    text = " ".join((REPO / "docs" / "testing.md").read_text().split())
    m = re.search(r"(\d+) distinct commands \((\d+) occurrences\) found; (\d+) run \((\d+) subprocesses"
                  r".*?(\d+) covered by named tests, (\d+) skipped", text)
    assert m, "docs/testing.md: the 'Documented commands' counts sentence is missing"
    found = documented()
    kinds = [k for k, _ in REGISTRY.values()]
    actual = (len(found), sum(len(w) for w in found.values()), kinds.count("run"), len(_run_cases()),
              kinds.count("covered"), kinds.count("skip"))
    assert tuple(int(g) for g in m.groups()) == actual, (
        "docs/testing.md 'Documented commands': (found, occurrences, run, subprocesses, covered, skipped) "
        f"should read {actual}")
