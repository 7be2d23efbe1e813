"""Where the package finds the files it carries: the Hydra configs (`conf/`) and the embedded data
(`data/`: the default corpus and the carried zero-shot subsets).

In a clone both lie at the repository root; an installed wheel carries them inside the package
(see docs/architecture.md, "Installed, not cloned"). Every reader asks these functions instead of
building paths from `__file__`. No torch import.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent  # the checkout's root in a clone (meaningless in an installed wheel)


def conf_dir() -> Path:
    """The directory of every tool's Hydra config (`config.yaml`, `eval.yaml`, ...)."""
    return REPO_ROOT / "conf"


def data_dir() -> Path:
    """The directory of the carried data (`books/`, `c4_sample/`, `eval/`; data/README.md)."""
    return REPO_ROOT / "data"
