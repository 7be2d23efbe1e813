"""The one figure style of the analysis package: every figure is made by `figure` and written by
`save`, so size, layout, resolution and formats are set in one place (no pyplot global state).
`save` also marks every point a line cannot show (`mark_lone_points`): a series of one record, or a
value between two gaps, is a line of length zero, which draws nothing."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Sequence, Tuple, Union

DPI = 130  # default resolution of written raster figures, dots per inch
FORMATS = ("png",)  # default formats written by `save`


def figure(figsize: Tuple[float, float] = (6.4, 4.2), nrows: int = 1, ncols: int = 1, **subplot_kw: Any):
    """A new Figure of `figsize` inches with an nrows x ncols grid of axes (constrained layout).
    Returns (fig, axes): a single Axes for 1 x 1, else the array matplotlib's `subplots` returns."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=True, **subplot_kw)
    return fig, axes


def lone_points(y: Any) -> List[int]:
    """Indices of the finite values of the 1-D sequence `y` with no finite neighbour on either side:
    the points a line through `y` does not draw."""
    import numpy as np

    ok = np.isfinite(np.asarray(y, dtype=float))
    before = np.concatenate([[False], ok[:-1]])
    after = np.concatenate([ok[1:], [False]])
    return [int(i) for i in np.flatnonzero(ok & ~before & ~after)]


def mark_lone_points(fig: Any, markersize: float = 4.0) -> int:
    """Give every line of `fig` that has a lone point (`lone_points` of its x and y together) and
    no marker a round marker on those points only, in the line's colour, so a series with one record
    shows up. Returns the number of lines changed."""
    import numpy as np

    changed = 0
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_marker() not in (None, "", " ", "None", "none"):
                continue
            xy = np.asarray(line.get_xydata(), dtype=float)
            if xy.ndim != 2 or not len(xy):
                continue
            idx = lone_points(np.where(np.isfinite(xy[:, 0]), xy[:, 1], np.nan))
            if idx:
                line.set_marker("o")
                line.set_markersize(markersize)
                line.set_markevery(idx)
                changed += 1
    return changed


def save(fig: Any, stem: Union[str, Path], formats: Sequence[str] = FORMATS, dpi: int = DPI) -> List[str]:
    """Write `fig` to `<stem>.<fmt>` for each of `formats` (png, pdf, svg) at `dpi`, lone points of
    its lines marked (`mark_lone_points`); creates the folder. Returns the written paths. Raises
    ValueError naming an unknown format."""
    mark_lone_points(fig)
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        if fmt not in ("png", "pdf", "svg"):
            raise ValueError(f"figure format: must be one of png | pdf | svg, got {fmt!r}")
        path = f"{stem}.{fmt}"
        fig.savefig(path, dpi=dpi, format=fmt)
        out.append(path)
    return out
