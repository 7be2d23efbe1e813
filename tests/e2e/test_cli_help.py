"""Every command-line tool of the package is a Hydra app whose `--help` says what it does and
lists each of its options (issue 16, item 5: one config style).

For each tool, in a subprocess started in an empty working directory:
- `<tool> --cfg job` prints the composed config (exit 0); its top-level keys are the tool's
  options -- read from the composed config, not from a hand list here;
- `<tool> --help` exits 0 and, outside the config dump Hydra substitutes for `$CONFIG` (which
  names every key whatever the template says), has a line starting with each option's name: the
  option is listed, with its meaning, in the help template of the tool's conf file;
- neither leaves anything in the working directory (no outputs/, .hydra/ or log file).
A guard test finds every module with a `__main__` block, so a new tool cannot skip this, and
another that every tool of the package has a console script in pyproject.toml (`moeut-<tool>`;
tests/e2e/test_wheel.py runs them from an installed wheel); analysis/*.py are clone-only scripts.

The exception is moeut.eval.harness_cli: it passes its argv to lm-eval's own CLI (its docstring
and docs/evaluation.md say why); its --help is lm-eval's, after a block naming what the wrapper
adds (tests/unit/eval/test_lm_eval_tasks.py).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

# tool -> how to start it (argv after the interpreter)
TOOLS = {
    "train.py": ["train.py"],
    "moeut.train": ["-m", "moeut.train"],
    "moeut.evaluate": ["-m", "moeut.evaluate"],
    "moeut.prepare_data": ["-m", "moeut.prepare_data"],
    "moeut.analysis routing": ["-m", "moeut.analysis", "routing"],
    "moeut.sweep": ["-m", "moeut.sweep"],
    "moeut.hf.export": ["-m", "moeut.hf.export"],
    "moeut.tools.footprint": ["-m", "moeut.tools.footprint"],
    "moeut.tools.warmup": ["-m", "moeut.tools.warmup"],
    "moeut.analysis summary": ["-m", "moeut.analysis", "summary"],
    "moeut.analysis table": ["-m", "moeut.analysis", "table"],
    "moeut.analysis compare": ["-m", "moeut.analysis", "compare"],
    "moeut.analysis curves": ["-m", "moeut.analysis", "curves"],
    "moeut.analysis cpu-result": ["-m", "moeut.analysis", "cpu-result"],
}
# command-line modules that are deliberately not Hydra apps, and why
NOT_HYDRA = {"moeut/eval/harness_cli.py": "passes argv to lm-eval's own CLI"}


def _run(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = list(TOOLS[tool])
    if not argv[0].startswith("-"):  # a script path, relative to the repository
        argv[0] = str(REPO / argv[0])
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HYDRA_FULL_ERROR="1", COLUMNS="100")
    return subprocess.run([sys.executable, *argv, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


_OUTPUTS = {}


def tool_output(tool: str, *args: str):
    """`<tool> <args>` as `_run` starts it, run once per session in its own empty working directory
    (several tests read the same `--help` / `--cfg job` / error output: tests/unit/tools/test_tool_commands.py,
    tests/unit/model/test_configs.py, tests/unit/analysis/test_routing_command.py); returns
    (CompletedProcess, names the run left in that directory)."""
    key = (tool, *args)
    if key not in _OUTPUTS:
        cwd = Path(tempfile.mkdtemp(prefix="moeut_cli_"))
        try:
            res = _run(tool, *args, cwd=cwd)
            _OUTPUTS[key] = (res, sorted(p.name for p in cwd.iterdir()))
        finally:
            shutil.rmtree(cwd, ignore_errors=True)
    return _OUTPUTS[key]


def _module_path(argv0: list) -> str:
    if argv0[0] == "-m":
        mod = argv0[1].replace(".", "/")
        return f"{mod}/__main__.py" if (REPO / mod).is_dir() else f"{mod}.py"
    return argv0[0]


def test_every_command_line_module_is_covered():
    """Every module of moeut/, analysis/ and train.py with a `__main__` block is a tool checked
    below, or listed in NOT_HYDRA with its reason."""
    found = set()
    for path in [REPO / "train.py", *(REPO / "moeut").rglob("*.py"), *(REPO / "analysis").glob("*.py")]:
        if re.search(r"^if __name__ == ['\"]__main__['\"]", path.read_text(encoding="utf-8"), re.M):
            found.add(path.relative_to(REPO).as_posix())
    covered = {_module_path(argv) for argv in TOOLS.values()} | set(NOT_HYDRA)
    assert found - covered == set(), "command-line modules without a --help test"
    assert covered - found == set(), "listed tools that have no __main__ block"


def test_every_package_tool_has_a_console_script():
    """Every tool inside the package (TOOLS' `-m moeut...` entries, and NOT_HYDRA's modules) is the
    target of a `[project.scripts]` entry `<name> = "<module>:main"` of pyproject.toml, and every
    entry names one of them; the clone's scripts (train.py, analysis/*.py) have none."""
    from test_wheel import console_scripts

    package_tools = {argv[1] + (".__main__" if (REPO / argv[1].replace(".", "/")).is_dir() else "")
                     for argv in TOOLS.values() if argv[0] == "-m"}
    package_tools |= {m[:-3].replace("/", ".") for m in NOT_HYDRA}
    targets = {}
    for name, target in console_scripts().items():
        module, _, func = target.partition(":")
        assert func == "main" and name.startswith("moeut-"), (name, target)
        targets[module] = name
    assert sorted(package_tools - set(targets)) == [], "package tools without a console script"
    assert sorted(set(targets) - package_tools) == [], "console scripts of modules that are not tools"


@pytest.mark.parametrize("tool", list(TOOLS))
def test_help_lists_every_option(tool):
    """Also the documented `python train.py --cfg job` and `python -m <tool> --help` commands
    (tests/e2e/test_documented_commands.py: exit 0, no traceback)."""
    res, left = tool_output(tool, "--cfg", "job")
    assert res.returncode == 0, f"{tool} --cfg job:\n{res.stdout[-2000:]}{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr, f"{tool} --cfg job:\n{res.stderr[-3000:]}"
    assert left == [], f"{tool}: --cfg job left files in the working directory"
    dump = res.stdout
    options = list(yaml.safe_load(dump) or {})
    assert options, f"{tool}: empty config"

    res, left = tool_output(tool, "--help")
    assert res.returncode == 0, f"{tool} --help:\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr, f"{tool} --help:\n{res.stderr[-3000:]}"
    # e.g. runpy's "'moeut.eval.table' found in sys.modules after import of package 'moeut.eval'"
    assert "RuntimeWarning" not in res.stderr, f"{tool} --help warns:\n{res.stderr[-3000:]}"
    text = res.stdout
    assert "is powered by Hydra" not in text, f"{tool}: Hydra's default help, no help template"
    listing = text.replace(dump, "")  # the $CONFIG dump names every key: not a listing
    missing = [k for k in options if not re.search(rf"^[ \t]*[-*]?[ \t]*{re.escape(k)}\b", listing, re.M)]
    assert not missing, f"{tool} --help does not list option(s) {missing}:\n{listing}"
    assert left == [], f"{tool}: --help left files in the working directory"


@pytest.mark.parametrize("tool, args, message", [
    # (moeut.sweep action=go: tests/unit/tools/test_tool_commands.py checks its exact one-line error)
    ("moeut.hf.export", ["out=x"], "checkpoint: required"),
    ("moeut.tools.footprint", ["batch=many"], "batch: Value 'many' of type 'str' could not be converted to Integer"),
    ("moeut.tools.warmup", ["decode=maybe"], "decode: Value 'maybe' is not a valid bool"),
])
def test_bad_option_fails_naming_it_and_writes_nothing(tool, args, message, tmp_path):
    """A refused start: non-zero exit, a one-line error naming the option (no traceback), and no
    Hydra output folder or log file in the working directory."""
    res = _run(tool, *args, cwd=tmp_path)
    assert res.returncode != 0 and message in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []


# Bad configuration or input before any work: one line `<tool>: error: <message naming the option>`,
# exit status 1, no traceback, nothing written -- for every tool (moeut.cli.bad_input_exits and the
# typed option checks of moeut.cli). HYDRA_FULL_ERROR=1 in _run: Hydra would show any traceback.
@pytest.mark.parametrize("tool, args, message", [
    ("train.py", ["train.steps=-5", "hydra.run.dir=run"], "train.steps: must be >= 1, got -5"),
    ("train.py", ["train.steps=-5"], "train.steps: must be >= 1, got -5"),  # default runs/<name>/<time>
    ("moeut.train", ["train.steps=-5"], "train.steps: must be >= 1, got -5"),  # python -m moeut.train
    # a refused start found by train_lib.start.validated_start (inside `train`), not by to_typed
    ("train.py", ["experiment=cpu_tiny", "print_config=false", "train.resume=ckpt", "hydra.run.dir=run"],
     "no valid checkpoint in"),
    ("moeut.analysis routing", ["checkpoint=nope", "seq_len=0"], "seq_len: must be >= 1, got 0"),
    ("moeut.analysis routing", [], "checkpoint: required"),
    ("moeut.analysis routing", ["checkpoint=nope", "precision=bfloat16"], "precision: must be one of fp32 | bf16 | fp16"),
    ("moeut.analysis routing", ["checkpoint=nope", "device=gpu"], "device: must be auto | cpu | cuda | cuda:N"),
    # (moeut.prepare_data prepare.workers=-1: tests/unit/tools/test_tool_commands.py, exact line)
    ("moeut.analysis summary", ["dir=.", "plots=maybe"], "plots: Value 'maybe' is not a valid bool"),
    ("moeut.analysis summary", ["dir=nope"], "sweep dir nope does not exist"),
    ("moeut.analysis compare", ["runs=[x]", "plot=maybe"], "plot: Value 'maybe' is not a valid bool"),
    ("moeut.analysis compare", ["runs=[x]", "param_tol=-1"], "param_tol: must be >= 0, got -1"),
    ("moeut.analysis compare", ["runs=[x]", "dtype=float32"], "dtype: must be one of fp32 | bf16 | fp16"),
    ("moeut.analysis compare", ["runs=[x*]"], "runs: pattern 'x*' matches nothing"),
    ("moeut.analysis curves", ["runs=[x]", "out=[a,b]"], "out: "),
    ("moeut.analysis curves", ["runs=[x]", "out=o", "smooth=0"], "smooth: must be >= 1, got 0"),
    ("moeut.analysis table", ["results=[x.json]", "out=[a,b]"], "out: "),
    ("moeut.analysis table", ["results=[x.json]"], "x.json"),
    ("moeut.analysis cpu-result", ["root=nope"], "root: nope is not a directory"),
    ("moeut.analysis cpu-result", ["root=.", "doc=nope.md"], "doc: nope.md is not a file"),
])
def test_bad_input_is_one_line_exit_1(tool, args, message, tmp_path):
    if "train.resume=ckpt" in args:
        (tmp_path / "ckpt").mkdir()  # exists, holds no checkpoint
        before = sorted(p.name for p in tmp_path.iterdir())
        res = _run(tool, *args, cwd=tmp_path)
        left = sorted(p.name for p in tmp_path.iterdir())
    else:  # an empty working directory: the one run of this command line (other tests read it too)
        before = []
        res, left = tool_output(tool, *args)
    name = tool[:-3] if tool.startswith("analysis/") else tool
    name = name.split("/")[-1]
    assert res.returncode == 1, (res.returncode, res.stderr[-3000:])
    assert f"{name}: error: " in res.stderr and message in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert left == before  # no run dir, output or log file


def test_train_help_shortcut_prints_what_hydras_help_would():
    """train.py --help prints the hydra/help node's template through string.Template, as Hydra's
    own help does, without Hydra (moeut.train.main): exact when the template has no `$NAME`
    placeholder for Hydra to fill (every `$` of the generated text is doubled)."""
    import string
    from hydra.core.config_store import ConfigStore
    import moeut.train  # noqa: F401 - registers the help node
    template = ConfigStore.instance().repo["hydra"]["help"]["train.yaml"].node.template
    assert string.Template(template).get_identifiers() == []
    text = string.Template(template).substitute()
    assert text.startswith("Train a language model")
    assert "  model.router_zloss=FLOAT " in text and "sigmoid router z-loss weight on the sigma-MoE gate" in text
    assert "$$" not in text and "${" in text  # Hydra's "$$" and OmegaConf's "\\${" escapes are undone


def test_every_model_field_has_its_meaning_in_the_help():
    """train.py --help gives each model field a meaning: every field of the built-in architectures
    has an entry in MODEL_FIELD_HELP (a new field without one fails here), and no entry is stale."""
    import dataclasses
    from moeut.train_lib.config import MODEL_FIELD_HELP, ModelSchema, train_help
    names = {f.name for f in dataclasses.fields(ModelSchema)} - {"preset", "overrides"}
    assert names == set(MODEL_FIELD_HELP)
    lines = train_help("train.py").splitlines()
    for name in names:
        (line,) = [ln for ln in lines if ln.startswith(f"  model.{name}=")]
        assert MODEL_FIELD_HELP[name] in line and line.endswith("[default: the preset's]")
