"""Where the package finds the files it carries: the Hydra configs (`conf/`), the embedded data
(`data/`: the default corpus and the carried zero-shot subsets) and the sweep grids (`sweeps/`).

In a clone (and an editable install, `pip install -e .`) they lie at the repository root; a built
wheel (`pip install .`, `pip install git+...`) carries copies inside the package, in
`moeut/_carried/{conf,data,sweeps}` (written by setup.py's build step). The carried copy is
looked for first: when it exists, this is an installed package. Every reader asks these functions
instead of building paths from `__file__` (docs/architecture.md, "Installed, not cloned").
No torch import.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

PACKAGE_DIR = Path(__file__).resolve().parent
CARRIED_DIR = PACKAGE_DIR / "_carried"  # what a built wheel carries (setup.py, BuildPyWithCarried)
REPO_ROOT = PACKAGE_DIR.parent  # the checkout's root in a clone (meaningless in an installed wheel)


def installed() -> bool:
    """Whether this is a built, installed package (it carries `_carried/conf`), not a clone or an
    editable install reading the checkout."""
    return (CARRIED_DIR / "conf").is_dir()


def root() -> Path:
    """The directory holding `conf/`, `data/` and `sweeps/`: the package's carried copy when
    installed, else the repository root."""
    return CARRIED_DIR if installed() else REPO_ROOT


def clone_root() -> Optional[Path]:
    """The repository root of a clone or editable install (where `train.py` and `analysis/` are),
    or None for an installed wheel, which carries neither."""
    return None if installed() else REPO_ROOT


def conf_dir() -> Path:
    """The directory of every tool's Hydra config (`config.yaml` and its config groups, ...)."""
    return root() / "conf"


def data_dir() -> Path:
    """The directory of the carried data (`books/`, `c4_sample/`, `eval/`; data/README.md)."""
    return root() / "data"


def sweeps_dir() -> Path:
    """The directory of the paper's sweep grids (`sweeps/*.yaml`, read by `moeut.sweep`)."""
    return root() / "sweeps"


def cache_dir() -> Path:
    """The default token-cache directory (`data.cache_dir` when `$MOEUT_CACHE` is unset): the
    checkout's `data_cache/` in a clone; for an installed wheel, which must not write into
    site-packages, `$XDG_CACHE_HOME/moeut/data_cache` (default `~/.cache/moeut/data_cache`)."""
    if not installed():
        return REPO_ROOT / "data_cache"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moeut" / "data_cache"
