"""Offline lm-eval tasks over the package's own zero-shot items (SPEC 6.5): `moeut_arc_easy`,
`moeut_piqa`, `moeut_hellaswag`, `moeut_blimp`, defined by the YAML files in this directory
(`TASK_DIR`, passed to lm-eval as `--include_path`; `python -m moeut.eval.harness_cli` adds it).

Each YAML names one of the `custom_dataset` functions below, which build the documents from the
same loader as `python -m moeut.evaluate` (`moeut.eval.tasks`: the same files, the same lookup
rule, the same contexts and options), so lm-eval scores exactly the items our evaluator scores:
the full sets under `$MOEUT_SHARED/data/eval` when there, else the subsets carried in `data/eval`.
Nothing is downloaded. lm-eval's `--metadata` JSON passes `data_dir` (a directory laid out like
`data/eval`) and `limit` (items per task; per paradigm for BLiMP, as in `moeut.evaluate`).

A document is `{"context", "options", "gold", "group", "id"}`; the YAMLs score it as lm-eval's
`multiple_choice` with `target_delimiter: ""` (an option carries its own leading space, as in
our items; a BLiMP option is a whole sentence after an empty context). lm-eval's `acc` is then our
unnormalised choice (`length_normalize=false`) item by item, except ties, which lm-eval gives to
the first option; its `acc_norm` divides by the option's characters, not tokens (docs/evaluation.md).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

TASK_DIR = Path(__file__).resolve().parent

# lm-eval task name -> moeut.eval.tasks name
TASKS: Dict[str, str] = {"moeut_arc_easy": "arc_easy", "moeut_piqa": "piqa",
                         "moeut_hellaswag": "hellaswag", "moeut_blimp": "blimp"}

log = logging.getLogger(__name__)


def item_docs(task: str, data_dir: str = "", limit: Optional[int] = None) -> tuple:
    """(documents, origin) of a `moeut.eval.tasks` multiple-choice task: one dict per item with
    `context`, `options`, `gold`, `group`, `id` (str); origin as `Task.load_items` gives it (`data`,
    `data_from`). Raises ValueError for a bad `limit` or task, TaskDataMissing when no file is found."""
    from ..tasks import EvalOptions, get_task
    items, origin = get_task(task).load_items(EvalOptions(data_dir=data_dir or "", limit=limit))
    docs = [{"context": it.context, "options": list(it.options), "gold": int(it.gold),
             "group": str(it.group), "id": str(it.id)} for it in items]
    return docs, origin


def task_dataset(task: str, data_dir: str = "", limit: Any = None, **unused):
    """A `datasets.DatasetDict` with one split, `validation`, of `item_docs(task, ...)`; says on
    stderr which files it read (full sets or the carried subset). `limit` may be a string (lm-eval's
    `--metadata` JSON); other keys (lm-eval's own metadata, e.g. `version`) are ignored. Raises
    ValueError naming the task and `--metadata` `limit` or `data_dir` for a limit that is not a
    positive integer, task files that are missing or malformed."""
    import datasets
    where = f"moeut_{task} (--metadata limit={limit!r}, data_dir={data_dir!r})"
    if isinstance(limit, str):
        if not limit.strip().isdigit():
            raise ValueError(f"{where}: limit must be a positive integer")
        limit = int(limit)
    try:
        docs, origin = item_docs(task, str(data_dir or ""), limit)
    except (ValueError, FileNotFoundError) as err:  # a bad limit, missing or malformed task files
        raise ValueError(f"{where}: {err}") from None
    print(f"moeut lm-eval task {task}: {len(docs)} items, {origin['data']} ({origin['data_from']})",
          file=sys.stderr)
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(docs)})


def arc_easy(**kwargs) -> Any:
    """`custom_dataset` of `moeut_arc_easy`: ARC-Easy's 4-option questions (SPEC 6.2)."""
    return task_dataset("arc_easy", **kwargs)


def piqa(**kwargs) -> Any:
    """`custom_dataset` of `moeut_piqa`: PIQA validation with its labels file (SPEC 6.2)."""
    return task_dataset("piqa", **kwargs)


def hellaswag(**kwargs) -> Any:
    """`custom_dataset` of `moeut_hellaswag`: HellaSwag validation, preprocessed as ours (SPEC 6.2)."""
    return task_dataset("hellaswag", **kwargs)


def blimp(**kwargs) -> Any:
    """`custom_dataset` of `moeut_blimp`: BLiMP's pairs, `limit` per paradigm (SPEC 6.2)."""
    return task_dataset("blimp", **kwargs)


def task_names() -> List[str]:
    """The lm-eval task names defined in `TASK_DIR`, sorted."""
    return sorted(TASKS)
