"""The paper's zero-shot table (SPEC 6.3) as markdown, CSV and LaTeX.

Columns: dataset | #params | model | val PPL | LAMBADA | BLiMP | CBT | HellaSwag | PIQA | ARC-E |
Average. Accuracies x100 with one decimal, PPL with two. Average = mean of the six accuracies
(PPL excluded). A task that was asked for but skipped (e.g. no CBT data) reads "skipped" (the
reason is in the results JSON and in a note under the markdown table); a task that was not asked
for reads "–". Either way the average is taken over the tasks present and marked with "*" and the
count, e.g. "51.3* (5/6)", so a partial average is never mistaken for the paper's.

When any row's accuracies were not all scored on every item of the full sets (a `limit`, the
carried subsets of data/eval, or tasks merged from evaluations that differ in either), an
"eval data" column follows Average: "carried subset", "limit=N", "carried subset, limit=N", or
"mixed" when the row's tasks differ; a note under the markdown table then gives each task's item
count, data and (for a row merged from several evaluations) its results file. A full-set row
reads as before.

When any row has the `perplexity` task (perplexity of a user's text), two more columns follow:
"text PPL" and "bits/byte".

Usage: `python -m moeut.analysis table results=[results1.json,results2.json,...] [out=table]` combines
result files of `moeut.evaluate` into one table (a run dir stands for its evaluation by
moeut.rundir's rule: the newest evaluated step, its evaluations merged per task;
a results file stands for that one evaluation; entries with * ? [ are glob patterns, e.g.
`'results=[runs/*/*]'` (the default run dirs runs/<name>/<time>); `--help` lists the options).
A results file that does not parse is an error naming file:line:col (moeut.rundir.read_json).
The tables are laid out by moeut.analysis.tables, the package's one table writer.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..cli import REQUIRED, bad_input_exits, check_out_file, option, typed_tool
from ..rundir import RunDir, read_json
from . import tables

COLUMNS = ("dataset", "#params", "model", "val PPL", "LAMBADA", "BLiMP", "CBT", "HellaSwag", "PIQA",
           "ARC-E", "Average")
TASK_COLUMNS = (("LAMBADA", "lambada"), ("BLiMP", "blimp"), ("CBT", "cbt"), ("HellaSwag", "hellaswag"),
                ("PIQA", "piqa"), ("ARC-E", "arc_easy"))
PPL_COLUMNS = ("text PPL", "bits/byte")
DATA_COLUMN = "eval data"  # only when a row's accuracies are not all full-set, unlimited
SKIPPED = "skipped"
PAPER_SIZES_M = (44, 126, 244, 319, 728, 1040)


def size_label(n_params: Optional[int]) -> str:
    """Total parameters rounded to the nearest paper size ({44,...,1040}M) when within 15% of it,
    else the count in millions with one decimal (test/CPU models)."""
    if not n_params:
        return "–"
    m = n_params / 1e6
    nearest = min(PAPER_SIZES_M, key=lambda s: abs(s - m))
    if abs(nearest - m) / nearest <= 0.15:
        return f"{nearest}M"
    return f"{m:.1f}M"


def model_label(arch: Optional[str]) -> str:
    """The table's model column: MoEUT, Baseline (dense), SUT, or the arch name itself."""
    return {"moeut": "MoEUT", "dense": "Baseline", "sut": "SUT"}.get(arch or "", arch or "?")


def row_from_results(res: Dict[str, Any]) -> Dict[str, str]:
    """One table row (strings) from a results dict written by moeut.eval.zeroshot."""
    tasks = res.get("tasks", {})
    row = {"dataset": str(res.get("dataset") or "?"), "#params": size_label(res.get("n_params")),
           "model": model_label(res.get("arch"))}
    ppl = res.get("val_perplexity")
    row["val PPL"] = f"{ppl:.2f}" if isinstance(ppl, (int, float)) and math.isfinite(ppl) else "–"
    accs = []
    for col, name in TASK_COLUMNS:
        acc = tasks.get(name, {}).get("accuracy")
        if isinstance(acc, (int, float)) and math.isfinite(acc):
            row[col] = f"{100 * acc:.1f}"
            accs.append(acc)
        else:
            row[col] = SKIPPED if "skipped" in tasks.get(name, {}) else "–"
    if len(accs) == len(TASK_COLUMNS):
        row["Average"] = f"{100 * sum(accs) / len(accs):.1f}"
    elif accs:
        row["Average"] = f"{100 * sum(accs) / len(accs):.1f}* ({len(accs)}/{len(TASK_COLUMNS)})"
    else:
        row["Average"] = "–"
    label = _data_label(res)
    if label:
        row[DATA_COLUMN] = label
    if "perplexity" in tasks:
        t = tasks["perplexity"]
        for col, key, fmt in (("text PPL", "perplexity", "{:.2f}"), ("bits/byte", "bits_per_byte", "{:.4f}")):
            v = t.get(key)
            row[col] = (fmt.format(v) if isinstance(v, (int, float)) and math.isfinite(v)
                        else SKIPPED if "skipped" in t else "–")
    return row


def _scored(res: Dict[str, Any]) -> List[tuple]:
    """(column, task results, data, limit) of each table task of `res` with an accuracy; `data` is
    "full" or "carried subset", `limit` the task's own (else the file's options.limit)."""
    out = []
    for col, name in TASK_COLUMNS:
        t = (res.get("tasks") or {}).get(name)
        if isinstance(t, dict) and isinstance(t.get("accuracy"), (int, float)):
            out.append((col, t, t.get("data", "full"), t.get("limit", (res.get("options") or {}).get("limit"))))
    return out


def _data_label(res: Dict[str, Any]) -> str:
    """The "eval data" cell of `res`: "" when every accuracy is full-set without a limit, else
    "carried subset" / "limit=N" / "carried subset, limit=N", or "mixed" when the tasks differ."""
    scopes = {(data, limit) for _, _, data, limit in _scored(res)}
    if not scopes or scopes == {("full", None)}:
        return ""
    if len(scopes) > 1:
        return "mixed"
    data, limit = next(iter(scopes))
    return ", ".join(x for x in (data if data != "full" else "", f"limit={limit}" if limit is not None else "") if x)


def data_notes(results: Sequence[Dict[str, Any]]) -> List[str]:
    """For each results dict whose row has an "eval data" cell, one line giving every task's item
    count and data: "<run>: LAMBADA 300 items (carried subset), PIQA 20 items (full set, limit=20;
    results_step_0000050.2.json), ..." (the file only for a dict merged from several evaluations)."""
    out = []
    for res in results:
        if not _data_label(res):
            continue
        several = len(res.get("evaluations") or ()) > 1
        parts = []
        for col, t, data, limit in _scored(res):
            what = ["carried subset" if data != "full" else "full set"]
            if limit is not None:
                what.append(f"limit={limit}")
            detail = ", ".join(what) + (f"; {t['results_file']}" if several and t.get("results_file") else "")
            parts.append(f"{col} {t.get('n_items', '?')} items ({detail})")
        run = Path(str(res.get("run_dir") or res.get("checkpoint") or "?")).name
        out.append(f"{run}: " + ", ".join(parts))
    return out


def skipped_notes(results: Sequence[Dict[str, Any]]) -> List[str]:
    """One line per skipped task of each results dict: "<task> skipped: <reason>"."""
    out = []
    for res in results:
        for name, t in (res.get("tasks") or {}).items():
            if isinstance(t, dict) and "skipped" in t:
                out.append(f"{name} skipped: {t['skipped']}")
    return out


def table_notes(results: Sequence[Dict[str, Any]]) -> List[str]:
    """The notes under a markdown table of `results`: `data_notes`, then `skipped_notes`."""
    return data_notes(results) + skipped_notes(results)


def columns_of(rows: Sequence[Dict[str, str]]) -> List[str]:
    """COLUMNS, plus DATA_COLUMN and PPL_COLUMNS when any row has them."""
    return (list(COLUMNS) + ([DATA_COLUMN] if any(DATA_COLUMN in r for r in rows) else [])
            + ([c for c in PPL_COLUMNS] if any(c in r for r in rows for c in PPL_COLUMNS) else []))


def _cells(rows: Sequence[Dict[str, str]]) -> tuple:
    """(columns, rows as lists of cells; missing cells "–")."""
    cols = columns_of(rows)
    return cols, [[r.get(c, "–") for c in cols] for r in rows]


def to_markdown(rows: Sequence[Dict[str, str]], notes: Sequence[str] = ()) -> str:
    """Markdown table of `rows` (missing cells "–"), then `notes` as a bullet list."""
    return tables.to_markdown(*_cells(rows), notes)


def to_csv(rows: Sequence[Dict[str, str]]) -> str:
    """CSV text of `rows` with a header line (missing cells "–"; lines end in "\n")."""
    return tables.to_csv(*_cells(rows), lineterminator="\n")


def to_latex(rows: Sequence[Dict[str, str]]) -> str:
    """A booktabs LaTeX tabular of `rows` (special characters escaped, "–" as "--")."""
    cols, cells = _cells(rows)
    return tables.to_latex(cols, cells, align="lll" + "r" * (len(cols) - 3))


def write_tables(rows: Sequence[Dict[str, str]], stem: str, notes: Sequence[str] = ()) -> Dict[str, str]:
    """Write stem.md (with `notes` under the table), stem.csv and stem.tex; returns {format: path}."""
    cols, cells = _cells(rows)
    return tables.write_tables(stem, cols, cells, notes, csv_lineterminator="\n",
                               align="lll" + "r" * (len(cols) - 3))


def expand_results(results: Any) -> List[str]:
    """The `results` option as a list of files: one path or a list; an entry with glob characters
    (`*`, `?`, `[`) expands to its matches, sorted. Raises ValueError naming an empty option or a
    pattern that matches nothing."""
    from ..cli import path_list_option
    return path_list_option(results, "results", "results=[FILE.json,...] (moeut.evaluate results files)",
                            keep=lambda p: os.path.isdir(p) or p.endswith(".json"),
                            kept="run dirs or .json results files")


def combine(paths: Sequence[str], out: Optional[str] = None) -> str:
    """One row per entry of `paths`: a results file (moeut.rundir.read_json), or a run dir (or a
    checkpoint path in one) meaning its evaluation by moeut.rundir's rule (`RunDir.latest_eval`:
    the newest evaluated step, its evaluations merged per task).
    Writes OUT.md/.csv/.tex when `out` is given and returns their paths (one per line), else
    returns the markdown table. Raises FileNotFoundError (also: a run dir without results),
    CorruptRunFile (file:line:col), ValueError (not a results dict)."""
    rows, results = [], []
    for p in paths:
        if os.path.isdir(p):
            latest = RunDir(p).latest_eval()
            if latest is None:
                raise FileNotFoundError(f"{p}: no moeut.evaluate results in {RunDir(p).eval_dir} "
                                        "(run python -m moeut.evaluate checkpoint=<run dir> first)")
            p, res = str(latest[0]), latest[1]
        else:
            res = read_json(p)
        if not isinstance(res, dict):
            raise ValueError(f"{p}: not a moeut.evaluate results file (expected a JSON object)")
        results.append(res)
        rows.append(row_from_results(res))
    notes = table_notes(results)
    if out:
        return "\n".join(write_tables(rows, out, notes).values()) + "\n"
    return to_markdown(rows, notes)


@dataclass
class TableOptions:
    """Options of `python -m moeut.analysis table`."""
    results: List[str] = option(REQUIRED, help="moeut.evaluate results JSON files "
                                "(<run>/eval/results_step_XXXXXXX[.k].json: that one evaluation) or run dirs (the "
                                "newest step's evaluations merged per task); entries with * ? [ are glob patterns, "
                                "e.g. 'results=[runs/*/*]'")
    out: Optional[str] = option(None, help="write OUT.md, OUT.csv and OUT.tex and print their paths; null = print "
                                "the markdown table")


def work(opts: TableOptions) -> str:
    """The command's work: print (and with `out`, write) the table of `opts.results`; returns
    the printed text. Raises ValueError/FileNotFoundError (one line, exit 1)."""
    with bad_input_exits("moeut.analysis table"):
        check_out_file(opts.out, "out", prefix=True)
        text = combine(expand_results(opts.results), opts.out)
    print(text, end="")
    return text


main = typed_tool("moeut.analysis table", TableOptions,
                  summary="Combine moeut.evaluate results files into the paper's zero-shot table (SPEC 6.3) as "
                          "markdown, CSV and LaTeX.",
                  usage="python -m moeut.analysis table results=[FILE.json|RUN_DIR,...] [out=STEM]",
                  notes="A results file that does not parse is an error naming file:line:col.")(work)

