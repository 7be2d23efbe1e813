"""A line draws nothing at a point with no finite neighbour (a series of one record, a value between
gaps); moeut.analysis.style.save marks exactly those points, so the routing report's training-metrics
figure of a run with one routing record shows its points (artist properties and the written pixels)."""
import math

import numpy as np
import pytest
from matplotlib.image import imread

from moeut.analysis import style
from moeut.analysis.figures import plot_training_metrics

NAN = math.nan
C0 = np.array([0x1F, 0x77, 0xB4]) / 255  # matplotlib's first line colour


@pytest.mark.parametrize("y, lone", [([1.0], [0]), ([1.0, 2.0], []), ([NAN, 1.0, NAN, 2.0, 3.0], [1]),
                                     ([1.0, NAN, 2.0], [0, 2]), ([NAN, NAN], []), ([], [])])
def test_lone_points_by_hand(y, lone):
    assert style.lone_points(y) == lone


def _c0_pixels(path):
    img = imread(path)[..., :3]
    return int((np.abs(img - C0).max(-1) < 0.08).sum())


def test_one_routing_record_is_drawn(tmp_path):
    rows = [{"step": 40, "moe/dead_frac": 0.25}]  # one panel, one series ("all"), no legend
    fig = plot_training_metrics(rows, "run")
    (line,) = fig.axes[0].get_lines()
    assert line.get_marker() in ("None", "", None)  # as plotted: a line of one point, nothing drawn
    bare = style.figure()[0]  # the same line, saved without the marking: no pixel of its colour
    bare.axes[0].plot([40.0], [0.25])
    bare.savefig(tmp_path / "bare.png", dpi=60)
    assert _c0_pixels(tmp_path / "bare.png") == 0
    (path,) = style.save(fig, tmp_path / "metrics", dpi=60)
    assert line.get_marker() == "o" and line.get_markevery() == [0] and line.get_visible()
    assert line.get_markersize() > 0 and line.get_markerfacecolor() == line.get_color()
    assert _c0_pixels(path) > 5


def test_several_groups_one_record_each(tmp_path):
    rows = [{"step": 10, "moe/g0/usage_rel_ppl": 0.9, "moe/g1/usage_rel_ppl": 0.7, "moe/g0/dead_frac": 0.0}]
    fig = plot_training_metrics(rows, "run")
    style.save(fig, tmp_path / "metrics", dpi=40)
    lines = [ln for ax in fig.axes for ln in ax.get_lines()]
    assert len(lines) == 3 and all(ln.get_marker() == "o" and ln.get_markevery() == [0] for ln in lines)


def test_connected_lines_keep_no_marker_and_a_gap_marks_only_its_lone_point(tmp_path):
    fig, ax = style.figure()
    (full,) = ax.plot([0, 1, 2], [1.0, 2.0, 3.0])
    (gappy,) = ax.plot([0, 1, 2, 3, 4], [1.0, NAN, 2.0, NAN, NAN])  # 0 and 2 are lone points
    (styled,) = ax.plot([5], [1.0], "s")  # a marker chosen by the caller stays
    style.save(fig, tmp_path / "f", dpi=20)
    assert full.get_marker() in ("None", "", None)
    assert gappy.get_marker() == "o" and gappy.get_markevery() == [0, 2]
    assert styled.get_marker() == "s" and styled.get_markevery() is None
