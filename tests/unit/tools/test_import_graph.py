"""No import cycle among `moeut` modules and no import that runs up a layer (tools/import_graph.py
LAYERS: base < kernels < model < registry < io < top), found by tools/import_graph.py:
module-level, function-level and dynamic ("module:Class") imports, a package __init__ importing
its submodules included. The script itself is checked on hand-made packages first."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "tools" / "import_graph.py"

# No cycle is tolerated: the kernels, eval.tasks and model<->baselines.routers cycles of main b067be7
# were removed by the issue-16 redesign. Add nothing here.
EXPECTED_TO_BE_REMOVED: set = set()


def _graph(package: Path) -> dict:
    res = subprocess.run([sys.executable, str(SCRIPT), "--json", "--package", str(package)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _write(root: Path, files: dict) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_script_finds_each_kind_of_cycle(tmp_path):
    """Hand-made package `pkg` with four cycles of different kinds and acyclic decoys."""
    _write(tmp_path, {
        "pkg/__init__.py": "from .leaf import X\n",          # parent -> child: no cycle by itself
        "pkg/leaf.py": "X = 1\n",
        "pkg/a.py": "from . import b\n",                       # a -> b (module level)
        "pkg/b.py": "def f():\n    from .a import g\n",        # b -> a (function level)
        "pkg/sub/__init__.py": "from .c import C\n",            # package __init__ -> its submodule
        "pkg/sub/c.py": "import pkg.sub\nC = 1\n",              # ... which imports the package back
        "pkg/reg.py": 'TABLE = {"x": "pkg.model:Model"}\n',    # dynamic class path
        "pkg/model.py": "class Model:\n    def f(self):\n        from pkg.reg import TABLE\n",
        "pkg/self.py": "from pkg import self\n",                # a module importing itself
        "pkg/d.py": "from .leaf import X\nimport os\n",        # decoys: no cycle, non-package imports
        "pkg/e.py": "from .d import X\n",
    })
    g = _graph(tmp_path / "pkg")
    assert g["cycles"] == [["pkg.a", "pkg.b"], ["pkg.model", "pkg.reg"], ["pkg.self"], ["pkg.sub", "pkg.sub.c"]]
    kinds = {(a, b): k for a, b, k, _ in g["edges"]}
    assert kinds[("pkg.a", "pkg.b")] == "module" and kinds[("pkg.b", "pkg.a")] == "function"
    assert kinds[("pkg.reg", "pkg.model")] == "dynamic"
    assert ("pkg.leaf", "pkg") not in kinds  # implicit parent-package imports are not edges


def test_no_import_cycles_in_moeut():
    found = {frozenset(c) for c in _graph(REPO / "moeut")["cycles"]}
    new = [sorted(c) for c in found - EXPECTED_TO_BE_REMOVED]
    assert not new, f"import cycles among moeut modules (python tools/import_graph.py shows the edges): {new}"
    gone = [sorted(c) for c in EXPECTED_TO_BE_REMOVED - found]
    assert not gone, f"these cycles are gone: remove them from EXPECTED_TO_BE_REMOVED: {gone}"


def test_the_config_registry_circle_is_gone():
    """The 8-module circle of main b067be7 (config, baselines, model, compute, checkpoint): none of
    those modules is in a cycle with config, registry, compute or checkpoint any more."""
    for c in _graph(REPO / "moeut")["cycles"]:
        assert not set(c) & {"moeut.model_config", "moeut.registry", "moeut.compute", "moeut.checkpoint",
                             "moeut.baselines", "moeut.baselines.dense", "moeut.baselines.sut"}, c


def test_script_finds_upward_imports_and_unplaced_modules(tmp_path):
    """Hand-made package laid out like moeut: a kernel that builds a model (function level), a
    registry class path into a tool (dynamic), a model importing checkpoint I/O, and a module no
    layer covers; downward imports and imports within a layer are decoys."""
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/kernels/__init__.py": "",
        "pkg/kernels/cvmm.py": "def f():\n    from pkg.registry import build\n",     # kernels -> registry
        "pkg/kernels/ops.py": "from .cvmm import f\n",                                # same layer: fine
        "pkg/model.py": "from pkg.kernels.cvmm import f\nfrom pkg import checkpoint\n",  # model -> io
        "pkg/registry.py": 'T = {"x": "pkg.tools.fp:Tool", "y": "pkg.model:M"}\n',   # -> top (dynamic)
        "pkg/checkpoint.py": "from pkg.registry import T\n",                          # io -> registry: fine
        "pkg/tools/__init__.py": "",
        "pkg/tools/fp.py": "from pkg.model import f\n",                               # top -> model: fine
        "pkg/stray.py": "",                                                            # in no layer
    })
    g = _graph(tmp_path / "pkg")
    assert g["unassigned"] == ["pkg.stray"]
    assert [(a, b, k) for a, b, k, _ in g["upward"]] == [
        ("pkg.kernels.cvmm", "pkg.registry", "function"), ("pkg.model", "pkg.checkpoint", "module"),
        ("pkg.registry", "pkg.tools.fp", "dynamic")]
    assert g["layers"]["pkg"] == "top" and g["layers"]["pkg.kernels.ops"] == "kernels"


def test_moeut_layers_point_one_way():
    """Every moeut module is placed in a layer and imports only its own layer or lower ones:
    kernels hold kernels only, the registry imports no tool, checkpoint I/O no training code."""
    g = _graph(REPO / "moeut")
    assert g["unassigned"] == [], f"modules in no layer (add them to LAYERS in tools/import_graph.py): {g['unassigned']}"
    assert g["upward"] == [], "imports that run up a layer (python tools/import_graph.py lists them):\n" + \
        "\n".join(f"{a} -> {b} [{k}] {w}" for a, b, k, w in g["upward"])
    assert {m for m, layer in g["layers"].items() if m.startswith("moeut.kernels")} == {
        m for m, layer in g["layers"].items() if layer == "kernels"}
