"""HellaSwag validation (rowanz/hellaswag `hellaswag_val.jsonl`, 10042 items), SPEC 6.2.

Official JSONL: ctx = pre(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()),
ending = " " + pre(ending); 4-way, length-normalised by default.

`pre` follows the paper's code: strip, " [title]" -> ". ", a regex deletion, "  " -> " ".
Quirk kept for parity: the official regex is the raw string `\\\\[.*?\\\\]`, which matches a
literal backslash followed by one of `. * ? \\` — so bracket tags such as "[header]" or "[step]"
are NOT removed. `hellaswag_strip_brackets=True` uses lm-eval-harness's `\\[.*?\\]` instead.

Derived format (`hellaswag_val_full.txt[.bz2]`, the llama.cpp rendering, 6 lines per item:
context, gold label 0-3, four endings). Its context is already preprocessed the lm-eval way
(bracket tags removed) and is `activity_label + ": " + ctx` with ctx_b NOT capitalised; ctx_a and
ctx_b are not recoverable. It therefore cannot reproduce the official-regex quirk nor the
capitalisation: numbers from it are close to, not exactly, the paper's. The loader warns.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Dict, List

from ..scoring import MCItem, evaluate_multiple_choice
from .base import (EvalOptions, Task, TaskDataMissing, TaskFormatError, check_limit, expect_str,
                   first_existing, iter_text_lines, read_jsonl)
from .hub import load_records, need_fields

_OFFICIAL_RE = re.compile(r"\\[.*?\\]")  # the paper code's raw-string regex (see module docstring)
_LMEVAL_RE = re.compile(r"\[.*?\]")


def preprocess(text: str, strip_brackets: bool = False) -> str:
    """SPEC 6.2 `pre`: strip, " [title]" -> ". ", the official regex deletion (or lm-eval's
    bracket-tag deletion if `strip_brackets`), "  " -> " "."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = (_LMEVAL_RE if strip_brackets else _OFFICIAL_RE).sub("", text)
    text = text.replace("  ", " ")
    return text


def items_from_jsonl(path: Path, limit, strip_brackets: bool) -> List[MCItem]:
    """4-way MCItems from the official `hellaswag_val.jsonl` (SPEC 6.2 input construction);
    TaskFormatError naming file:line for a bad field, TaskDataMissing for a missing file."""
    items = []
    for lineno, rec in read_jsonl(path, ["activity_label", "ctx_a", "ctx_b", "endings", "label"], limit):
        label_s = expect_str(rec, "activity_label", path, lineno)
        ctx_a = expect_str(rec, "ctx_a", path, lineno)
        ctx_b = expect_str(rec, "ctx_b", path, lineno)
        endings = rec["endings"]
        if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
            raise TaskFormatError(f"{path}:{lineno}: 'endings' must be a list of 4 strings")
        try:
            gold = int(rec["label"])
        except (TypeError, ValueError):
            raise TaskFormatError(f"{path}:{lineno}: 'label' must be 0-3, got {rec['label']!r}") from None
        if not 0 <= gold < 4:
            raise TaskFormatError(f"{path}:{lineno}: 'label' must be 0-3, got {gold}")
        ctx = preprocess(label_s + ": " + ctx_a + " " + ctx_b.capitalize(), strip_brackets)
        items.append(MCItem(context=ctx, options=[" " + preprocess(e, strip_brackets) for e in endings],
                            gold=gold, group="hellaswag", id=rec.get("ind", lineno)))
    return items


def items_from_text(path: Path, limit, strip_brackets: bool) -> List[MCItem]:
    """4-way MCItems from the derived 6-lines-per-item text format (see the module docstring: not
    exact paper parity); TaskFormatError naming file:line for a bad or incomplete item."""
    items: List[MCItem] = []
    block: List[tuple] = []
    for lineno, line in iter_text_lines(path):
        block.append((lineno, line))
        if len(block) < 6:
            continue
        (l0, ctx), (l1, lab), *ends = block
        block = []
        if not ctx.strip():
            raise TaskFormatError(f"{path}:{l0}: empty context line (items are 6 lines: context, label, 4 endings)")
        if lab.strip() not in ("0", "1", "2", "3"):
            raise TaskFormatError(f"{path}:{l1}: expected a gold label 0-3, got {lab[:40]!r} "
                                  "(items are 6 lines: context, label, 4 endings)")
        items.append(MCItem(context=preprocess(ctx, strip_brackets),
                            options=[" " + preprocess(e, strip_brackets) for _, e in ends],
                            gold=int(lab), group="hellaswag", id=l0))
        if limit is not None and len(items) >= limit:
            return items
    if block and any(line.strip() for _, line in block):
        raise TaskFormatError(f"{path}:{block[0][0]}: incomplete item at end of file "
                              f"({len(block)} of 6 lines)")
    return items


def hellaswag_items(records, strip_brackets: bool) -> List[MCItem]:
    """HellaSwag hub records ({activity_label, ctx_a, ctx_b, endings, label}) -> the same MCItems
    as `items_from_jsonl`; TaskFormatError naming the record for a bad one."""
    out = []
    for i, r in enumerate(records):
        where = f"hellaswag hub record {i}"
        need_fields(r, ["activity_label", "ctx_a", "ctx_b", "endings", "label"], where)
        if len(r["endings"]) != 4 or str(r["label"]) not in ("0", "1", "2", "3"):
            raise TaskFormatError(f"{where}: needs 4 endings and a label 0-3")
        ctx = preprocess(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize(), strip_brackets)
        out.append(MCItem(ctx, [" " + preprocess(e, strip_brackets) for e in r["endings"]], int(r["label"]),
                          "hellaswag", r.get("ind", i)))
    return out


class HellaSwag(Task):
    """HellaSwag validation, 4-way multiple choice, length-normalised by default (SPEC 6.2)."""

    name = "hellaswag"
    column = "HellaSwag"
    normalize_default = True

    def load_local(self, opts: EvalOptions) -> List[MCItem]:
        """Items from `hellaswag_val.jsonl`, else the derived `hellaswag_val_full.txt[.bz2]` (with a
        warning); TaskDataMissing if neither exists."""
        root = opts.root / "hellaswag"
        override = opts.paths.get(self.name)
        path = Path(override) if override else first_existing([
            root / "hellaswag_val.jsonl", root / "hellaswag_val_full.txt.bz2", root / "hellaswag_val_full.txt"])
        if path is None or not path.is_file():
            raise TaskDataMissing(f"no HellaSwag file: looked for {override or root / 'hellaswag_val.jsonl'} "
                                  "and hellaswag_val_full.txt[.bz2]")
        limit = check_limit(opts.limit)
        if path.name.endswith(".jsonl"):
            return items_from_jsonl(path, limit, opts.hellaswag_strip_brackets)
        warnings.warn(f"HellaSwag: using the derived text format {path.name}: bracket tags are already "
                      "removed and ctx_b is not capitalised, so this is not exact paper parity "
                      "(use the official hellaswag_val.jsonl for that)")
        return items_from_text(path, limit, opts.hellaswag_strip_brackets)

    def load_hub(self, opts: EvalOptions) -> List[MCItem]:
        """Items from the hub copy (`hub.HF_SOURCES["hellaswag"]`), the first `limit` records."""
        limit = check_limit(opts.limit)
        return hellaswag_items(load_records(self.name, None, limit), opts.hellaswag_strip_brackets)

    def evaluate(self, items, scorer, tokenizer, opts: EvalOptions) -> Dict[str, Any]:
        """Multiple-choice metrics (SPEC 6.1); `accuracy` = `group_average` (one group)."""
        m = evaluate_multiple_choice(items, scorer, tokenizer, normalize=opts.normalize(self.name, self.normalize_default),
                                     desc="hellaswag", keep_items=opts.keep_items)
        m["accuracy"] = m["group_average"]
        return m
