"""Print the import graph of the `moeut` package, its cycles and its imports that run up a layer.

    python tools/import_graph.py                 # cycles and layer violations
    python tools/import_graph.py --edges         # also every edge, with file:line and kind
    python tools/import_graph.py --json          # machine-readable (tests/unit/tools/test_import_graph.py)
    python tools/import_graph.py --package path/to/moeut

Layers (`LAYERS`, bottom to top; docs/architecture.md draws them): a module may import modules of
its own layer or of a layer below, never above. Each entry names a module or a package (covering
its submodules); the longest matching name decides. A module no entry covers is reported
("unassigned"), so a new module is placed deliberately.

What counts as an edge A -> B (A, B modules of the package; found with `ast`, nothing is imported):
- `import moeut.x.y` / `from moeut.x import y` / `from .x import y` / `from . import y`, at module
  level ("module"), inside a function or method ("function"), or anywhere else (class bodies,
  `if TYPE_CHECKING:` blocks: also "module" — they are counted, not excused).
  `from pkg import name` points at `pkg.name` when that is a module, otherwise at `pkg` (for a
  package: its `__init__.py`); so a package `__init__` importing its submodules is an edge too.
- "dynamic": a string literal "moeut.x.y:Name" (a registry's class path, loaded with importlib) or
  `importlib.import_module("moeut.x.y")`: the code does import that module, only later.
Not an edge: the implicit import of a parent package (`import moeut.a.b` runs `moeut/a/__init__.py`
first); counting it would make every package that re-exports a submodule a "cycle".

A cycle is a strongly connected component with more than one module (or a module importing
itself). Exit status: 0, also when there are cycles or upward imports (the test decides).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
from typing import Dict, List, Set, Tuple

_CLASS_PATH = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):[A-Za-z_]\w*$")

Edge = Tuple[str, str, str, str]  # (source module, target module, kind, "file:line")

# The layers of the moeut package, bottom to top (names relative to the package).
LAYERS: List[Tuple[str, List[str]]] = [
    ("base", ["outputs", "validate", "paths", "cli", "wrappers", "cpu"]),  # utilities: no model code
    ("kernels", ["kernels"]),  # CVMM kernels only
    ("model", ["model_config", "lm", "model", "softmax_moe", "baselines"]),  # configs + models
    ("registry", ["registry"]),  # architectures + presets, build_model
    # analysis.table / analysis.tables: the zero-shot table's format and the one table writer, which
    # every evaluation writes (eval.zeroshot); they import only base and io modules
    ("io", ["data", "eval", "checkpoint", "compute", "official", "rundir", "results_files", "provenance", "hf",
            "analysis.table", "analysis.tables"]),
    ("top", ["", "train_lib", "analysis", "tools", "train", "evaluate", "prepare_data", "sweep",
             "sweep_file"]),  # training, analysis, tools and the CLIs ("": the package facade)
]


def module_names(package_dir: str) -> Dict[str, str]:
    """{dotted module name: file path} for every .py file under `package_dir` (a package folder;
    its own name is the first component, e.g. "moeut"). Raises FileNotFoundError if it is not a
    package (no __init__.py)."""
    package_dir = os.path.abspath(package_dir)
    if not os.path.isfile(os.path.join(package_dir, "__init__.py")):
        raise FileNotFoundError(f"--package {package_dir}: not a Python package (no __init__.py)")
    root = os.path.dirname(package_dir)
    out = {}
    for dirpath, dirnames, filenames in os.walk(package_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            path = os.path.join(dirpath, fn)
            parts = os.path.relpath(path, root)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: Dict[str, str]) -> str:
    """The longest prefix of dotted `name` that is a module of the package, or "" if none."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        if cand in modules:
            return cand
    return ""


def _from_base(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """Absolute module named by a (possibly relative) `from X import ...`."""
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join(base + ([node.module] if node.module else []))


def module_edges(mod: str, path: str, modules: Dict[str, str], root: str = ".") -> List[Edge]:
    """Every import edge out of module `mod` (file `path`) into the package; locations are given
    relative to `root` (the package's parent folder). Raises SyntaxError (naming the file) when
    the file does not parse."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    is_pkg = os.path.basename(path) == "__init__.py"
    rel = os.path.relpath(path, root)
    edges: List[Edge] = []

    def add(target: str, kind: str, line: int) -> None:
        t = _resolve(target, modules)
        if t:
            edges.append((mod, t, kind, f"{rel}:{line}"))

    def visit(node: ast.AST, in_function: bool) -> None:
        kind = "function" if in_function else "module"
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name, kind, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(mod, is_pkg, node)
            for a in node.names:
                sub = f"{base}.{a.name}"
                add(sub if sub in modules else base, kind, node.lineno)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = _CLASS_PATH.match(node.value)
            if m:
                add(m.group(1), "dynamic", node.lineno)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            add(node.args[0].value, "dynamic", node.lineno)
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return edges


def import_graph(package_dir: str) -> Tuple[List[str], List[Edge]]:
    """(sorted module names, sorted distinct edges) of the package at `package_dir`. Raises
    FileNotFoundError (not a package) or SyntaxError (a file that does not parse)."""
    modules = module_names(package_dir)
    root = os.path.dirname(os.path.abspath(package_dir))
    edges = set()
    for mod, path in modules.items():
        edges.update(module_edges(mod, path, modules, root))
    return sorted(modules), sorted(edges)


def cycles(modules: List[str], edges: List[Edge]) -> List[List[str]]:
    """Strongly connected components with a cycle (size > 1, or a self-import), each sorted, the
    list sorted. Tarjan's algorithm, iterative (no recursion limit on deep graphs)."""
    succ: Dict[str, Set[str]] = {m: set() for m in modules}
    for a, b, _, _ in edges:
        succ[a].add(b)
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    out: List[List[str]] = []
    counter = 0
    for root in modules:
        if root in index:
            continue
        work = [(root, iter(sorted(succ[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(succ[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1 or v in succ[v]:
                    out.append(sorted(comp))
    return sorted(out)


def layer_of(module: str, layers: List[Tuple[str, List[str]]] = LAYERS) -> int:
    """Index in `layers` of dotted `module` (its first component is the package): the layer of the
    longest entry naming it or a package above it ("" names only the package itself); -1 if none."""
    rel = module.split(".", 1)[1] if "." in module else ""
    best, best_len = -1, -1
    for i, (_, names) in enumerate(layers):
        for n in names:
            if (n == "" and rel == "") or (n and (rel == n or rel.startswith(n + "."))):
                if len(n) > best_len:
                    best, best_len = i, len(n)
    return best


def layer_violations(modules: List[str], edges: List[Edge],
                     layers: List[Tuple[str, List[str]]] = LAYERS) -> Tuple[List[str], List[Edge]]:
    """(modules no layer covers, edges from a module to one of a higher layer), both sorted."""
    unassigned = sorted(m for m in modules if layer_of(m, layers) < 0)
    upward = sorted(e for e in edges if layer_of(e[1], layers) > layer_of(e[0], layers) >= 0)
    return unassigned, upward


def main(argv=None) -> int:
    """Command line: see the module docstring. Returns the exit status (0)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser(description="Import graph, import cycles and upward imports (LAYERS) of the "
                                            "moeut package (module-level, function-level and dynamic imports).")
    p.add_argument("--package", default=os.path.join(here, "moeut"), help="package folder (default: this repo's moeut)")
    p.add_argument("--edges", action="store_true", help="also print every edge (source -> target, kind, file:line)")
    p.add_argument("--json", action="store_true", help="print {modules, edges, cycles} as JSON")
    args = p.parse_args(argv)
    modules, edges = import_graph(args.package)
    cyc = cycles(modules, edges)
    unassigned, upward = layer_violations(modules, edges)
    if args.json:
        json.dump({"modules": modules, "edges": [list(e) for e in edges], "cycles": cyc,
                   "layers": {m: LAYERS[layer_of(m)][0] if layer_of(m) >= 0 else None for m in modules},
                   "unassigned": unassigned, "upward": [list(e) for e in upward]}, sys.stdout, indent=1)
        print()
        return 0
    print(f"{len(modules)} modules, {len(edges)} import edges, {len(cyc)} cycle(s) "
          f"(strongly connected components), {len(upward)} upward import(s), {len(unassigned)} module(s) "
          "in no layer")
    print("layers, bottom to top: " + " < ".join(name for name, _ in LAYERS))
    for m in unassigned:
        print(f"    in no layer: {m} (add it to LAYERS in tools/import_graph.py)")
    for a, b, kind, where in upward:
        print(f"    upward: {a} [{LAYERS[layer_of(a)][0]}] -> {b} [{LAYERS[layer_of(b)][0]}]  [{kind}]  {where}")
    for i, comp in enumerate(cyc, 1):
        members = set(comp)
        print(f"\ncycle {i}: {len(comp)} modules: {', '.join(comp)}")
        for a, b, kind, where in edges:
            if a in members and b in members:
                print(f"    {a} -> {b}  [{kind}]  {where}")
    if args.edges:
        print("\nall edges:")
        for a, b, kind, where in edges:
            print(f"    {a} -> {b}  [{kind}]  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
