"""README's Python example runs as printed: as a script, and pasted line by line into the plain
`python` REPL (where a blank line ends an indented block, and a block must end with one)."""
import code
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    return blocks[0]


def test_readme_python_example_runs(capsys):
    exec(compile(_example(), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "parameters" in printed and "torch.Size([2, 24])" in printed


def test_readme_python_example_pastes_into_the_repl(capsys):
    """code.InteractiveConsole is the REPL's own line-by-line compiler (codeop): a line at column 0
    right after an indented block, or a blank line inside one, is a SyntaxError there."""
    console = code.InteractiveConsole({})
    errors = []
    console.showsyntaxerror = lambda *a, **k: errors.append("SyntaxError")
    console.showtraceback = lambda *a, **k: errors.append("exception")
    more = False
    for n, line in enumerate(_example().splitlines(), 1):
        more = console.push(line)
        assert not errors, f"README example, line {n}: {errors[-1]} when pasted into the REPL: {line!r}"
    if more:
        console.push("")
    assert not errors, errors
    printed = capsys.readouterr().out
    assert "parameters" in printed and "torch.Size([2, 24])" in printed
