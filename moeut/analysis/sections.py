"""One named section of a run's analysis report (<out_dir>/report.md and report.html): inserted the
first time, replaced in place on a rerun (never duplicated), every other part of the report kept.

A section is delimited in both files by the comment lines `<!-- section:<name> -->` and
`<!-- /section:<name> -->`. Its content is a title, paragraphs, an optional table and figures
(paths relative to <out_dir>), rendered once as Markdown and once as HTML.
"""
from __future__ import annotations

import html
import os
import re
from typing import List, Optional, Sequence, Tuple

REPORT_MD = "report.md"
REPORT_HTML = "report.html"


def _markers(name: str) -> Tuple[str, str]:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"report section name {name!r}: letters, digits, '_', '.', '-' only")
    return f"<!-- section:{name} -->", f"<!-- /section:{name} -->"


def render_md(title: str, paragraphs: Sequence[str], table: Optional[Tuple[Sequence[str], Sequence[Sequence]]] = None,
              figures: Sequence[Tuple[str, str]] = ()) -> str:
    """The section body in Markdown: `## title`, paragraphs, a table (header, rows) and figures
    [(relative path, caption)]."""
    out = [f"## {title}", ""]
    for p in paragraphs:
        out += [p, ""]
    if table is not None:
        header, rows = table
        out.append("| " + " | ".join(str(h) for h in header) + " |")
        out.append("|" + "---|" * len(header))
        out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        out.append("")
    for path, caption in figures:
        out += [f"![{caption}]({path})", "", f"*{caption}*", ""]
    return "\n".join(out).rstrip() + "\n"


def render_html(title: str, paragraphs: Sequence[str], table: Optional[Tuple[Sequence[str], Sequence[Sequence]]] = None,
                figures: Sequence[Tuple[str, str]] = ()) -> str:
    """The same section body in HTML (text escaped)."""
    e = html.escape
    out = [f"<h2>{e(title)}</h2>"] + [f"<p>{e(p)}</p>" for p in paragraphs]
    if table is not None:
        header, rows = table
        out.append("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in header) + "</tr>")
        out += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows]
        out.append("</table>")
    for path, caption in figures:
        out.append(f'<figure><img src="{e(path)}" alt="{e(caption)}" style="max-width:100%">'
                   f"<figcaption>{e(caption)}</figcaption></figure>")
    return "\n".join(out) + "\n"


def _replace(text: str, name: str, body: str) -> str:
    start, end = _markers(name)
    block = f"{start}\n{body}{end}\n"
    i, j = text.find(start), text.find(end)
    if i >= 0 and j > i:
        return text[:i] + block + text[j + len(end):].lstrip("\n")
    return text + ("\n" if text and not text.endswith("\n") else "") + block


def write_section(out_dir: str, name: str, title: str, paragraphs: Sequence[str],
                  table: Optional[Tuple[Sequence[str], Sequence[Sequence]]] = None,
                  figures: Sequence[Tuple[str, str]] = (), run: str = "") -> List[str]:
    """Insert or replace section `name` in <out_dir>/report.md and report.html (each created with
    a heading naming `run` when missing). Returns the two paths. Raises ValueError for a name with
    characters other than letters, digits, '_', '.', '-'."""
    os.makedirs(out_dir, exist_ok=True)
    md_path, html_path = os.path.join(out_dir, REPORT_MD), os.path.join(out_dir, REPORT_HTML)
    md = open(md_path, encoding="utf-8").read() if os.path.isfile(md_path) else f"# Analysis of {run}\n\n"
    page = (open(html_path, encoding="utf-8").read() if os.path.isfile(html_path) else
            f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Analysis of {html.escape(run)}</title>"
            f"</head><body>\n<h1>Analysis of {html.escape(run)}</h1>\n</body></html>\n")
    md = _replace(md, name, render_md(title, paragraphs, table, figures))
    start, end = _markers(name)
    body = render_html(title, paragraphs, table, figures)
    if start in page and end in page:
        page = _replace(page, name, body)
    else:  # new section: before </body> (or at the end of a page without one)
        k = page.rfind("</body>")
        block = f"{start}\n{body}{end}\n"
        page = page[:k] + block + page[k:] if k >= 0 else page + block
    for path, text in ((md_path, md), (html_path, page)):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    return [md_path, html_path]


def carry_sections(old: str, new: str) -> str:
    """`new` (a report.md or report.html rewritten whole, e.g. by the `routing` report) with every
    named section of `old` that `new` lacks appended (before `</body>` in HTML), so rewriting the
    page never drops another analysis's section."""
    blocks = []
    pos = 0
    while True:
        i = old.find("<!-- section:", pos)
        if i < 0:
            break
        name = old[i + len("<!-- section:"):old.find(" -->", i)]
        start, end = _markers(name)
        j = old.find(end, i)
        if j < 0:
            break
        if start not in new:
            blocks.append(old[i:j + len(end)] + "\n")
        pos = j + len(end)
    if not blocks:
        return new
    k = new.rfind("</body>")
    if k >= 0:
        return new[:k] + "".join(blocks) + new[k:]
    return new + ("\n" if new and not new.endswith("\n") else "") + "".join(blocks)
