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
