"""Build step of the package (everything else is in pyproject.toml): a built wheel carries the
repository's `conf/`, `data/` and `sweeps/` inside the package, in `moeut/_carried/`, so that an
installed package (`pip install .`, a wheel, `pip install git+...`) runs every tool outside a clone;
`moeut/paths.py` looks there first (docs/architecture.md, "Installed, not cloned"). An editable
install (`pip install -e .`) copies nothing and keeps reading the checkout's directories.

Carried: every file under conf/ (except the git-ignored machine settings conf/local/), data/
(the embedded corpus, the C4 sample and whatever data/eval/ holds at build time; not the scripts
that made them) and the sweep grids sweeps/*.yaml (not the clone-only sbatch template).
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
CARRIED = "moeut/_carried"


def carried_files():
    """(source, path under moeut/_carried) for every file the wheel carries; raises FileNotFoundError
    when a carried directory is missing (a broken source tree must not build a broken wheel)."""
    out = []
    for top in ("conf", "data", "sweeps"):
        if not (HERE / top).is_dir():
            raise FileNotFoundError(f"setup.py: {HERE / top} is missing: the wheel carries conf/, data/ and sweeps/")
    for path in sorted((HERE / "conf").rglob("*")):
        rel = path.relative_to(HERE)
        if path.is_file() and rel.parts[1] != "local" and "__pycache__" not in rel.parts:
            out.append((path, rel))
    for path in sorted((HERE / "data").rglob("*")):
        rel = path.relative_to(HERE)
        if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in rel.parts:
            out.append((path, rel))
    out += [(p, p.relative_to(HERE)) for p in sorted((HERE / "sweeps").glob("*.yaml"))]
    return out


class BuildPyWithCarried(build_py):
    """`build_py` that also copies conf/, data/ and sweeps/ into `<build_lib>/moeut/_carried/`."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # pip install -e: paths.py reads the checkout
            return
        shutil.rmtree(Path(self.build_lib) / CARRIED, ignore_errors=True)  # nothing stale from a previous build
        for src, rel in carried_files():
            dst = Path(self.build_lib) / CARRIED / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)

    def get_outputs(self, include_bytecode=True):
        outs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            outs += [str(Path(self.build_lib) / CARRIED / rel) for _, rel in carried_files()]
        return outs


setup(cmdclass={"build_py": BuildPyWithCarried})
