"""The corpus and golden files carried in the repository (data/, tests/assets/golden/): intact (sha256 as
their READMEs state), held-out books really held out, and enough text for the default job, so
that `python train.py` and the tests run on a fresh clone with nothing beside it."""
import gzip
import hashlib
import json
import re
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import BOOKS, EMBEDDED, REPO, REPO_GOLDEN, SHARED, shared_or_skip

sys.path.insert(0, str(REPO))


def _readme_hashes(readme: Path):
    """{relative path: sha256} from a README table row: | `path` | ... | `<64 hex>` |"""
    rows = re.findall(r"^\| `([^`]+)` \|.*`([0-9a-f]{64})` \|$", readme.read_text(), flags=re.M)
    return dict(rows)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _books(path: Path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("folder,suffix", [(EMBEDDED, ".gz"), (REPO_GOLDEN, ".pt")], ids=["data", "golden"])
def test_every_carried_file_matches_its_readme(folder, suffix):
    stated = _readme_hashes(folder / "README.md")
    present = sorted(str(p.relative_to(folder)) for p in folder.rglob(f"*{suffix}"))
    assert present and sorted(stated) == present, f"{folder}/README.md lists {sorted(stated)}, folder has {present}"
    for rel, digest in stated.items():
        assert _sha256(folder / rel) == digest, f"{folder / rel} differs from its README's sha256"


def test_validation_books_are_held_out():
    train, valid = _books(BOOKS / "train.jsonl.gz"), _books(BOOKS / "valid.jsonl.gz")
    assert len(train) == 32 and len(valid) == 4
    assert len({b["author"] for b in train}) == 32  # one book per author (data/README.md)
    assert not {b["source_path"] for b in train} & {b["source_path"] for b in valid}
    assert not {b["text"][:2000] for b in train} & {b["text"][:2000] for b in valid}
    assert all(len(b["text"]) > 10000 for b in train + valid)


def test_validation_books_are_outside_the_full_gutenberg_train_split():
    """The embedded valid books are not in the larger corpus either (data=gutenberg)."""
    full = shared_or_skip(SHARED / "data" / "text" / "gutenberg" / "train.jsonl.gz")
    held_out = {b["source_path"] for b in _books(BOOKS / "valid.jsonl.gz")}
    assert not held_out & {b["source_path"] for b in _books(full)}


def test_analysis_default_data_is_embedded():
    from moeut.analysis import collect as C
    from moeut.data.sources import FileRef, read_documents
    assert C.DEFAULT_DATA == BOOKS / "valid.jsonl.gz" and C.DEFAULT_DATA.is_file()
    assert len(list(read_documents(FileRef(str(C.DEFAULT_DATA))))) == 4


@pytest.mark.slow
def test_default_job_fits_the_embedded_corpus(tmp_path, monkeypatch):
    """The default job's tokenizer and token budget, built as train.py does: the training text
    gives at least one full pass of its 300 x 16 windows of 256 tokens, validation its 65,536
    tokens, without ../shared or MOEUT_DATA."""
    from moeut.train_lib.config import to_typed
    from moeut.train_lib.data import prepare_run_data, resolve_tokenizer
    from moeut.train_lib.distributed import DistInfo

    monkeypatch.setenv("MOEUT_DATA", "/nonexistent")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = to_typed(compose("config", overrides=["name=test", f"data.cache_dir={tmp_path}", "data.num_workers=0"]))
    d, t = cfg.data, cfg.train
    train_tokens = (t.steps + 100) * t.batch_size * d.seq_len  # train.py's default budget
    tok = resolve_tokenizer(d, str(tmp_path / "run"), DistInfo(), log=lambda *a: None)
    data = prepare_run_data(d, d.seq_len, train_tokens, tok, DistInfo(), log=lambda *a: None)
    assert data.tokenizer.vocab_size == 8000
    assert len(data.train) >= t.steps * t.batch_size, f"{len(data.train)} windows: the default job would repeat text"
    assert len(data.valid["val"]) == d.valid_tokens // d.seq_len
    assert set(data.valid) == {"val", "c4"} and len(data.valid["c4"]) > 0
