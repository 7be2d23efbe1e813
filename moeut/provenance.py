"""Provenance of a run: what code, packages and command made it (docs/training.md "Provenance").

`record_provenance` appends one JSON line per start (first start and every resume) to
<run dir>/provenance.jsonl: time, the step it starts from, the command line (sys.argv), cwd,
hostname, SLURM job id, Python and package versions, and the git state of the checkout the
`moeut` package was imported from (commit, dirty flag; the diff against HEAD, when dirty, in
provenance/diff_<n>.patch). An installed package (no git checkout) records git: null and why.
`moeut.rundir.commit_label` is the short form the summary and compare tables show.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .rundir import PROVENANCE_FILE, commit_label, read_jsonl

PACKAGES = ("moeut", "torch", "triton", "numpy", "hydra-core", "omegaconf", "sentencepiece", "wandb",
            "datasets", "transformers", "lm_eval")


def package_versions() -> Dict[str, Optional[str]]:
    """{distribution name: installed version, or None when it is not installed} for PACKAGES."""
    out: Dict[str, Optional[str]] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                          timeout=60).stdout


def git_state(root: Optional[Path] = None) -> Dict[str, Any]:
    """{"commit", "dirty", "status" (git status --porcelain lines), "diff" (git diff HEAD, text)} of the
    git checkout at `root` (default: the directory holding the imported moeut package); or
    {"error": reason} when it is not the top of a git checkout or git is missing."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    try:
        top = Path(_git(root, "rev-parse", "--show-toplevel").strip()).resolve()
        if top != root.resolve():  # an installed package inside some other repository
            return {"error": f"{root} is not the top of a git checkout (git top: {top})"}
        commit = _git(root, "rev-parse", "HEAD").strip()
        status = [ln for ln in _git(root, "status", "--porcelain").splitlines() if ln]
        diff = _git(root, "diff", "HEAD") if status else ""
    except FileNotFoundError:
        return {"error": "git is not installed"}
    except subprocess.CalledProcessError as e:
        first = (e.stderr or "").strip().splitlines()[:1]
        return {"error": f"{root}: not a git checkout" + (f" ({first[0]})" if first else "")}
    return {"commit": commit, "dirty": bool(status), "status": status, "diff": diff}


def collect(step: int = 0, root: Optional[Path] = None) -> Dict[str, Any]:
    """One provenance record (see the module docstring); the diff text stays under git.diff."""
    g = git_state(root)
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "start_step": step,
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "hostname": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "packages": package_versions(),
        "git": None if "error" in g else g,
        "git_error": g.get("error"),
    }


def record_provenance(run_dir: str, step: int = 0, log: Callable[[str], None] = lambda s: None,
                      root: Optional[Path] = None) -> Dict[str, Any]:
    """Append `collect(step)` to <run_dir>/provenance.jsonl (the diff, when dirty, written to
    provenance/diff_<n>.patch and named in the record's git.diff_file); returns the record."""
    rec = collect(step, root)
    prev = read_provenance(run_dir)
    if rec["git"] is not None:
        diff = rec["git"].pop("diff")
        if rec["git"]["dirty"]:
            name = os.path.join("provenance", f"diff_{len(prev) + 1}.patch")
            os.makedirs(os.path.join(run_dir, "provenance"), exist_ok=True)
            with open(os.path.join(run_dir, name), "w") as f:
                f.write(diff)
            rec["git"]["diff_file"] = name
        log(f"[provenance] commit {commit_label([rec])}")
    else:
        log(f"[provenance] no git commit recorded: {rec['git_error']}; moeut {rec['packages'].get('moeut')}")
    with open(os.path.join(run_dir, PROVENANCE_FILE), "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def read_provenance(run_dir) -> List[Dict[str, Any]]:
    """The records of <run_dir>/provenance.jsonl, oldest first ([] when there is none). A damaged
    line raises moeut.rundir.CorruptRunFile naming file:line."""
    path = Path(run_dir) / PROVENANCE_FILE
    if not path.exists():
        return []
    return list(read_jsonl(path).records)
