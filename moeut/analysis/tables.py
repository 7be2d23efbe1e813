"""The one table writer of the analysis package: markdown (with notes under the table), CSV and
LaTeX from a header and rows of cells. Used by the zero-shot tables (`table`), the sweep summary
(`summary`), the compute-matched comparisons (`compare`) and the CPU-result report (`cpu-result`).

Callers format their own cells (each table has its own number formats); this module only lays
them out, so every table of the package has the same markdown, CSV and LaTeX shape.
"""
from __future__ import annotations

import csv
import io
import os
from typing import Any, Dict, Optional, Sequence

Row = Sequence[Any]


def _cell(v: Any) -> str:
    """A markdown cell: "" for None, else the text with "|" escaped (it would split the cell)."""
    return "" if v is None else str(v).replace("|", "\\|")


def to_markdown(header: Sequence[str], rows: Sequence[Row], notes: Sequence[str] = ()) -> str:
    """A markdown table (header row, `|---|` rule, one line per row; None cells empty, "|" in a
    cell escaped), then, when there are `notes`, a blank line and one "- note" line each. Ends with
    a newline. Raises ValueError naming a row whose cell count differs from the header's."""
    for i, r in enumerate(rows):
        if len(r) != len(header):
            raise ValueError(f"table row {i}: {len(r)} cells for {len(header)} columns")
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    if notes:
        lines.append("")
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def to_csv(header: Sequence[str], rows: Sequence[Row], lineterminator: str = "\r\n") -> str:
    """CSV text (the csv module's quoting; None cells empty) of the header and rows, each line
    ended by `lineterminator` (the csv module's "\\r\\n" by default)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator=lineterminator)
    w.writerow(header)
    w.writerows([["" if c is None else c for c in r] for r in rows])
    return buf.getvalue()


_TEX = (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#"), ("_", r"\_"), ("–", "--"))


def tex_escape(s: str) -> str:
    """`s` with LaTeX's special characters escaped (\\ & % # _) and "–" as "--"."""
    for a, b in _TEX:
        s = s.replace(a, b)
    return s


def to_latex(header: Sequence[str], rows: Sequence[Row], align: Optional[str] = None) -> str:
    """A booktabs LaTeX tabular of the header and rows (cells escaped by `tex_escape`); `align`
    is the column spec (default: "l" for every column). Ends with a newline."""
    align = align or "l" * len(header)
    lines = [r"\begin{tabular}{" + align + "}", r"\toprule", " & ".join(tex_escape(str(c)) for c in header) + r" \\",
             r"\midrule"]
    lines += [" & ".join(tex_escape("" if c is None else str(c)) for c in r) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_text(path: os.PathLike, text: str) -> str:
    """Write `text` to `path` (UTF-8, creating the folder); returns the path as a string."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return path


def write_tables(stem: str, header: Sequence[str], rows: Sequence[Row], notes: Sequence[str] = (),
                 formats: Sequence[str] = ("md", "csv", "tex"), csv_lineterminator: str = "\r\n",
                 align: Optional[str] = None) -> Dict[str, str]:
    """Write `stem`.md (notes under the table), `stem`.csv and `stem`.tex, for each of `formats`;
    returns {format: path}. Raises ValueError naming an unknown format."""
    out = {}
    for fmt in formats:
        if fmt == "md":
            text = to_markdown(header, rows, notes)
        elif fmt == "csv":
            text = to_csv(header, rows, csv_lineterminator)
        elif fmt == "tex":
            text = to_latex(header, rows, align)
        else:
            raise ValueError(f"table format: must be one of md | csv | tex, got {fmt!r}")
        out[fmt] = write_text(f"{stem}.{fmt}", text)
    return out
