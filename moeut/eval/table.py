"""The paper's zero-shot table (SPEC 6.3) as markdown, CSV and LaTeX.

Columns: dataset | #params | model | val PPL | LAMBADA | BLiMP | CBT | HellaSwag | PIQA | ARC-E |
Average. Accuracies x100 with one decimal, PPL with two. Average = mean of the six accuracies
(PPL excluded). A task that was asked for but skipped (e.g. no CBT data) reads "skipped" (the
reason is in the results JSON and in a note under the markdown table); a task that was not asked
for reads "–". Either way the average is taken over the tasks present and marked with "*" and the
count, e.g. "51.3* (5/6)", so a partial average is never mistaken for the paper's.

When any row has the `perplexity` task (perplexity of a user's text), two more columns follow:
"text PPL" and "bits/byte".

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
PPL_COLUMNS = ("text PPL", "bits/byte")
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
    if "perplexity" in tasks:
        t = tasks["perplexity"]
        for col, key, fmt in (("text PPL", "perplexity", "{:.2f}"), ("bits/byte", "bits_per_byte", "{:.4f}")):
            v = t.get(key)
            row[col] = (fmt.format(v) if isinstance(v, (int, float)) and math.isfinite(v)
                        else SKIPPED if "skipped" in t else "–")
    return row


def skipped_notes(results: Sequence[Dict[str, Any]]) -> List[str]:
    """One line per skipped task of each results dict: "<task> skipped: <reason>"."""
    out = []
    for res in results:
        for name, t in (res.get("tasks") or {}).items():
            if isinstance(t, dict) and "skipped" in t:
                out.append(f"{name} skipped: {t['skipped']}")
    return out


def columns_of(rows: Sequence[Dict[str, str]]) -> List[str]:
    return list(COLUMNS) + ([c for c in PPL_COLUMNS] if any(c in r for r in rows for c in PPL_COLUMNS) else [])


def to_markdown(rows: Sequence[Dict[str, str]], notes: Sequence[str] = ()) -> str:
    cols = columns_of(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(r.get(c, "–") for c in cols) + " |")
    if notes:
        lines.append("")
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[Dict[str, str]]) -> str:
    buf = io.StringIO()
    cols = columns_of(rows)
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c, "–") for c in cols})
    return buf.getvalue()


def _tex_escape(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#"), ("_", r"\_"),
                 ("–", "--")):
        s = s.replace(a, b)
    return s


def to_latex(rows: Sequence[Dict[str, str]]) -> str:
    cols = columns_of(rows)
    lines = [r"\begin{tabular}{lll" + "r" * (len(cols) - 3) + "}", r"\toprule",
             " & ".join(_tex_escape(c) for c in cols) + r" \\", r"\midrule"]
    for r in rows:
        lines.append(" & ".join(_tex_escape(r.get(c, "–")) for c in cols) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_tables(rows: Sequence[Dict[str, str]], stem: str, notes: Sequence[str] = ()) -> Dict[str, str]:
    """Write stem.md (with `notes` under the table), stem.csv and stem.tex; returns {format: path}."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    out = {}
    for ext, text in (("md", to_markdown(rows, notes)), ("csv", to_csv(rows)), ("tex", to_latex(rows))):
        path = f"{stem}.{ext}"
        with open(path, "w") as f:
            f.write(text)
        out[ext] = path
    return out


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="Combine moeut.evaluate result JSONs into the paper's table")
    ap.add_argument("results", nargs="+", help="results JSON files written by python -m moeut.evaluate")
    ap.add_argument("--out", default=None, help="write OUT.md, OUT.csv, OUT.tex (default: print markdown)")
    args = ap.parse_args(argv)
    rows, results = [], []
    for p in args.results:
        with open(p) as f:
            results.append(json.load(f))
        rows.append(row_from_results(results[-1]))
    notes = skipped_notes(results)
    if args.out:
        for path in write_tables(rows, args.out, notes).values():
            print(path)
    else:
        print(to_markdown(rows, notes), end="")


if __name__ == "__main__":
    main()
