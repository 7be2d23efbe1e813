"""The routing report and the expert analyses share report.md / report.html: rewriting the routing
report keeps every other analysis's named section (moeut.analysis.sections.carry_sections)."""
from moeut.analysis import sections
from moeut.analysis.report import write_report


def test_carry_sections_keeps_what_the_new_page_lacks():
    old = "# A\n\n<!-- section:x -->\nX body\n<!-- /section:x -->\n<!-- section:y -->\nY\n<!-- /section:y -->\n"
    new = "# B\n\n<!-- section:y -->\nnew Y\n<!-- /section:y -->\n"
    out = sections.carry_sections(old, new)
    assert out == new + "<!-- section:x -->\nX body\n<!-- /section:x -->\n"
    assert sections.carry_sections("", new) == new  # nothing to carry: the page as written
    html = sections.carry_sections("<body><!-- section:x -->\n<p>x</p>\n<!-- /section:x --></body>",
                                   "<html><body><h1>r</h1></body></html>")
    assert html == "<html><body><h1>r</h1><!-- section:x -->\n<p>x</p>\n<!-- /section:x -->\n</body></html>"


def test_routing_report_after_a_section_keeps_it(tmp_path):
    sections.write_section(str(tmp_path), "sources", "By source", ["NMI 0.1"], run="r")
    meta = {"checkpoint": "c", "step": 1, "data_path": "d", "n_tokens": 10, "n_windows": 1, "seq_len": 10,
            "val_ppl": 2.0, "n_groups": 2, "n_repeats": 2, "n_experts": 8, "k": 2}
    md, html = write_report(str(tmp_path), [], meta, "r")
    for path in (md, html):
        text = open(path, encoding="utf-8").read()
        assert "<!-- section:sources -->" in text and "NMI 0.1" in text, path
    assert open(md, encoding="utf-8").read().count("<!-- section:sources -->") == 1
