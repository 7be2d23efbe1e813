"""Sweep files (`sweeps/*.yaml`, docs/sweeps.md): the format `python -m moeut.sweep` reads, parsed and
checked into a `SweepFile` of `Grid`s; `load_sweep` names the file and the entry of every error."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from .paths import sweeps_dir as carried_sweeps_dir
from .validate import at_least

DEFAULT_SWEEPS_DIR = carried_sweeps_dir()  # the clone's sweeps/, or an installed wheel's copy


@dataclass
class Grid:
    """One `grids:` entry of a sweep file: Hydra multirun `overrides` (comma lists = Cartesian
    product), the conf/hydra/launcher preset that runs them, and an optional label."""

    overrides: List[str]
    launcher: str = "submitit_slurm_1gpu"
    name: Optional[str] = None


@dataclass
class SweepFile:
    """A parsed, validated sweep file (see the module docstring for the format): its grids, the
    overrides common to every job, the job count it promises, and the config key that groups its
    runs in wandb (`logger.group`)."""

    path: Path
    name: str
    description: str
    grids: List[Grid]
    common: List[str] = field(default_factory=list)
    expected_jobs: Optional[int] = field(default=None, metadata=at_least(1))  # checked in load_sweep
    wandb_group_key: str = "logger.group"


def _err(path: Path, msg: str) -> ValueError:
    return ValueError(f"sweep file {path}: {msg}")


def load_sweep(path: os.PathLike) -> SweepFile:
    """Parse and validate a sweep file; errors name the file and the field."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} not found")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as e:  # noqa: BLE001 - YAML syntax errors come with their line
        raise _err(path, f"not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise _err(path, "top level must be a mapping")
    known = {"name", "description", "grids", "common", "expected_jobs", "wandb_group_key", "paper"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise _err(path, f"unknown field(s) {unknown}; known: {sorted(known)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise _err(path, "field 'name' must be a non-empty string without '/'")

    def str_list(value: Any, where: str) -> List[str]:
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _err(path, f"field '{where}' must be a list of override strings")
        for v in value:
            if "=" not in v and not v.startswith("~"):
                raise _err(path, f"field '{where}': {v!r} is not a Hydra override (key=value)")
        return list(value)

    grids_raw = raw.get("grids")
    if not isinstance(grids_raw, list) or not grids_raw:
        raise _err(path, "field 'grids' must be a non-empty list")
    grids = []
    for i, g in enumerate(grids_raw):
        if not isinstance(g, dict):
            raise _err(path, f"grids[{i}] must be a mapping with 'overrides' (and 'launcher')")
        bad = sorted(set(g) - {"overrides", "launcher", "name"})
        if bad:
            raise _err(path, f"grids[{i}]: unknown field(s) {bad}")
        ov = str_list(g.get("overrides"), f"grids[{i}].overrides")
        if not ov:
            raise _err(path, f"grids[{i}].overrides is empty")
        for o in ov:
            if o.split("=", 1)[0].lstrip("+~").startswith("hydra"):
                raise _err(path, f"grids[{i}].overrides: {o!r}: hydra.* keys are set by the sweep "
                                 "tool (use 'launcher', or set=[...] on the command line)")
        grids.append(Grid(overrides=ov, launcher=str(g.get("launcher", "submitit_slurm_1gpu")),
                          name=g.get("name")))
    exp = raw.get("expected_jobs")
    if exp is not None and (not isinstance(exp, int) or exp < 1):
        raise _err(path, "field 'expected_jobs' must be a positive integer")
    return SweepFile(path=path, name=name, description=str(raw.get("description", "")).strip(),
                     grids=grids, common=str_list(raw.get("common"), "common"), expected_jobs=exp,
                     wandb_group_key=str(raw.get("wandb_group_key", "logger.group")))


def list_sweep_files(sweeps_dir: os.PathLike = DEFAULT_SWEEPS_DIR) -> List[Path]:
    """The `*.yaml` files of `sweeps_dir`, sorted by name (none: an empty list)."""
    return sorted(p for p in Path(sweeps_dir).glob("*.yaml") if p.is_file())
