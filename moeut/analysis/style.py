"""The one figure style of the analysis package: every figure is made by `figure` and written by
`save`, so size, layout, resolution and formats are set in one place (no pyplot global state)."""
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


def save(fig: Any, stem: Union[str, Path], formats: Sequence[str] = FORMATS, dpi: int = DPI) -> List[str]:
    """Write `fig` to `<stem>.<fmt>` for each of `formats` (png, pdf, svg) at `dpi`; creates the
    folder. Returns the written paths. Raises ValueError naming an unknown format."""
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
