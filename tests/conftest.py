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

import gzip
import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MOEUT_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden"
DATA = SHARED / "data"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def c4_texts():
    path = DATA / "text" / "c4" / "train.jsonl.gz"
    if not path.exists():
        pytest.skip(f"shared data missing: {path}")
    with gzip.open(path, "rt") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="session")
def small_tokenizer(c4_texts):
    from moeut.data.tokenizer import train_tokenizer
    return train_tokenizer(c4_texts[:300], vocab_size=512)
