"""The one-page report of the expert analysis (SPEC §7): report.md and report.html beside the
figures, with a summary table (checkpoint, tokens analysed, validation perplexity set beside the
run's own validation during training, the training-time routing metrics of the pass) and each
figure with one sentence on how to read it."""
from __future__ import annotations

import html
import math
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from ..rundir import RunDir
from . import sections

if TYPE_CHECKING:
    from .figures import FigureInfo


def training_validation(metrics_rows: Optional[Sequence[dict]], run_dir: str,
                        ckpt_dir: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The run's own last validation during training, for the report to set beside the analysis's:
    {"step", "perplexity" (`validation/val/perplexity` of metrics.jsonl), "tokens" (the predicted
    tokens it averaged over, `validation/val/tokens`; None in older logs), "valid_tokens",
    "valid_path", "seq_len" (`data.*` of the run's saved config; None when absent)}; None when
    metrics.jsonl logged no validation."""
    last = None
    for row in metrics_rows or []:
        v = row.get("validation/val/perplexity")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            n = row.get("validation/val/tokens")
            last = (row.get("step"), float(v), int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) else None)
    if last is None:
        return None
    conf = RunDir(run_dir).config(ckpt_dir) or {}
    data = conf.get("data") if isinstance(conf.get("data"), dict) else {}
    return {"step": last[0], "perplexity": last[1], "tokens": last[2], "valid_tokens": data.get("valid_tokens"),
            "valid_path": data.get("valid_path") or data.get("path"), "seq_len": data.get("seq_len")}


def _summary_rows(meta: Dict[str, Any], training: Optional[Dict[str, Any]] = None) -> List[Tuple[str, str]]:
    n_tok = meta.get("n_tokens")
    rows = [("checkpoint", str(meta.get("checkpoint"))), ("step", str(meta.get("step"))),
            ("validation data", str(meta.get("data_path"))),
            ("tokens analysed", f"{n_tok:,} predicted tokens ({meta.get('n_windows')} windows of {meta.get('seq_len')})"
             if isinstance(n_tok, int) else str(n_tok)),
            ("validation perplexity", f"{meta['val_ppl']:.2f} over the {n_tok:,} tokens above" if
             meta.get("val_ppl") is not None and isinstance(n_tok, int) else "n/a")]
    if training is not None:
        budget, T, counted = training.get("valid_tokens"), training.get("seq_len"), training.get("tokens")
        if counted is not None:  # logged by training: exact
            same = counted == n_tok
            size = f"{counted:,} predicted tokens (data.valid_tokens={budget})"
        else:  # older logs: training predicts the tokens of its valid_tokens // T windows of T (SPEC 5.7)
            same = isinstance(budget, int) and isinstance(T, int) and T > 0 and budget // T * T == n_tok
            size = f"data.valid_tokens={budget:,}" if isinstance(budget, int) else "data.valid_tokens=null (the whole split)"
        vpath = training.get("valid_path")
        same_file = bool(vpath) and os.path.abspath(str(vpath)) == os.path.abspath(str(meta.get("data_path")))
        same_T = not isinstance(T, int) or T == meta.get("seq_len")
        diffs = ([] if same_file else ["another file"]) + ([] if same else ["another number of tokens"]) + \
            ([] if same_T else [f"another window length ({T})"])
        note = ("the same file and as many tokens as here" if not diffs else
                f"{' and '.join(diffs)} than here, so the two perplexities differ; data.path={vpath} "
                f"max_tokens={budget if isinstance(budget, int) else 'null'}{'' if same_T else f' seq_len={T}'} "
                f"measures the same windows")
        rows.append(("training's validation perplexity",
                     f"{training['perplexity']:.2f} at step {training.get('step')} (metrics.jsonl "
                     f"validation/val/perplexity) over the run's {size} of {training.get('valid_path')}: {note}"))
    rows.append(("G, R, N_E, K", f"{meta['n_groups']}, {meta['n_repeats']}, {meta['n_experts']}, {meta['k']}"))
    for k, v in sorted((meta.get("summary") or {}).items()):
        rows.append((k, f"{v:.4f}"))
    return rows


def _read(path: str) -> str:
    """The text of `path`, or "" when it does not exist."""
    return open(path, encoding="utf-8").read() if os.path.isfile(path) else ""


def write_report(out_dir: str, infos: List["FigureInfo"], meta: Dict[str, Any], run: str,
                 training: Optional[Dict[str, Any]] = None) -> Tuple[str, str]:
    """report.md and report.html in `out_dir`, embedding the PNGs with one sentence under each.
    The summary gives the validation perplexity with its token count and, when `training`
    (`training_validation`) is given, the run's own last validation perplexity with its token
    budget and whether the two measured the same number of tokens."""
    rows = _summary_rows(meta, training)
    md = [f"# Expert-specialisation analysis: {run}", "",
          "Generated by `python -m moeut.analysis routing` (SPEC §7). Layers are 1-based absolute layers.", "",
          "| quantity | value |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in rows]
    md.append("")
    for i in infos:
        png = next((f for f in i.files if f.endswith(".png")), i.files[0])
        md += [f"## {i.title}", "", f"![{i.title}]({png})", "", i.caption, ""]
    md_path = os.path.join(out_dir, "report.md")
    # other analyses' sections of the page (moeut.analysis.sections) are kept, not overwritten
    md_text = sections.carry_sections(_read(md_path), "\n".join(md))
    with open(md_path, "w") as f:
        f.write(md_text)
    e = html.escape
    body = [f"<h1>Expert-specialisation analysis: {e(run)}</h1>",
            "<p>Generated by <code>python -m moeut.analysis routing</code> (SPEC §7). Layers are 1-based absolute layers.</p>",
            "<table border='1' cellpadding='3'>"] + \
           [f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in rows] + ["</table>"]
    for i in infos:
        png = next((f for f in i.files if f.endswith(".png")), i.files[0])
        body += [f"<h2>{e(i.title)}</h2>", f"<img src='{e(png)}' style='max-width:100%'>", f"<p>{e(i.caption)}</p>"]
    html_path = os.path.join(out_dir, "report.html")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + e(run) +
            "</title></head><body style='font-family:sans-serif;max-width:1000px'>" + "\n".join(body) +
            "</body></html>")
    page = sections.carry_sections(_read(html_path), page)
    with open(html_path, "w") as f:
        f.write(page)
    return md_path, html_path
