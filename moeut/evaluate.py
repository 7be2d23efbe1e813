"""Zero-shot evaluation entry point (SPEC 6): a typed tool (moeut.cli.typed_tool; options in
`EvaluateOptions`, `--help` generated from them).

    python -m moeut.evaluate checkpoint=runs/c4_moeut_44m tasks=[lambada,blimp,piqa] limit=100
    python -m moeut.evaluate checkpoint=runs/c4_moeut_44m tasks=[perplexity] perplexity.path=book.txt

A run that has nothing to work on fails (exit 1) with one line naming what is missing:
no `checkpoint=`, a checkpoint path that does not exist, a `data_dir=` that does not exist, or no
task finding its data (each task's file or option named). A task whose data alone is missing is
skipped: one warning line naming the task and its file or option, and "skipped" in the table.
One line before the table says which task files were scored (full sets, or the carried subsets
of data/eval with their item counts: not the paper's numbers).

Every option can be set on the command line (`data_dir=...`, `paths.cbt=/data/CBTest/data`,
`normalize_by_task.cbt=false`, `hellaswag_strip_brackets=true`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from .checkpoint import check_checkpoint_path
from .cli import DEVICE_HELP, PRECISIONS, REQUIRED, check_device_available, check_out_dir, option, typed_tool
from .eval.tasks import resolve_tasks
from .eval.tasks.base import EvalOptions
from .eval.zeroshot import evaluate_checkpoint

log = logging.getLogger(__name__)

PAPER_TASKS = ["lambada", "blimp", "cbt", "hellaswag", "piqa", "arc_easy", "arc_challenge"]


@dataclass
class PerplexityOptions:
    """`perplexity.*`: the text the `perplexity` task scores (perplexity and bits per byte)."""
    path: Optional[str] = option(None, help="a .txt (one document) / .jsonl (one per line, in `field`) / .gz of either")
    hub: Optional[str] = option(None, help="or a hub dataset id (e.g. wikitext), with hub_config and split")
    hub_config: Optional[str] = option(None, help="the hub dataset's config name")
    split: str = option("test", help="the hub dataset's split")
    field: str = option("text", help="the .jsonl / hub field holding the text")
    context_length: Optional[int] = option(None, help="window length in tokens; null = the run's data.seq_len "
                                           "(else 1024)", lo=1)
    stride: Optional[int] = option(None, help="new tokens per window, 1..context_length-1; null = context_length-1",
                                   lo=1)


@dataclass
class EvaluateOptions:
    """The options of `python -m moeut.evaluate` (`--help` is generated from them)."""
    checkpoint: str = option(REQUIRED, help="run dir (its newest valid checkpoint) or a checkpoints/step_XXXXXXX dir")
    tokenizer: Optional[str] = option(None, help="override the checkpoint's tokenizer.model (must match vocab_size)")
    tasks: List[str] = option(default_factory=lambda: list(PAPER_TASKS),
                              help="tasks: lambada, blimp, cbt, hellaswag, piqa, arc_easy, arc_challenge, perplexity")
    limit: Optional[int] = option(None, help="items per task (per paradigm for BLiMP, per type for CBT); null = all",
                                  lo=1)
    source: str = option("local", help="local: files; hf: download from the HF hub; auto: local, else the hub "
                         "when online", choices=["local", "hf", "auto"])
    data_dir: Optional[str] = option(None, help="folder of the task data (lambada/, blimp/, piqa/, ...); null = "
                                     "$MOEUT_SHARED/data/eval, else per task the carried subsets of data/eval")
    paths: Dict[str, str] = option(default_factory=dict, help="per-task file/folder overrides, e.g. "
                                   "paths.cbt=/data/CBTest/data")
    out_dir: Optional[str] = option(None, help="where results go; null = <run dir>/eval")
    dataset: Optional[str] = option(None, help="name for the table's dataset column; null = from the run's config")
    length_normalize: Optional[bool] = option(None, help="null = SPEC default per task; true/false forces it for "
                                              "every task")
    normalize_by_task: Dict[str, bool] = option(default_factory=dict, help="per-task override, e.g. "
                                                "normalize_by_task.cbt=false (the ivegner fork's unnormalised CBT)")
    hellaswag_strip_brackets: bool = option(False, help="false = the official regex quirk (parity); true = "
                                            "lm-eval's behaviour")
    perplexity: PerplexityOptions = dataclasses.field(default_factory=PerplexityOptions)
    keep_items: bool = option(False, help="store per-item scores in the results JSON")
    device: str = option("auto", help=DEVICE_HELP)
    dtype: str = option("auto", help="autocast precision; auto = bf16 on CUDA, fp32 on CPU", choices=["auto", *PRECISIONS])
    batch_size: int = option(16, help="sequences per batch (SPEC: 16 x a per-task multiplier)", lo=1)
    pad_multiple: int = option(1, help="pad each batch to a multiple of this many tokens (1 = its longest "
                               "sequence; the paper's code used 128: same scores, ~10x the work on BLiMP)", lo=1)
    progress: bool = option(True, help="progress bars (on a terminal; a line now and then in a log file)")


def check(o: EvaluateOptions) -> None:
    """The checks of `o` beyond ranges and choices, before any work: the device (spelling, and a GPU
    when it names cuda), out_dir can be a directory, the task names, the data_dir and checkpoint
    paths exist (a checkpoint file only inside a checkpoint). Raises ValueError / FileNotFoundError
    naming the option."""
    check_device_available(o.device, "device")
    check_out_dir(o.out_dir, "out_dir")
    if o.data_dir and o.source != "hf" and not os.path.isdir(o.data_dir):
        raise FileNotFoundError(f"data_dir={o.data_dir}: no such directory (it should hold the task "
                                "folders lambada/, blimp/, piqa/, ...; see docs/evaluation.md)")
    resolve_tasks(o.tasks)  # unknown task -> error listing the known ones
    if not os.path.exists(o.checkpoint):
        raise FileNotFoundError(f"checkpoint={o.checkpoint}: no such file or directory "
                                "(no valid checkpoint found; pass a run dir or a checkpoints/step_XXXXXXX dir)")
    check_checkpoint_path(o.checkpoint, "checkpoint")  # a file that is not inside a checkpoint


def run(o: EvaluateOptions) -> Dict[str, Any]:
    """Evaluate as `o` asks (moeut.eval.zeroshot.evaluate_checkpoint); returns its result dict
    (data_line, merged, files, ...). Raises ValueError / FileNotFoundError naming the option or
    file for bad input (check), before any work."""
    check(o)
    ppl = {k: v for k, v in dataclasses.asdict(o.perplexity).items() if v is not None}
    opts = EvalOptions(data_dir=o.data_dir or "", limit=o.limit, length_normalize=o.length_normalize,
                       normalize_by_task=dict(o.normalize_by_task),
                       hellaswag_strip_brackets=o.hellaswag_strip_brackets,
                       paths={k: str(v) for k, v in o.paths.items()}, keep_items=o.keep_items,
                       source=o.source, perplexity=ppl)
    return evaluate_checkpoint(o.checkpoint, list(o.tasks), opts, tokenizer_path=o.tokenizer, out_dir=o.out_dir,
                               device=o.device, batch_size=o.batch_size, pad_multiple=o.pad_multiple,
                               dtype=o.dtype, progress=o.progress, dataset=o.dataset)


def _main(o: EvaluateOptions) -> None:
    """`run`, then print the task-data line, the table (the skip reasons being warnings) and the
    written files; bad input (including a damaged run-dir file named file:line) is one line, exit 1."""
    from .cli import bad_input_exits
    with bad_input_exits("moeut.evaluate"):
        res = run(o)
    from .analysis.table import data_notes, row_from_results, to_markdown
    print(f"moeut.evaluate: {res['data_line']}")
    # the table as written, its notes without the skipped tasks (each was one warning line above)
    print(to_markdown([row_from_results(res["merged"])], data_notes([res["merged"]])), end="")
    for kind, path in res["files"].items():
        print(f"{kind}: {path}")


main = typed_tool(
    "moeut.evaluate", EvaluateOptions,
    summary="Zero-shot evaluation of a checkpoint (SPEC 6) on the paper's tasks, as the official code scores\n"
            "them; each run writes a new <run dir>/eval/results_step_XXXXXXX[.k].json (earlier evaluations\n"
            "are kept) and table_step_XXXXXXX.{md,csv,tex} (every evaluation of that checkpoint, merged per\n"
            "task). Without data_dir, a task whose full set is not in $MOEUT_SHARED/data/eval is scored on\n"
            "the small subset carried in data/eval (said on one line: not the paper's numbers). A task whose\n"
            "data is missing is skipped and reported. See docs/evaluation.md.",
    usage="python -m moeut.evaluate checkpoint=<run dir or checkpoint dir> [key=value ...]   (also moeut-evaluate)",
)(_main)


if __name__ == "__main__":
    main()
