"""Zero-shot evaluation (SPEC 6).

- `scoring`: the paper-parity engine (no BOS, strict >, float64, length-sorted batches padded to
  their longest sequence).
- `tasks`: LAMBADA, BLiMP, CBT, HellaSwag, PIQA, ARC-Easy/Challenge loaders and scoring rules, and
  `perplexity` (perplexity and bits per byte of any text).
- `zeroshot`: evaluate a model or a checkpoint, write results JSON and the table.
- `table`: the paper's results table (markdown, CSV, LaTeX).
- `harness`: lm-evaluation-harness adapter registered as "moeut" (imports lm_eval; not imported here).

Command line: `python -m moeut.evaluate checkpoint=<run dir> tasks=[...] limit=N` (docs/evaluation.md).
"""
from .scoring import MCItem, Scorer, ScoreRequest, ScoreResult, evaluate_multiple_choice, make_request
from .tasks import TASKS, TABLE_TASKS, EvalOptions, get_task, resolve_tasks
from .zeroshot import DEFAULT_TASKS, NoTaskData, evaluate_checkpoint, evaluate_model

__all__ = ["MCItem", "Scorer", "ScoreRequest", "ScoreResult", "evaluate_multiple_choice", "make_request",
           "TASKS", "TABLE_TASKS", "EvalOptions", "get_task", "resolve_tasks", "DEFAULT_TASKS",
           "evaluate_checkpoint", "evaluate_model", "NoTaskData"]
