"""Children's Book Test (Hill et al. 2016; HF `cbt` CBTest.tgz at revision
7503a0643517afe02a86e4750d375a9686008efa), SPEC 6.2. The four test files
`cbtest_{CN,NE,P,V}_test_2500ex.txt`.

File format (documented in the CBTest README): items of 21 numbered lines separated by a blank
line. Lines 1-20 are the story ("<n> <tokenised sentence>"); line 21 is the query line,
tab-separated: "21 <query with XXXXX>", the answer, an empty field, and the 10 candidates joined
by "|". Empty tab fields are dropped, so the query line has three fields after the number.

No copy of the CBT files could be obtained for this project: the loader is tested on items written
by hand in this format (tests/unit/eval/test_eval_tasks.py), not on the real files.

Input construction (SPEC 6.2): context = the 20 story lines, each detokenised, joined with " ",
then " " + the detokenised query text before XXXXX; option = candidate + the query text after
XXXXX, detokenised. 10-way multiple choice; questions without exactly 10 options are skipped.
Length-normalised by default; the ivegner/moeut_training_code fork scores unnormalised
(`normalize_by_task: {cbt: false}`). Table metric: the mean over the four types.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Dict, List

from ..scoring import MCItem, evaluate_multiple_choice
from .base import (EvalOptions, Task, TaskDataMissing, TaskFormatError, check_limit, first_existing,
                   iter_text_lines)
from .hub import load_records, need_fields

CBT_TYPES = ("CN", "NE", "P", "V")
_LINE_RE = re.compile(r"^(\d+) (.*)$")


def detokenize(text: str) -> str:
    """lm-eval-harness / instruct-eval CBT detokenisation rules, in this order (SPEC 6.2)."""
    text = text.replace(" '", "'")
    text = text.replace(" \n", "\n")
    text = text.replace("\n ", "\n")
    text = text.replace(" n't", "n't")
    text = text.replace("`` ", '"')
    text = text.replace("''", '"')
    for p in (":", ";", "!", "?", ",", "."):
        text = text.replace(" " + p, p)
    return text


def make_cbt_item(story_lines: List[str], query: str, answer: str, candidates: List[str], group: str,
                  item_id) -> MCItem:
    """context = detokenised story lines joined with " " + " " + detokenised query text before
    XXXXX; option = detokenise(candidate + query text after XXXXX)."""
    before, after = query.split("XXXXX", 1)
    context = " ".join(detokenize(s) for s in story_lines) + " " + detokenize(before)
    options = [detokenize(c + after) for c in candidates]
    return MCItem(context=context, options=options, gold=candidates.index(answer), group=group, id=item_id)


def parse_cbt_file(path: Path, group: str, limit=None) -> List[MCItem]:
    """Parse a CBT file into 10-way items; malformed lines raise TaskFormatError(file:line)."""
    items: List[MCItem] = []
    story: List[str] = []
    skipped = 0
    start_line = None
    for lineno, line in iter_text_lines(path):
        if not line.strip():
            if story:
                raise TaskFormatError(f"{path}:{lineno}: blank line inside an item (after {len(story)} "
                                      "story lines, before the line numbered 21)")
            continue
        m = _LINE_RE.match(line)
        if not m:
            raise TaskFormatError(f"{path}:{lineno}: expected '<number> <text>', got {line[:60]!r}")
        num, body = int(m.group(1)), m.group(2)
        if num != len(story) + 1:
            raise TaskFormatError(f"{path}:{lineno}: line number {num}, expected {len(story) + 1}")
        if start_line is None:
            start_line = lineno
        if num < 21:
            story.append(body)
            continue
        fields = [f for f in body.split("\t") if f != ""]  # empty fields are dropped
        if len(fields) != 3:
            raise TaskFormatError(f"{path}:{lineno}: query line must have 3 non-empty tab-separated "
                                  f"fields (query, answer, candidates), got {len(fields)}")
        query, answer, cands = fields
        if "XXXXX" not in query:
            raise TaskFormatError(f"{path}:{lineno}: query has no XXXXX placeholder")
        candidates = [c for c in cands.split("|") if c != ""]
        if answer not in candidates:
            raise TaskFormatError(f"{path}:{lineno}: answer {answer!r} is not among the candidates")
        story_lines, story = story, []
        item_line, start_line = start_line, None
        if len(candidates) != 10:
            skipped += 1  # SPEC 6.2: only 10-option questions are kept
            continue
        items.append(make_cbt_item(story_lines, query, answer, candidates, group, f"{group}:{item_line}"))
        if limit is not None and len(items) >= limit:
            break
    if story and (limit is None or len(items) < limit):
        raise TaskFormatError(f"{path}: file ends inside an item ({len(story)} story lines, no query line)")
    if skipped:
        warnings.warn(f"CBT {group}: skipped {skipped} question(s) without exactly 10 candidates ({path})")
    return items


def cbt_items(records, cbt_type: str) -> List[MCItem]:
    """CBT hub records of one type -> the same 10-way MCItems as `parse_cbt_file` (SPEC 6.2).

    Hub layout: sentences (20 story lines), question (with XXXXX), answer, options (10). Questions
    without exactly 10 options or without XXXXX are skipped; an answer not among the options raises
    TaskFormatError naming the record."""
    out = []
    for i, r in enumerate(records):
        where = f"cbt/{cbt_type} hub record {i}"
        need_fields(r, ["sentences", "question", "answer", "options"], where)
        cands = [c for c in r["options"] if c != ""]
        if r["answer"] not in cands:
            raise TaskFormatError(f"{where}: answer {r['answer']!r} is not among the options")
        if len(cands) != 10 or "XXXXX" not in r["question"]:
            continue
        out.append(make_cbt_item(list(r["sentences"]), r["question"], r["answer"], cands, cbt_type,
                                 f"{cbt_type}:{i + 1}"))
    return out


class CBT(Task):
    """Children's Book Test, the four types CN/NE/P/V as groups (SPEC 6.2); 10-way multiple choice,
    length-normalised by default; table metric = mean of the four type accuracies."""

    name = "cbt"
    column = "CBT"
    normalize_default = True

    def files(self, opts: EvalOptions) -> Dict[str, Path]:
        """{type: path} of the `cbtest_<type>_test_2500ex.txt` files found under the task root
        (directly, in CBTest/data/ or data/); types whose file is absent are left out."""
        root = opts.path_for(self.name, opts.root / "cbt")
        found = {}
        for t in CBT_TYPES:
            name = f"cbtest_{t}_test_2500ex.txt"
            p = first_existing([root / name, root / "CBTest" / "data" / name, root / "data" / name])
            if p is not None:
                found[t] = p
        return found

    def load_local(self, opts: EvalOptions) -> List[MCItem]:
        """Items of every type found; TaskDataMissing if none, a warning naming missing types."""
        root = opts.path_for(self.name, opts.root / "cbt")
        files = self.files(opts)
        if not files:
            raise TaskDataMissing(f"no CBT test files (cbtest_{{CN,NE,P,V}}_test_2500ex.txt) in {root}; "
                                  "extract CBTest.tgz there or pass paths.cbt=<dir>")
        missing = [t for t in CBT_TYPES if t not in files]
        if missing:
            warnings.warn(f"CBT: types {missing} missing in {root}; the mean covers {sorted(files)} only")
        limit = check_limit(opts.limit)
        items: List[MCItem] = []
        for t, p in files.items():
            items.extend(parse_cbt_file(p, t, limit))
        return items

    def load_hub(self, opts: EvalOptions) -> List[MCItem]:
        """Items of the four types from the hub copy (`hub.HF_SOURCES["cbt"]`), `limit` per type."""
        limit = check_limit(opts.limit)
        # limit applies after the 10-option filter in the file loader; close enough here
        return [it for t in CBT_TYPES for it in cbt_items(load_records(self.name, t, limit), t)]

    def evaluate(self, items, scorer, tokenizer, opts: EvalOptions) -> Dict[str, Any]:
        """Multiple-choice metrics (SPEC 6.1) with `accuracy` = mean over the CN/NE/P/V types."""
        m = evaluate_multiple_choice(items, scorer, tokenizer, normalize=opts.normalize(self.name, self.normalize_default),
                                     desc="cbt", keep_items=opts.keep_items)
        m["accuracy"] = m["group_average"]  # mean over the CN/NE/P/V types
        return m
