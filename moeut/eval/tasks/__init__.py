"""Zero-shot tasks of the paper's table (SPEC 6.2), by name.

`TASKS` is the registry: one instance per task, collected here from the task modules (which
import only `base`, `hub` and `scoring`, never this package), so what exists does not depend on
import order. A new task: a module with a `Task` subclass (`load_local`, optionally `load_hub`,
`evaluate`), one entry in `TASKS`, and its column in `TABLE_TASKS` if the paper's table has one.
"""
from __future__ import annotations

from typing import Dict, List

from .arc import ARC
from .base import EvalOptions, Task, TaskDataMissing, TaskFormatError, default_data_dir
from .blimp import Blimp
from .cbt import CBT
from .hellaswag import HellaSwag
from .lambada import Lambada
from .perplexity import Perplexity
from .piqa import PIQA

TASKS: Dict[str, Task] = {t.name: t for t in (Lambada(), Blimp(), CBT(), HellaSwag(), PIQA(),
                                              ARC("ARC-Easy"), ARC("ARC-Challenge"),
                                              Perplexity())}
# The six tasks whose accuracies the paper's "Average" column averages (SPEC 6.3).
TABLE_TASKS = ("lambada", "blimp", "cbt", "hellaswag", "piqa", "arc_easy")
ALIASES = {"arc_e": "arc_easy", "arc_c": "arc_challenge", "arc-easy": "arc_easy",
           "arc-challenge": "arc_challenge", "lambada_openai": "lambada", "ppl": "perplexity"}


def get_task(name: str) -> Task:
    """The task registered as `name` (case-insensitive; ALIASES such as "arc_e" or "ppl" accepted).
    Raises ValueError naming `tasks` and the known task names."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise ValueError(f"tasks: unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[key]


def resolve_tasks(names) -> List[Task]:
    """Tasks for a list of names or a comma-separated string, in order, duplicates dropped.
    Raises ValueError for an empty list or an unknown name."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise ValueError(f"tasks: empty task list; known tasks: {sorted(TASKS)}")
    out, seen = [], set()
    for n in names:
        t = get_task(str(n))
        if t.name not in seen:
            seen.add(t.name)
            out.append(t)
    return out


__all__ = ["TASKS", "TABLE_TASKS", "EvalOptions", "Task", "TaskDataMissing", "TaskFormatError",
           "default_data_dir", "get_task", "resolve_tasks"]
