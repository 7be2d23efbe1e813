"""PIQA validation (ybisk.github.io piqa/data/valid.jsonl + valid-labels.lst, 1838 items), SPEC 6.2.

ctx = "Question: " + goal.strip() + "\\nAnswer:"; options " " + sol1, " " + sol2; length-normalised
by default. Labels: one line per item, 0 (= sol1) or 1 (= sol2).
"""
from __future__ import annotations

from typing import Any, Dict, List

from ..scoring import MCItem, evaluate_multiple_choice
from .base import (EvalOptions, Task, TaskDataMissing, TaskFormatError, check_limit, expect_str,
                   iter_text_lines, read_jsonl)
from .hub import load_records, piqa_items


class PIQA(Task):
    """PIQA validation, 2-way, length-normalised by default (SPEC 6.2)."""

    name = "piqa"
    column = "PIQA"
    normalize_default = True

    def load_local(self, opts: EvalOptions) -> List[MCItem]:
        """Items of `valid.jsonl` with gold labels from `valid-labels.lst`; TaskDataMissing if either
        file is absent, TaskFormatError naming file:line for a bad label or a count mismatch."""
        root = opts.path_for(self.name, opts.root / "piqa")
        data, labels_path = root / "valid.jsonl", root / "valid-labels.lst"
        if not data.is_file() or not labels_path.is_file():
            raise TaskDataMissing(f"PIQA needs {data} and {labels_path}")
        limit = check_limit(opts.limit)
        records = read_jsonl(data, ["goal", "sol1", "sol2"], limit)
        labels = []
        for lineno, line in iter_text_lines(labels_path):
            if line.strip() not in ("0", "1"):
                raise TaskFormatError(f"{labels_path}:{lineno}: expected 0 or 1, got {line[:40]!r}")
            labels.append(int(line))
            if limit is not None and len(labels) >= limit:
                break
        if limit is None:
            n_lines = sum(1 for _, line in iter_text_lines(data) if line.strip())
            if n_lines != len(labels):
                raise TaskFormatError(f"{labels_path}: {len(labels)} labels but {data} has {n_lines} items")
        elif len(labels) < len(records):
            raise TaskFormatError(f"{labels_path}: only {len(labels)} labels for {len(records)} items")
        items = []
        for (lineno, rec), gold in zip(records, labels):
            goal = expect_str(rec, "goal", data, lineno)
            sols = [expect_str(rec, k, data, lineno) for k in ("sol1", "sol2")]
            items.append(MCItem(context="Question: " + goal.strip() + "\nAnswer:",
                                options=[" " + s for s in sols], gold=gold, group="piqa", id=lineno))
        return items

    def load_hub(self, opts: EvalOptions) -> List[MCItem]:
        """Items from the hub copy (`hub.HF_SOURCES["piqa"]`), the first `limit` records."""
        return piqa_items(load_records(self.name, None, check_limit(opts.limit)))

    def evaluate(self, items, scorer, tokenizer, opts: EvalOptions) -> Dict[str, Any]:
        """Multiple-choice metrics (SPEC 6.1); `accuracy` = `group_average` (one group)."""
        m = evaluate_multiple_choice(items, scorer, tokenizer, normalize=opts.normalize(self.name, self.normalize_default),
                                     desc="piqa", keep_items=opts.keep_items)
        m["accuracy"] = m["group_average"]
        return m
