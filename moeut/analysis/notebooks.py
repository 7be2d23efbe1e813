"""Headless execution of the analysis notebooks (analysis/*.py jupytext sources of the clone)
against one run directory, for `python -m moeut.analysis routing ... execute_notebooks=true`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence

from ..paths import clone_root


def is_notebook_source(path: str) -> bool:
    """A jupytext percent-format notebook source: a `# ---` YAML header holding a `jupytext:`
    section (what `jupytext --sync` writes). A plain script next to the notebooks has none."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(2000)
    except OSError:
        return False
    if not head.startswith("# ---\n"):
        return False
    header = head.split("\n# ---\n", 1)[0]
    return "\n# jupyter:" in header and "\n#   jupytext:" in header


def notebook_sources(folder: Optional[str] = None) -> List[str]:
    """The notebooks among `folder`/*.py (default: the repository's analysis/), sorted."""
    clone = clone_root()
    if not folder and clone is None:
        raise FileNotFoundError("execute_notebooks: the notebooks ship with the repository (analysis/), not with "
                                "an installed wheel; run from a clone")
    folder = Path(folder) if folder else clone / "analysis"
    if not folder.is_dir():
        raise FileNotFoundError(f"execute_notebooks: notebook folder {folder} does not exist (the notebooks ship "
                                f"with the repository, not with an installed wheel)")
    found = sorted(str(p) for p in folder.glob("*.py") if is_notebook_source(str(p)))
    if not found:
        raise FileNotFoundError(f"execute_notebooks: no jupytext notebook sources in {folder}")
    return found


def execute_notebooks(run_dir: str, out_dir: str, sources: Optional[Sequence[str]] = None,
                      timeout: int = 600) -> List[str]:
    """Execute the jupytext notebooks (`notebook_sources()`: analysis/*.py with a jupytext header,
    never the plain scripts there) headless with nbclient against `run_dir` (passed as
    MOEUT_RUN_DIR); executed copies are written to `out_dir` as .ipynb. Raises ValueError for a
    given source that is not a notebook, and nbclient's CellExecutionError for a failing cell."""
    import jupytext
    import nbclient
    srcs = list(sources) if sources else notebook_sources()
    not_nb = [s for s in srcs if not is_notebook_source(s)]
    if not_nb:
        raise ValueError(f"execute_notebooks: not jupytext notebook sources: {not_nb}")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    old = os.environ.get("MOEUT_RUN_DIR")
    os.environ["MOEUT_RUN_DIR"] = os.path.abspath(run_dir)
    try:
        for src in srcs:
            nb = jupytext.read(src)
            nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                    resources={"metadata": {"path": str(Path(src).parent)}}).execute()
            dst = os.path.join(out_dir, Path(src).stem + ".ipynb")
            jupytext.write(nb, dst)
            written.append(dst)
    finally:
        if old is None:
            os.environ.pop("MOEUT_RUN_DIR", None)
        else:
            os.environ["MOEUT_RUN_DIR"] = old
    return written
