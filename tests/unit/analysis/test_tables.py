"""moeut.analysis.tables, the one table writer, by hand; and the tables of the `summary`, `table`
and `compare` subcommands on hand-written run dirs against exact text written by hand (the text
the former separate writers printed for the same files, so the move changed no byte)."""
import json
from pathlib import Path

import pytest

from moeut.analysis import tables


def test_markdown_csv_latex_by_hand():
    header, rows = ["run", "a|b", "x"], [["r1", None, 1.5], ["r_2", "p|q", "–"]]
    assert tables.to_markdown(header, rows, notes=["first", "second"]) == (
        "| run | a\\|b | x |\n|---|---|---|\n| r1 |  | 1.5 |\n| r_2 | p\\|q | – |\n\n- first\n- second\n")
    assert tables.to_markdown(["a"], []) == "| a |\n|---|\n"
    assert tables.to_csv(header, rows) == 'run,a|b,x\r\nr1,,1.5\r\nr_2,p|q,–\r\n'
    assert tables.to_csv(["a", "b"], [["1, 2", 3]], lineterminator="\n") == 'a,b\n"1, 2",3\n'
    assert tables.to_latex(["#", "a_b"], [["50%", "–"], ["x&y", "\\"]], align="lr") == (
        "\\begin{tabular}{lr}\n\\toprule\n\\# & a\\_b \\\\\n\\midrule\n50\\% & -- \\\\\n"
        "x\\&y & \\textbackslash{} \\\\\n\\bottomrule\n\\end{tabular}\n")


def test_bad_rows_and_formats_are_named(tmp_path):
    with pytest.raises(ValueError, match="table row 1: 1 cells for 2 columns"):
        tables.to_markdown(["a", "b"], [["1", "2"], ["3"]])
    with pytest.raises(ValueError, match="table format: must be one of md | csv | tex, got 'html'"):
        tables.write_tables(str(tmp_path / "t"), ["a"], [["1"]], formats=("md", "html"))
    written = tables.write_tables(str(tmp_path / "sub" / "t"), ["a"], [["1"]], notes=["n"])
    assert {k: Path(v).read_bytes().decode() for k, v in written.items()} == {
        "md": "| a |\n|---|\n| 1 |\n\n- n\n", "csv": "a\r\n1\r\n",
        "tex": "\\begin{tabular}{l}\n\\toprule\na \\\\\n\\midrule\n1 \\\\\n\\bottomrule\n\\end{tabular}\n"}


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _results(step, tasks, arch="moeut", n=44_300_000, ppl=31.234, limit=None):
    return json.dumps({"checkpoint": "x", "step": step, "arch": arch, "n_params": n, "dataset": "C4",
                       "val_perplexity": ppl, "options": {"limit": limit}, "tasks": tasks, "table_row": {}})


@pytest.fixture()
def runs(tmp_path):
    """Two hand-written run dirs: dense (a provenance commit, one evaluation with a skipped task
    and the perplexity task) and moe (two evaluations of step 100 on the carried subsets, merged)."""
    from moeut.registry import get_preset
    sweep = tmp_path / "sweep"
    for name, preset, vals, extra in (("a_dense", "cpu_dense", [(50, 100.0), (100, 50.0)], {"train/tokens_per_s": 640.0}),
                                      ("b_moe", "cpu_sigma_moe", [(10, 150.0), (50, 80.0), (100, 40.0)], {})):
        run = sweep / name
        _write(run / "model_config.json", json.dumps(dict(vars(get_preset(preset, vocab_size=512)))))
        lines = []
        for s, p in vals:
            lines.append({"step": s, "train/loss": round(p / 20, 2), "train/tokens_seen": s * 64, **extra})
            lines.append({"step": s, "validation/val/perplexity": p, "validation/c4/perplexity": 1.5 * p})
        _write(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    _write(sweep / "a_dense" / "provenance.jsonl", json.dumps({"git": {"commit": "1234567890", "dirty": False}}) + "\n")
    _write(sweep / "b_moe" / "step_time.json", json.dumps({"step_time_s": 0.4}))
    _write(sweep / "a_dense" / "eval" / "results_step_0000100.json", _results(100, {
        "piqa": {"accuracy": 0.61, "n_items": 100, "limit": None}, "arc_easy": {"accuracy": 0.4, "n_items": 100},
        "cbt": {"skipped": "no data"}, "perplexity": {"perplexity": 12.5, "bits_per_byte": 1.0123}},
        arch="dense", n=126_000_000, ppl=50.0))
    sub = {"n_items": 10, "limit": 10, "data": "carried subset"}
    _write(sweep / "b_moe" / "eval" / "results_step_0000100.json", _results(100, {
        "lambada": {"accuracy": 0.3, **sub}, "blimp": {"accuracy": 0.7, **sub}}, limit=10))
    _write(sweep / "b_moe" / "eval" / "results_step_0000100.2.json", _results(100, {
        "piqa": {"accuracy": 0.55, "n_items": 20, "limit": 20, "data": "carried subset"}}, limit=20))
    return sweep


def test_eval_table_text(runs, tmp_path):
    from moeut.analysis import table as T
    paths = [str(runs / "a_dense"), str(runs / "b_moe"), str(runs / "b_moe" / "eval" / "results_step_0000100.json")]
    T.combine(paths, str(tmp_path / "t" / "paper"))
    rows = [["C4", "126M", "Baseline", "50.00", "–", "–", "skipped", "–", "61.0", "40.0", "50.5* (2/6)", "–",
             "12.50", "1.0123"],
            ["C4", "44M", "MoEUT", "31.23", "30.0", "70.0", "–", "–", "55.0", "–", "51.7* (3/6)", "mixed", "–", "–"],
            ["C4", "44M", "MoEUT", "31.23", "30.0", "70.0", "–", "–", "–", "–", "50.0* (2/6)",
             "carried subset, limit=10", "–", "–"]]
    header = ["dataset", "#params", "model", "val PPL", "LAMBADA", "BLiMP", "CBT", "HellaSwag", "PIQA", "ARC-E",
              "Average", "eval data", "text PPL", "bits/byte"]
    md = ("| " + " | ".join(header) + " |\n|" + "---|" * 14 + "\n"
          + "".join("| " + " | ".join(r) + " |\n" for r in rows) + "\n"
          "- x: LAMBADA 10 items (carried subset, limit=10; results_step_0000100.json), BLiMP 10 items (carried "
          "subset, limit=10; results_step_0000100.json), PIQA 20 items (carried subset, limit=20; "
          "results_step_0000100.2.json)\n"
          "- x: LAMBADA 10 items (carried subset, limit=10), BLiMP 10 items (carried subset, limit=10)\n"
          "- cbt skipped: no data\n")
    assert (tmp_path / "t" / "paper.md").read_text() == md
    assert (tmp_path / "t" / "paper.csv").read_text() == (
        ",".join(header) + "\n" + "".join(",".join(f'"{c}"' if "," in c else c for c in r) + "\n" for r in rows))
    tex = (tmp_path / "t" / "paper.tex").read_text().splitlines()
    assert tex[0] == "\\begin{tabular}{lllrrrrrrrrrrr}" and tex[2].startswith("dataset & \\#params & model")
    assert tex[4] == ("C4 & 126M & Baseline & 50.00 & -- & -- & skipped & -- & 61.0 & 40.0 & 50.5* (2/6) & -- & "
                      "12.50 & 1.0123 \\\\")


def test_summary_and_compare_text(runs, tmp_path):
    from moeut.analysis import compare, summary
    res = summary.write_summary(runs, tmp_path / "s", plots=False)
    md = (tmp_path / "s" / "summary.md").read_text().splitlines()
    assert md[0] == "# Sweep summary: sweep"
    assert md[2] == ("| run | commit | experiment | dataset | arch | params | d_model | n_layers | G | K | d_expert | ln | step | val_ppl | "
                     "best_val_ppl | train_loss | eval/arc_easy | eval/bits_per_byte | eval/blimp | eval/cbt | "
                     "eval/lambada | eval/piqa | eval/text_ppl | eval_data | eval_limit | eval_step |")
    assert md[4] == ("| a_dense | 1234567 |  |  | dense | 0.92M | 128 | 4 | 4 |  |  |  | 100 | 50.00 | 50.00 | 2.50 | 0.4000 | "
                     "1.01 |  | skipped |  | 0.6100 | 12.50 |  |  | 100 |")
    assert md[5] == ("| b_moe |  |  |  | moeut | 1.32M | 128 | 4 | 4 | 4 | 64 | peri | 100 | 40.00 | 40.00 | 2.00 |  |  | "
                     "0.7000 |  | 0.3000 | 0.5500 |  | carried subset | mixed | 100 |")
    csv_lines = (tmp_path / "s" / "summary.csv").read_bytes().split(b"\r\n")
    assert csv_lines[0].startswith(b"run,commit,experiment,dataset,arch,params,d_model,") and csv_lines[1].startswith(
        b"a_dense,1234567,,,dense,922880,128,4,4,,,,100,50.0,50.0,2.5,")
    assert len(res["rows"]) == 2
    out = compare.compare([str(runs / "a_dense"), str(runs / "b_moe")], str(tmp_path / "c"), seq_len=32, plot=False)
    assert (tmp_path / "c" / "summary.md").read_text() == (
        "| run | commit | arch | params | active | MACs/tok | FLOPs/tok | steps | tokens | train MACs | step time (s) "
        "| source | val ppl |\n|" + "---|" * 13 + "\n"
        "| a_dense | 1234567 | dense | 0.92M | 0.85M | 0.82M | 5.31M | 100 | 6.400e+03 | 5.243e+09 | 0.1 | tokens/s "
        "| 50.00 |\n"
        "| b_moe | - | moeut | 1.32M | 0.47M | 0.42M | 2.91M | 100 | 6.400e+03 | 2.684e+09 | 0.4 | measured | 40.00 |\n")
    assert (tmp_path / "c" / "summary.csv").read_text().splitlines()[1] == (
        "a_dense,1234567,dense,0.92M,0.85M,0.82M,5.31M,100,6.400e+03,5.243e+09,0.1,tokens/s,50.00")
    assert out["mac_budget"] == pytest.approx(2.684e9, rel=1e-3)
