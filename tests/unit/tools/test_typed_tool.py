"""moeut.cli.typed_tool: the one tool style (schema -> Hydra config, generated --help, one-line
errors with exit status 1), exercised through a small tool run as a separate process."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moeut.cli import help_text, option, schema_options

ROOT = Path(__file__).resolve().parents[3]

TOOL = textwrap.dedent('''
    from dataclasses import dataclass, field
    from typing import List, Optional
    from moeut.cli import REQUIRED, option, typed_tool

    @dataclass
    class Inner:
        dpi: int = option(120, help="figure resolution", lo=1)

    @dataclass
    class Schema:
        dir: str = option(REQUIRED, help="a run dir")
        batch: int = option(16, help="sequences per batch", lo=1)
        frac: float = option(0.5, help="a fraction", lo=0, hi=1)
        dtype: str = option("fp32", help="precision", choices=["fp32", "bf16"])
        tasks: List[str] = option(default_factory=lambda: ["a", "b"], help="task names")
        out: Optional[str] = option(None, help="output folder")
        figures: Inner = field(default_factory=Inner)

    @typed_tool("demo.tool", Schema, summary="A demo tool.", usage="python demo.py dir=PATH")
    def main(opts):
        print("RESULT", type(opts).__name__, opts.dir, opts.batch, opts.frac, opts.dtype, opts.tasks, opts.out, opts.figures.dpi)

    if __name__ == "__main__":
        main()
''')


def _run(tmp_path, *args):
    script = tmp_path / "demo.py"
    script.write_text(TOOL)
    env_path = str(ROOT)
    import os
    env = dict(os.environ, PYTHONPATH=env_path)
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, cwd=tmp_path)


def test_good_run_gets_typed_options(tmp_path):
    r = _run(tmp_path, "dir=x", "batch=4", "dtype=bf16", "figures.dpi=10", "tasks=[c]")
    assert r.returncode == 0, r.stderr
    assert "RESULT Schema x 4 0.5 bf16 ['c'] None 10" in r.stdout
    assert not list(tmp_path.glob("outputs")) and not list(tmp_path.glob(".hydra"))  # nothing written


@pytest.mark.parametrize("args, line", [
    ((), "demo.tool: error: dir: required: pass dir=<value> (demo.tool --help lists the options)"),
    (("dir=x", "batch=0"), "demo.tool: error: batch: must be >= 1, got 0"),
    (("dir=x", "frac=2"), "demo.tool: error: frac: must be in [0, 1], got 2.0"),
    (("dir=x", "dtype=float32"), "demo.tool: error: dtype: must be one of fp32 | bf16, got 'float32'"),
    (("dir=x", "figures.dpi=0"), "demo.tool: error: figures.dpi: must be >= 1, got 0"),
])
def test_bad_input_is_one_line_exit_1(tmp_path, args, line):
    r = _run(tmp_path, *args)
    assert r.returncode == 1
    assert r.stderr.strip() == line


def test_hydra_errors_are_one_line_exit_1(tmp_path):
    for args in (("dir=x", "batch=many"), ("dir=x", "nosuch=1")):
        r = _run(tmp_path, *args)
        assert r.returncode == 1, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("demo.tool: error: ")


def test_help_is_generated_from_the_schema(tmp_path):
    r = _run(tmp_path, "--help")
    assert r.returncode == 0
    lines = [l for l in r.stdout.splitlines() if l.strip()]
    assert lines[0] == "A demo tool."
    assert any(l.split() == ["dir=STR", "(required)", "a", "run", "dir"] for l in lines)
    assert any(l.split()[0] == "batch=INT" and l.endswith("sequences per batch (>= 1) [default: 16]") for l in lines)
    assert any(l.split()[0] == "dtype=STR" and "(one of fp32 | bf16) [default: fp32]" in l for l in lines)
    assert any(l.split()[0] == "figures.dpi=INT" for l in lines)
    assert any(l.split()[0] == "tasks=[STR,...]" and l.endswith("[default: [a,b]]") for l in lines)


def test_option_without_help_is_refused():
    from dataclasses import dataclass, field

    @dataclass
    class Bad:
        x: int = field(default=1)

    with pytest.raises(TypeError, match="Bad.x: option without help text"):
        schema_options(Bad)


def test_help_text_lists_every_option_once():
    from dataclasses import dataclass

    @dataclass
    class S:
        a: int = option(1, help="first", lo=0)
        b: str = option("x", help="second", choices=["x", "y"])

    text = help_text("t", "Sum.", S, "python t")
    assert text.count("a=INT") == 1 and text.count("b=STR") == 1
    assert "first (>= 0) [default: 1]" in text and "second (one of x | y) [default: x]" in text


def test_warning_format_names_the_tool_only_while_it_runs(tmp_path):
    """Inside `main()` a warning is one line naming the tool; once `main()` returns (a tool called
    in-process, from a notebook) the process's warning format is what it was before."""
    script = tmp_path / "inproc.py"
    script.write_text(TOOL.replace('print("RESULT"', 'import warnings; warnings.warn("during"); print("RESULT"')
                      .replace('if __name__ == "__main__":\n    main()\n',
                               'import sys, warnings\n'
                               'before = warnings.formatwarning("after", UserWarning, "x.py", 1, "src")\n'
                               'sys.argv = ["demo.py", "dir=x"]\n'
                               'main()\n'
                               'print("SAME" if warnings.formatwarning("after", UserWarning, "x.py", 1, "src") == before else "CHANGED")\n'))
    import os
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    assert "RESULT Schema x" in r.stdout and r.stdout.strip().endswith("SAME")
    assert r.stderr.startswith("demo.tool: warning: UserWarning: during (")  # another file's warning
