"""Installed, not cloned: the package built as a wheel and installed into a fresh environment runs
every console script outside a clone (docs/architecture.md, "Installed, not cloned").

One build per session (module fixture): a copy of the source tree is built with
`pip wheel --no-deps --no-build-isolation` (no network), installed with `pip install --no-deps`
into a fresh venv that sees this environment's packages (torch, Hydra, ...: `_venv`),
and every command runs from an empty directory outside the clone with PYTHONPATH unset. Checked:
- the venv imports the wheel's moeut (not this checkout, not an editable install of another one),
  whose conf/, data/ and sweeps/ are the carried copies, byte for byte the repository's files;
- every console script of pyproject's [project.scripts] answers `--help` (exit 0, each option of
  its conf file listed) and `moeut-sweep action=list` lists the carried sweep grids;
- `moeut-train` trains 3 steps on the carried C4 sample into runs/ under the working directory,
  its token cache under $XDG_CACHE_HOME/moeut (nothing is written into site-packages), and
  `moeut-evaluate` scores a text file with that checkpoint;
- an editable install (`pip install -e`) still reads the checkout's conf/ and data/;
- a wheel built from the sdist (`python -m build`'s route) carries the same files.
Marked `wheel` (about a minute and a half on 2 cores): `-m "not wheel"` deselects it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.wheel

# what the build must not copy from the checkout (git-ignored outputs) and does not need
IGNORED = ("_carried", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "runs", "outputs",
           "multirun", "data_cache", "wandb", "exports", "tests", "docs")
# console script -> the conf file its --help documents, or the "module:Schema" of a typed tool
# (moeut.cli.typed_tool); None: lm-eval's own argparse help; ANALYSIS: the analysis command's list of
# subcommands, then each subcommand's generated --help
SCRIPT_CONF = {"moeut-train": "config", "moeut-prepare-data": "config", "moeut-evaluate": "moeut.evaluate:EvaluateOptions",
               "moeut-hf-export": "moeut.hf.export:HFExportOptions", "moeut-analysis": "ANALYSIS",
               "moeut-sweep": "moeut.sweep:SweepOptions",
               "moeut-footprint": "moeut.tools.footprint:FootprintOptions",
               "moeut-warmup": "moeut.tools.warmup:WarmupOptions", "moeut-lm-eval": None}


def console_scripts() -> dict:
    """pyproject.toml's [project.scripts] as {name: "module:function"} (read as text: tomllib is 3.11+)."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S).group(1)
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', section, re.M))


def expected_carried() -> dict:
    """{path under moeut/_carried: sha256} of what the wheel must carry, from the checkout:
    conf/ (less the git-ignored conf/local/), data/ less its scripts, sweeps/*.yaml."""
    files = [p for p in (REPO / "conf").rglob("*") if p.is_file() and "local" != p.relative_to(REPO).parts[1]]
    files += [p for p in (REPO / "data").rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")]
    files += list((REPO / "sweeps").glob("*.yaml"))
    return {p.relative_to(REPO).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files if "__pycache__" not in p.parts}


def _run(argv, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _venv(path: Path, tmp: Path, env: dict, *pip_args: str) -> Path:
    """A fresh venv that sees this environment's packages (torch, Hydra, pip, ...), with
    `pip install --no-deps --no-index <pip_args>` run in it; its python.

    Not `--system-site-packages`: under a venv (CI) that would be the base interpreter's packages.
    A .pth file lists this environment's site directories instead, after the venv's own; their .pth
    files are not run, so an editable install of moeut here cannot shadow the one under test."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    (own,) = (path / "lib").glob("python*/site-packages")
    outer = [p for p in sys.path if p.rstrip(os.sep).endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]
    assert outer, f"no site-packages directory on sys.path: {sys.path}"
    (own / "_outer_environment.pth").write_text("\n".join(outer) + "\n", encoding="utf-8")
    python = path / "bin" / "python"
    res = _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall",
                "--disable-pip-version-check", *pip_args], cwd=tmp, env=env)
    assert res.returncode == 0, f"pip install {' '.join(pip_args)}:\n{res.stdout[-3000:]}{res.stderr[-3000:]}"
    return python


@pytest.fixture(scope="module")
def clean_env():
    """The environment of every command: no PYTHONPATH (the checkout must not be importable), no
    MOEUT_* paths, no user site, CPU threads kept low."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "MOEUT_CACHE", "MOEUT_DATA", "MOEUT_SHARED", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled", MPLBACKEND="Agg",
               HYDRA_FULL_ERROR="1", COLUMNS="100")
    return env


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(source copy, wheel path): the checkout copied (git-ignored outputs left out) and built."""
    pytest.importorskip("setuptools", reason="building the wheel without network needs setuptools>=68 "
                                             "(in the [dev] extras)")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*IGNORED))
    res = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                "--disable-pip-version-check", "-w", str(tmp / "dist"), str(src)], cwd=tmp, env=dict(os.environ))
    assert res.returncode == 0, f"pip wheel:\n{res.stdout[-3000:]}{res.stderr[-3000:]}"
    (wheel,) = (tmp / "dist").glob("moeut-*.whl")
    return src, wheel


@pytest.fixture(scope="module")
def installed(built, tmp_path_factory, clean_env):
    """(venv bin dir, empty working directory outside the clone, env): the wheel installed into a fresh venv."""
    _, wheel = built
    tmp = tmp_path_factory.mktemp("installed")
    python = _venv(tmp / "venv", tmp, clean_env, str(wheel))
    env = dict(clean_env, XDG_CACHE_HOME=str(tmp / "xdg"))
    cwd = tmp / "work"
    cwd.mkdir()
    res = _run([str(python), "-c", "import moeut, moeut.paths as p; print(moeut.__file__); print(p.installed()); "
                                   "print(p.conf_dir()); print(p.data_dir()); print(p.sweeps_dir())"], cwd, env)
    assert res.returncode == 0, res.stderr[-3000:]
    file, inst, *dirs = res.stdout.split("\n")[:5]
    site = tmp / "venv" / "lib"
    assert Path(file).resolve().is_relative_to(site.resolve()), (
        f"the venv imports moeut from {file}, not from the installed wheel under {site}: an editable install "
        f"or a path entry of this environment shadows it (check the .pth files of the system site-packages)")
    assert inst == "True", "moeut.paths.installed() is False in the installed wheel"
    for d, name in zip(dirs, ("conf", "data", "sweeps")):
        assert Path(d) == Path(file).parent / "_carried" / name, (name, d)
    return tmp / "venv" / "bin", cwd, env


def test_the_wheel_carries_conf_data_and_sweeps_byte_for_byte(built, installed):
    bin_dir, _, _ = installed
    carried = next((bin_dir.parent / "lib").glob("python*/site-packages/moeut/_carried"))
    got = {p.relative_to(carried).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
           for p in carried.rglob("*") if p.is_file()}
    want = expected_carried()
    assert "data/books/train.jsonl.gz" in want and "conf/config.yaml" in want and "sweeps/main_table.yaml" in want
    assert sorted(set(want) - set(got)) == [], "files of the checkout missing from the wheel"
    assert sorted(set(got) - set(want)) == [], "files in the wheel that the checkout does not have"
    assert [k for k in want if want[k] != got[k]] == [], "carried files differ from the checkout's"


def _carried_in(wheel: Path) -> dict:
    """{name: CRC} of the wheel's moeut/_carried/ files."""
    with zipfile.ZipFile(wheel) as z:
        return {i.filename: i.CRC for i in z.infolist() if i.filename.startswith("moeut/_carried/")}


def test_the_source_distribution_builds_the_same_wheel(built, tmp_path):
    """The route of `python -m build` (an sdist, then a wheel from it): the sdist holds conf/,
    data/ and sweeps/ (MANIFEST.in), so its wheel carries exactly what the direct build carries."""
    src, wheel = built
    res = _run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                                      "print(b.build_sdist(sys.argv[1]))", str(tmp_path / "sdist")],
               cwd=src, env=dict(os.environ))
    assert res.returncode == 0, f"build_sdist:\n{res.stdout[-3000:]}{res.stderr[-3000:]}"
    (sdist,) = (tmp_path / "sdist").glob("moeut-*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (tree,) = (tmp_path / "unpacked").iterdir()
    res = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                "--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(tree)], cwd=tmp_path,
               env=dict(os.environ))
    assert res.returncode == 0, f"pip wheel (from the sdist):\n{res.stdout[-3000:]}{res.stderr[-3000:]}"
    (from_sdist,) = (tmp_path / "dist").glob("moeut-*.whl")
    direct = _carried_in(wheel)
    assert len(direct) == len(expected_carried()) and _carried_in(from_sdist) == direct


def _help_listing(text: str) -> str:
    return text.split("== Current config ==", 1)[0]


def test_every_console_script_answers_help_outside_the_clone(installed):
    """Each script of [project.scripts] (the list here must match pyproject's) exits 0 on --help and
    lists every option of its conf file or schema; `moeut-sweep action=list` finds the carried grids. Run
    side by side (each is mostly the import of torch)."""
    bin_dir, cwd, env = installed
    scripts = console_scripts()
    assert sorted(scripts) == sorted(SCRIPT_CONF), "pyproject's console scripts changed: update SCRIPT_CONF"
    jobs = {name: [str(bin_dir / name), "--help"] for name in scripts}
    jobs["sweep list"] = [str(bin_dir / "moeut-sweep"), "action=list"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(jobs, pool.map(lambda argv: _run(argv, cwd, env), jobs.values())))
    for name in scripts:
        res = results[name]
        assert res.returncode == 0, f"{name} --help: exit {res.returncode}\n{res.stdout[-2000:]}{res.stderr[-3000:]}"
        conf = SCRIPT_CONF[name]
        if conf == "ANALYSIS":  # the subcommands, each listed; moeut.analysis's own tests check their --help
            from moeut.analysis.__main__ import SUBCOMMANDS
            assert all(re.search(rf"^  {re.escape(sub)}\b", res.stdout, re.M) for sub in SUBCOMMANDS), res.stdout
            continue
        if conf is None:  # lm-eval's argparse help, after the wrapper registered the moeut model
            assert "usage: lm-eval" in res.stdout and re.search(r"^\s+run\b", res.stdout, re.M), res.stdout[-2000:]
            continue
        if ":" in conf:  # a typed tool: the schema's options
            import importlib
            from moeut.cli import schema_options
            module, _, cls = conf.partition(":")
            options = [row[0] for row in schema_options(getattr(importlib.import_module(module), cls))]
        else:
            raw = yaml.safe_load((REPO / "conf" / f"{conf}.yaml").read_text(encoding="utf-8"))
            options = [k for k in raw if k not in ("defaults", "hydra")]
        if conf == "config":  # training: the config groups are its options too
            options += ["experiment", "model", "data", "optim", "train", "logger"]
        if name == "moeut-prepare-data":
            options.append("prepare")
        assert options, name
        listing = _help_listing(res.stdout)
        missing = [k for k in options if not re.search(rf"^[ \t]*[-*]?[ \t]*{re.escape(k)}\b", listing, re.M)]
        assert not missing, f"{name} --help does not list {missing}:\n{listing}"
    res = results["sweep list"]
    assert res.returncode == 0, res.stderr[-3000:]
    for grid in (p.stem for p in (REPO / "sweeps").glob("*.yaml")):
        assert grid in res.stdout, f"moeut-sweep action=list does not list {grid}:\n{res.stdout}"
    assert sorted(p.name for p in cwd.iterdir()) == [], "--help / list left files in the working directory"


def test_train_then_evaluate_outside_the_clone(installed):
    """moeut-train: 3 steps on the carried C4 sample into runs/ under the working directory (token
    cache under $XDG_CACHE_HOME/moeut, nothing written into the package); moeut-evaluate: the text
    perplexity of a file with that checkpoint."""
    bin_dir, cwd, env = installed
    site_pkg = next((bin_dir.parent / "lib").glob("python*/site-packages/moeut"))
    before = sorted(str(p) for p in site_pkg.rglob("*") if "__pycache__" not in p.parts)
    res = _run([str(bin_dir / "moeut-train"), "experiment=cpu_tiny", "train.steps=3", "train.save_interval=3",
                "data.valid_tokens=1024", "print_config=false"], cwd, env)
    assert res.returncode == 0, f"moeut-train:\n{res.stdout[-3000:]}{res.stderr[-3000:]}"
    (run,) = (cwd / "runs" / "cpu_tiny").iterdir()  # Hydra's run.dir, relative to the working directory
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(m.get("step", 0) for m in metrics) == 3
    assert (run / "checkpoints" / "step_0000003" / "model.pt").is_file()
    cfg = yaml.safe_load((run / "checkpoints" / "step_0000003" / "config.yaml").read_text())
    assert cfg["data"]["path"] == str(site_pkg / "_carried" / "data" / "c4_sample" / "train.jsonl.gz")
    assert cfg["data"]["cache_dir"] == str(Path(env["XDG_CACHE_HOME"]) / "moeut" / "data_cache")
    assert any(Path(cfg["data"]["cache_dir"]).glob("tokens/*/manifest.json")), "no token cache under XDG_CACHE_HOME"
    after = sorted(str(p) for p in site_pkg.rglob("*") if "__pycache__" not in p.parts)
    assert after == before, f"training wrote into the installed package: {sorted(set(after) - set(before))}"

    text = cwd / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. It was a bright cold day in April.\n\n"
                    "A second paragraph of plain text, scored for its perplexity.\n", encoding="utf-8")
    res = _run([str(bin_dir / "moeut-evaluate"), f"checkpoint={run}", "tasks=[perplexity]",
                f"perplexity.path={text}"], cwd, env)
    assert res.returncode == 0, f"moeut-evaluate:\n{res.stdout[-3000:]}{res.stderr[-3000:]}"
    (results,) = (run / "eval").glob("results_step_0000003.json")
    scores = json.loads(results.read_text())
    assert scores["step"] == 3 and scores["run_dir"] == str(run)
    s = scores["tasks"]["perplexity"]
    # perplexity and bits per byte from the summed NLL (nats), by hand
    assert s["n_tokens"] > 0 and s["n_bytes"] > 0 and math.isfinite(s["nll"]) and s["nll"] > 0
    assert s["perplexity"] == pytest.approx(math.exp(s["nll"] / s["n_tokens"]), rel=1e-9)
    assert s["bits_per_byte"] == pytest.approx(s["nll"] / (s["n_bytes"] * math.log(2)), rel=1e-9)
    assert sorted(p.name for p in cwd.iterdir()) == ["runs", "text.txt"], "files outside runs/ in the working directory"


def test_editable_install_reads_the_checkout(built, tmp_path, clean_env):
    """`pip install -e` (README, CI) copies nothing into the package: conf/, data/, sweeps/ are the
    checkout's own, and `python train.py` keeps its repository-relative config."""
    src, _ = built
    python = _venv(tmp_path / "venv", tmp_path, clean_env, "--no-build-isolation", "-e", str(src))
    res = _run([str(python), "-c", "import moeut, moeut.paths as p; print(moeut.__file__); print(p.installed()); "
                                   "print(p.conf_dir()); print(p.data_dir()); print(p.sweeps_dir())"],
               tmp_path, clean_env)
    assert res.returncode == 0, res.stderr[-3000:]
    file, inst, conf, data, sweeps = res.stdout.split("\n")[:5]
    assert Path(file) == src / "moeut" / "__init__.py", f"the editable venv imports moeut from {file}"
    assert inst == "False" and not (src / "moeut" / "_carried").exists()
    assert (Path(conf), Path(data), Path(sweeps)) == (src / "conf", src / "data", src / "sweeps")


def test_sweep_launches_the_package_entry_point_when_installed(monkeypatch, tmp_path):
    """An installed wheel has no train.py: `moeut.sweep` runs `python -m moeut.train -m ...` in the
    working directory (a clone keeps `python train.py -m ...` in its root), and prints it so."""
    import moeut.sweep as sw

    f = tmp_path / "s.yaml"
    f.write_text("name: s\nexpected_jobs: 2\ngrids:\n  - overrides: ['model=tiny,dense_tiny']\n")
    sweep = sw.load_sweep(f)
    clone = sw.grid_command(sweep, 0, "out", True, None, [])
    assert clone[:3] == [sys.executable, "train.py", "-m"] and sw.shown_command(clone).startswith("train.py -m ")
    monkeypatch.setattr(sw, "clone_root", lambda: None)
    inst = sw.grid_command(sweep, 0, "out", True, None, [])
    assert inst[:4] == [sys.executable, "-m", "moeut.train", "-m"] and inst[4:] == clone[3:]
    assert sw.shown_command(inst).startswith("python -m moeut.train -m model=tiny,dense_tiny ")
