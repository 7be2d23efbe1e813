# --- Triton interpreter (kernels helper; keep this block first) ----------------------------
# Without a GPU the Triton CVMM kernels are tested under TRITON_INTERPRET=1, which must be set
# before anything imports Triton (Triton jits its own library functions at import; torch imports
# Triton lazily). conftest.py is imported before any test module, so a plain `python -m pytest`
# runs the interpreter tests in-process instead of skipping them. A machine with a GPU keeps the
# real backend; an explicit TRITON_INTERPRET=0 in the environment is respected.
import os as _os
import sys as _sys

if "triton" not in _sys.modules and "TRITON_INTERPRET" not in _os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        _os.environ["TRITON_INTERPRET"] = "1"
# ------------------------------------------------------------------------------------------
# --- Environment the suite needs, set here (not by the caller) -----------------------------
# README's `python -m pytest -q` must pass as typed: no figure window (MPLBACKEND), no wandb
# login or upload (WANDB_MODE), no tokenizers fork warning. Only unset variables are filled in,
# and subprocesses of the tests inherit them. No HF_*_OFFLINE here: tests that exercise hub code
# set it themselves (monkeypatch), and local-data code paths never contact the hub.
for _key, _value in (("MPLBACKEND", "Agg"), ("WANDB_MODE", "disabled"), ("TOKENIZERS_PARALLELISM", "false")):
    _os.environ.setdefault(_key, _value)
# The tests mirror the package (tests/unit/<area>/, tests/e2e/; fixtures in tests/assets/): the
# support modules beside this file and the test modules of every folder import one another by module
# name (`from test_train import tiny_cfg`), so every test folder is on the path, as pytest puts a
# test's own folder there (module names are unique across folders).
_TEST_DIRS = [_os.path.dirname(_os.path.abspath(__file__))]
_TEST_DIRS += sorted(_os.path.join(r, d) for r, ds, _ in _os.walk(_TEST_DIRS[0]) for d in ds
                     if d not in ("assets", "__pycache__") and not r.startswith(_os.path.join(_TEST_DIRS[0], "assets")))
for _d in _TEST_DIRS:
    if _d not in _sys.path:
        _sys.path.insert(0, _d)
# No test may reach the network (a hub call hangs or fails on an offline machine): a connection
# to anything but this machine fails at once, naming the address (tests/e2e/test_no_network.py).
import ipaddress as _ipaddress
import socket as _socket

_connect = _socket.socket.connect


def _local_only_connect(self, address, *args, **kwargs):
    if self.family in (_socket.AF_INET, _socket.AF_INET6):
        host = address[0]
        try:
            local = host == "localhost" or _ipaddress.ip_address(host).is_loopback
        except ValueError:
            local = False
        if not local:
            raise ConnectionRefusedError(f"tests/conftest.py: the test suite must not use the network "
                                         f"(connection to {address!r} refused)")
    return _connect(self, address, *args, **kwargs)


_socket.socket.connect = _local_only_connect
# ------------------------------------------------------------------------------------------

import gzip
import json
import os
from pathlib import Path
from typing import Optional

import pytest
import torch

# Fixture locations, resolved so that the suite runs on a fresh clone. Small fixtures live in the
# repository: golden vectors in tests/assets/golden/, text in data/ (the embedded corpus, data/README.md).
# Large optional ones (golden/v8000.pt, the zero-shot sets in data/eval, the full Gutenberg corpus)
# are looked up in $MOEUT_SHARED (default: ../shared beside the checkout); tests that need them
# skip with a reason naming the missing file.
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MOEUT_SHARED", REPO.parent / "shared"))
REPO_GOLDEN = REPO / "tests" / "assets" / "golden"
SHARED_GOLDEN = SHARED / "golden"
GOLDEN = REPO_GOLDEN  # where the vendored golden files are
EMBEDDED = REPO / "data"  # the embedded corpus
C4 = EMBEDDED / "c4_sample"  # {train,valid}.jsonl.gz: the 980/20-document C4 sample
BOOKS = EMBEDDED / "books"  # {train,valid}.jsonl.gz: the default corpus
EVAL = SHARED / "data" / "eval"  # full zero-shot sets: optional (small subsets: data/eval, tests/unit/eval/test_eval_subsets.py)

# Golden files the suite knows; the ones not in tests/assets/golden/ are optional (too large to carry).
GOLDEN_MODEL_FILES = ("tiny.pt", "small_g3.pt", "tiny_training_format.pt", "v8000.pt")
OPTIONAL_GOLDEN = ("v8000.pt",)


def golden_path(name: str) -> Optional[Path]:
    """tests/assets/golden/<name>, else $MOEUT_SHARED/golden/<name>, else None."""
    for d in (REPO_GOLDEN, SHARED_GOLDEN):
        if (d / name).is_file():
            return d / name
    return None


def golden_or_skip(name: str) -> Path:
    path = golden_path(name)
    if path is None:
        pytest.skip(f"optional golden file missing: {name} (neither {REPO_GOLDEN / name} nor {SHARED_GOLDEN / name})")
    return path


def shared_or_skip(path: Path) -> Path:
    """`path` (under SHARED) if it exists, else skip naming it."""
    if not Path(path).exists():
        pytest.skip(f"optional data missing: {path} (set MOEUT_SHARED to the folder holding data/ and golden/)")
    return Path(path)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _tool_warning_format_per_test():
    """A tool's entry point run in-process (`main()` of a tool) sets this process's warning format
    to name that tool (moeut.cli.install_warning_format); restore Python's after each test, so a
    later test's warnings are not printed as that tool's."""
    import warnings
    before = warnings.formatwarning
    yield
    warnings.formatwarning = before


@pytest.fixture(scope="session")
def c4_texts():
    path = C4 / "train.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="session")
def small_tokenizer(c4_texts):
    from moeut.data.tokenizer import train_tokenizer
    return train_tokenizer(c4_texts[:300], vocab_size=512)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A token cache shared by one test module's training runs (a module may define its own)."""
    return str(tmp_path_factory.mktemp("cache"))
