"""ARC-Easy / ARC-Challenge test sets (AI2 ARC-V1-Feb2018 `{ARC-Easy,ARC-Challenge}-Test.jsonl`),
SPEC 6.2.

ctx = "Question: " + stem + "\\nAnswer:"; options " " + choice text; length-normalised by default.
Only 4-option questions are kept; the others are skipped with a warning (the paper's code does
the same; the count after filtering is not stated in the paper). The paper's table reports
ARC-Easy only (`accuracy/ARC-Easy`); ARC-Challenge is computed but not in the table.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, List

from ..scoring import MCItem, evaluate_multiple_choice
from .base import (EvalOptions, Task, TaskDataMissing, TaskFormatError, check_limit, expect_str,
                   first_existing, read_jsonl)
from .hub import HF_SOURCES, arc_items, load_records


def load_arc_file(path: Path, group: str, limit) -> List[MCItem]:
    """4-option MCItems of an ARC `*-Test.jsonl` (SPEC 6.2), group = subset name; questions with
    another number of options are skipped with a warning; TaskFormatError naming file:line."""
    items, skipped = [], 0
    for lineno, rec in read_jsonl(path, ["question", "answerKey"]):
        q = rec["question"]
        if not isinstance(q, dict) or "stem" not in q or not isinstance(q.get("choices"), list):
            raise TaskFormatError(f"{path}:{lineno}: 'question' must be an object with 'stem' and 'choices'")
        stem = expect_str(q, "stem", path, lineno)
        choices = q["choices"]
        for c in choices:
            if not isinstance(c, dict) or not isinstance(c.get("text"), str) or "label" not in c:
                raise TaskFormatError(f"{path}:{lineno}: every choice needs 'text' and 'label'")
        labels = [str(c["label"]) for c in choices]
        key = str(rec["answerKey"])
        if key not in labels:
            raise TaskFormatError(f"{path}:{lineno}: answerKey {key!r} is not one of the labels {labels}")
        if len(choices) != 4:
            skipped += 1
            continue
        items.append(MCItem(context="Question: " + stem + "\nAnswer:",
                            options=[" " + c["text"] for c in choices], gold=labels.index(key), group=group,
                            id=rec.get("id", lineno)))
        if limit is not None and len(items) >= limit:
            break
    if skipped:
        warnings.warn(f"{group}: skipped {skipped} question(s) without exactly 4 options ({path})")
    return items


class ARC(Task):
    """ARC-Easy or ARC-Challenge (`subset`), 4-way, length-normalised by default (SPEC 6.2); only
    ARC-Easy is a column of the paper's table. AssertionError for another subset name."""

    normalize_default = True

    def __init__(self, subset: str):
        assert subset in ("ARC-Easy", "ARC-Challenge")
        self.subset = subset
        self.name = "arc_easy" if subset == "ARC-Easy" else "arc_challenge"
        self.column = "ARC-E" if subset == "ARC-Easy" else None

    def load_local(self, opts: EvalOptions) -> List[MCItem]:
        """Items of `<subset>-Test.jsonl` (looked up in the usual layouts); TaskDataMissing if absent."""
        override = opts.paths.get(self.name)
        fname = f"{self.subset}-Test.jsonl"
        root = opts.root / "arc"
        path = Path(override) if override else first_existing([
            root / fname, root / "ARC-V1-Feb2018-2" / self.subset / fname, root / self.subset / fname])
        if path is None or not path.is_file():
            raise TaskDataMissing(f"{self.subset}: file not found ({override or root / fname}); "
                                  f"pass paths.{self.name}=<path to {fname}>")
        return load_arc_file(path, self.subset, check_limit(opts.limit))

    def load_hub(self, opts: EvalOptions) -> List[MCItem]:
        """Items from the hub copy (`hub.HF_SOURCES[name]`); `limit` applies after the 4-option filter."""
        limit = check_limit(opts.limit)
        subset = HF_SOURCES[self.name][1][0]
        return arc_items(load_records(self.name, subset, None), subset)[:limit]

    def evaluate(self, items, scorer, tokenizer, opts: EvalOptions) -> Dict[str, Any]:
        """Multiple-choice metrics (SPEC 6.1); `accuracy` = `group_average` (one group)."""
        m = evaluate_multiple_choice(items, scorer, tokenizer, normalize=opts.normalize(self.name, self.normalize_default),
                                     desc=self.name, keep_items=opts.keep_items)
        m["accuracy"] = m["group_average"]
        return m
