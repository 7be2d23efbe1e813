"""The paper's zero-shot table (SPEC 6.3) as markdown, CSV and LaTeX.

Columns: dataset | #params | model | val PPL | LAMBADA | BLiMP | CBT | HellaSwag | PIQA | ARC-E |
Average. Accuracies x100 with one decimal, PPL with two. Average = mean of the six accuracies
(PPL excluded). When a task was not evaluated (e.g. no CBT data), its cell is "–" and the average
is taken over the tasks present and marked with "*" and the count, e.g. "51.3* (5/6)", so a
partial average is never mistaken for the paper's.

Usage: `python -m moeut.eval.table results1.json results2.json ... [--out table]` combines
result files of `moeut.evaluate` into one table.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence

COLUMNS = ("dataset", "#params", "model", "val PPL", "LAMBADA", "BLiMP", "CBT", "HellaSwag", "PIQA",
           "ARC-E", "Average")
TASK_COLUMNS = (("LAMBADA", "lambada"), ("BLiMP", "blimp"), ("CBT", "cbt"), ("HellaSwag", "hellaswag"),
                ("PIQA", "piqa"), ("ARC-E", "arc_easy"))
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
            row[col] = "–"
    if len(accs) == len(TASK_COLUMNS):
        row["Average"] = f"{100 * sum(accs) / len(accs):.1f}"
    elif accs:
        row["Average"] = f"{100 * sum(accs) / len(accs):.1f}* ({len(accs)}/{len(TASK_COLUMNS)})"
    else:
        row["Average"] = "–"
    return row


def to_markdown(rows: Sequence[Dict[str, str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(r[c] for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[Dict[str, str]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def _tex_escape(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#"), ("_", r"\_"),
                 ("–", "--")):
        s = s.replace(a, b)
    return s


def to_latex(rows: Sequence[Dict[str, str]]) -> str:
    lines = [r"\begin{tabular}{lll" + "r" * (len(COLUMNS) - 3) + "}", r"\toprule",
             " & ".join(_tex_escape(c) for c in COLUMNS) + r" \\", r"\midrule"]
    for r in rows:
        lines.append(" & ".join(_tex_escape(r[c]) for c in COLUMNS) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_tables(rows: Sequence[Dict[str, str]], stem: str) -> Dict[str, str]:
    """Write stem.md, stem.csv and stem.tex; returns {format: path}."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    out = {}
    for ext, fn in (("md", to_markdown), ("csv", to_csv), ("tex", to_latex)):
        path = f"{stem}.{ext}"
        with open(path, "w") as f:
            f.write(fn(rows))
        out[ext] = path
    return out


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="Combine moeut.evaluate result JSONs into the paper's table")
    ap.add_argument("results", nargs="+", help="results JSON files written by python -m moeut.evaluate")
    ap.add_argument("--out", default=None, help="write OUT.md, OUT.csv, OUT.tex (default: print markdown)")
    args = ap.parse_args(argv)
    rows = []
    for p in args.results:
        with open(p) as f:
            rows.append(row_from_results(json.load(f)))
    if args.out:
        for path in write_tables(rows, args.out).values():
            print(path)
    else:
        print(to_markdown(rows), end="")


if __name__ == "__main__":
    main()
