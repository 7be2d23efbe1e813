"""Every public definition of the `moeut` package has a docstring, and every command-line module a
module docstring (issue 16 item 6).

The package is read with `ast` (nothing is imported, so optional dependencies such as Triton or
lm-eval need not be installed and no registration side effect runs). Checked:

- public module-level functions and classes (name not starting with "_"), also those defined
  under a module-level `if`/`try`/`with`;
- public methods of public classes (properties included; a property's setter/deleter and
  `typing.overload` stubs are not separate definitions). Dunder methods are exempt: `__init__`
  is documented by its class docstring;
- classes nested in a public class, as classes;
- every module with a `main` function or an `if __name__ == "__main__":` block (a command-line
  tool) has a module docstring.

Definitions nested in a function are not public API and are not checked. An empty or
whitespace-only docstring counts as missing.

Run as a script (`python tests/unit/tools/test_docstrings.py [package_dir]`) to print every offender and a
per-file count without pytest.
"""
from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator, List, Tuple

REPO = Path(__file__).resolve().parents[3]
PACKAGE = REPO / "moeut"

# Command-line modules named in issue 16; each must be detected as a CLI when its file exists
# (guards the detection rule below against a CLI written in a form it does not recognise).
KNOWN_CLIS = ("moeut.evaluate", "moeut.analysis.__main__", "moeut.prepare_data", "moeut.sweep",
              "moeut.hf.export", "moeut.tools.footprint", "moeut.tools.warmup", "moeut.analysis.summary",
              "moeut.analysis.table", "moeut.analysis.compare", "moeut.analysis.curves",
              "moeut.analysis.cpu_result", "moeut.eval.harness_cli")

Offender = Tuple[str, int, str]  # (path relative to the repository, line, qualified name)

_DEF = (ast.FunctionDef, ast.AsyncFunctionDef)
_BLOCK = (ast.If, ast.Try, ast.With)  # module/class-level blocks whose defs still count


def _has_doc(node) -> bool:
    doc = ast.get_docstring(node, clean=False)
    return bool(doc and doc.strip())


def _is_public(name: str) -> bool:
    return not name.startswith("_")


def _decorator_names(fn) -> List[str]:
    out = []
    for d in fn.decorator_list:
        if isinstance(d, ast.Call):
            d = d.func
        if isinstance(d, ast.Attribute):
            out.append(d.attr)
        elif isinstance(d, ast.Name):
            out.append(d.id)
    return out


def _is_accessor_or_overload(fn) -> bool:
    """`@x.setter` / `@x.deleter` (documented by the getter) and `@overload` stubs."""
    return any(n in ("setter", "deleter", "overload") for n in _decorator_names(fn))


def _statements(body) -> Iterator[ast.stmt]:
    """Statements of a module or class body, descending into if/try/with blocks (not into defs)."""
    for node in body:
        if isinstance(node, _BLOCK):
            blocks = [node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])]
            blocks += [h.body for h in getattr(node, "handlers", [])]
            for b in blocks:
                yield from _statements(b)
        else:
            yield node


def _class_offenders(cls: ast.ClassDef, prefix: str) -> Iterator[Tuple[int, str]]:
    qual = prefix + cls.name
    if not _has_doc(cls):
        yield cls.lineno, qual
    for node in _statements(cls.body):
        if isinstance(node, _DEF) and _is_public(node.name) and not _is_accessor_or_overload(node):
            if not _has_doc(node):
                yield node.lineno, f"{qual}.{node.name}"
        elif isinstance(node, ast.ClassDef) and _is_public(node.name):
            yield from _class_offenders(node, qual + ".")


def _is_main_guard(node) -> bool:
    """`if __name__ == "__main__":` (either operand order)."""
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    t = node.test
    if len(t.ops) != 1 or not isinstance(t.ops[0], ast.Eq):
        return False
    sides = [t.left, t.comparators[0]]
    has_name = any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides)
    has_main = any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides)
    return has_name and has_main


def is_cli(tree: ast.Module) -> bool:
    """A command-line module: it defines a module-level `main` (a def, or an assignment such as
    `main = typed_tool(...)(work)`) or has a `__main__` block."""
    for node in tree.body:
        if _is_main_guard(node):
            return True
    return any((isinstance(n, _DEF) and n.name == "main")
               or (isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "main" for t in n.targets))
               for n in _statements(tree.body))


def module_name(path: Path, package_dir: Path) -> str:
    """Dotted module name of `path` inside the package at `package_dir` (`pkg/a/__init__.py` -> pkg.a)."""
    rel = path.relative_to(package_dir.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def module_offenders(path: Path, rel: str) -> Tuple[List[Offender], bool]:
    """(offenders of one file, whether it is a CLI). Raises SyntaxError naming the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: List[Offender] = []
    cli = is_cli(tree)
    if cli and not _has_doc(tree):
        out.append((rel, 1, "<module docstring of a command-line tool>"))
    for node in _statements(tree.body):
        if isinstance(node, _DEF) and _is_public(node.name) and not _is_accessor_or_overload(node):
            if not _has_doc(node):
                out.append((rel, node.lineno, node.name))
        elif isinstance(node, ast.ClassDef) and _is_public(node.name):
            out.extend((rel, line, name) for line, name in _class_offenders(node, ""))
    return out, cli


def scan(package_dir: Path = PACKAGE) -> Tuple[List[Offender], List[str], int]:
    """(offenders, dotted names of the CLI modules found, number of modules scanned)."""
    offenders: List[Offender] = []
    clis: List[str] = []
    files = sorted(package_dir.rglob("*.py"))
    for path in files:
        rel = str(path.relative_to(package_dir.parent))
        found, cli = module_offenders(path, rel)
        offenders.extend(found)
        if cli:
            clis.append(module_name(path, package_dir))
    return offenders, clis, len(files)


def report(offenders: List[Offender]) -> str:
    """file:line: name per offender, then a per-file count (most offenders first)."""
    lines = [f"{f}:{line}: {name}" for f, line, name in offenders]
    counts = Counter(f for f, _, _ in offenders)
    lines.append(f"-- {len(offenders)} public definition(s) without a docstring, per file:")
    lines += [f"{n:5d}  {f}" for f, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------

def test_every_public_definition_and_cli_has_a_docstring():
    offenders, _, n_files = scan()
    assert n_files > 0, f"no Python files under {PACKAGE}"
    assert not offenders, "\n" + report(offenders)


def test_known_command_line_modules_are_detected():
    _, clis, _ = scan()
    exist = [m for m in KNOWN_CLIS
             if (PACKAGE.parent / (m.replace(".", "/") + ".py")).exists()]
    missed = sorted(set(exist) - set(clis))
    assert not missed, f"CLI modules with neither a `main` function nor a __main__ block: {missed}"


def test_the_checker_finds_each_kind_of_offender(tmp_path):
    """The rule itself, on a hand-written package: every kind of public definition without a
    docstring is reported (with its line), and the exempt ones are not."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""Package."""\n')
    (pkg / "lib.py").write_text(
        '"""Library module (not a CLI: no docstring needed, but it has one)."""\n'
        "def f():\n    pass\n"                                    # 2: public function
        "def _private():\n    pass\n"                             # exempt
        "class C:\n"                                              # 6: public class
        "    def __init__(self):\n        pass\n"                 # exempt (class docstring)
        "    def m(self):\n        def inner():\n            pass\n"  # 9: method; inner exempt
        "    @property\n    def p(self):\n        '''Doc.'''\n"
        "    @p.setter\n    def p(self, v):\n        pass\n"      # setter exempt
        "    class Inner:\n        '''Doc.'''\n        def g(self):\n            pass\n"  # 19: nested method
        "class _Hidden:\n    def m(self):\n        pass\n"        # exempt: private class
        "class D:\n    '''   '''\n"                              # 25: blank docstring = missing
        "if True:\n    def h():\n        pass\n"                  # 28: def under a module-level if
        "def documented():\n    '''Has one.'''\n")
    (pkg / "tool.py").write_text("import sys\nif __name__ == '__main__':\n    sys.exit(0)\n")
    (pkg / "tool2.py").write_text('"""A tool."""\ndef main():\n    """Entry point."""\n')
    offenders, clis, _ = scan(pkg)
    got = sorted((f.replace("\\", "/"), line, name) for f, line, name in offenders)
    assert got == sorted([("pkg/lib.py", 2, "f"), ("pkg/lib.py", 6, "C"), ("pkg/lib.py", 9, "C.m"),
                          ("pkg/lib.py", 20, "C.Inner.g"), ("pkg/lib.py", 25, "D"), ("pkg/lib.py", 28, "h"),
                          ("pkg/tool.py", 1, "<module docstring of a command-line tool>")])
    assert sorted(clis) == ["pkg.tool", "pkg.tool2"]
    assert "7 public definition(s)" in report(offenders) and "    6  pkg/lib.py" in report(offenders)


if __name__ == "__main__":
    found, cli_modules, n = scan(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else PACKAGE)
    print(report(found))
    print(f"-- {n} modules scanned; command-line modules: {', '.join(cli_modules)}")
    sys.exit(1 if found else 0)
