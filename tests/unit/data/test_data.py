"""Data pipeline (SPEC 5): corpus readers, tokenizer training, memmap shards, windows, samplers."""
import gzip
import json
import os

import numpy as np
import pytest

from moeut.data.dataset import StreamSampler, TokenStream, WindowDataset, paper_valid_tokens
from moeut.data.prepare import prepare_tokens
from moeut.data.tokenizer_training import train_corpus_tokenizer
from moeut.data.sources import (DataError, c4_corpus, list_local_files, local_corpus, open_corpus,
                                read_documents, slimpajama_corpus)
from moeut.data.tokenizer import DOC_SEPARATOR

from conftest import C4  # the embedded corpus in data/ (data/README.md)


def _write_jsonl_gz(path, texts, field="text"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        for t in texts:
            f.write(json.dumps({field: t, "url": "x"}) + "\n")


@pytest.fixture(scope="module")
def c4_docs():
    with gzip.open(C4 / "train.jsonl.gz", "rt") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def c4_tok():
    corpus = local_corpus(str(C4 / "train.jsonl.gz"), "train")
    return train_corpus_tokenizer(corpus, vocab_size=1000, max_docs=300)


# ---------------------------------------------------------------------------- sources

def test_local_dir_mixed_formats(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("plain text document")
    (tmp_path / "b" / "c.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    _write_jsonl_gz(tmp_path / "b" / "d.jsonl.gz", ["three", ""])
    _write_jsonl_gz(tmp_path / "e.json.gz", ["four"])
    _write_jsonl_gz(tmp_path / "valid.jsonl.gz", ["held out"])
    (tmp_path / "notes.md").write_text("ignored: not a text-corpus suffix")
    files = list_local_files(str(tmp_path))
    assert [os.path.relpath(f, tmp_path) for f in files] == ["a.txt", "e.json.gz", "valid.jsonl.gz", "b/c.jsonl",
                                                            "b/d.jsonl.gz"]
    train = local_corpus(str(tmp_path), "train")
    assert list(train.documents()) == ["plain text document", "four", "one", "two", "three", ""]
    valid = local_corpus(str(tmp_path), "validation")
    assert list(valid.documents()) == ["held out"]


def test_bad_inputs_name_the_file(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        list(local_corpus(str(tmp_path / "bad.jsonl"), "train").documents())
    (tmp_path / "nofield.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match=r"nofield.jsonl:1: record has no field 'text'"):
        list(local_corpus(str(tmp_path / "nofield.jsonl"), "train").documents())
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no corpus here")
    with pytest.raises(DataError, match=f"data directory {empty} contains no usable text files"):
        local_corpus(str(empty), "train")
    with pytest.raises(DataError, match="data path does not exist"):
        local_corpus(str(tmp_path / "missing"), "train")


def test_empty_documents_fail_naming_directory(tmp_path, c4_tok):
    d = tmp_path / "blank"
    _write_jsonl_gz(d / "train.jsonl.gz", ["", "", ""])
    _write_jsonl_gz(d / "valid.jsonl.gz", [""])
    with pytest.raises(DataError, match="no usable text in .*blank"):
        prepare_tokens(local_corpus(str(d), "train"), c4_tok, str(tmp_path / "cache"), log=lambda *a: None)


def test_c4_mirror_layout_in_index_order(tmp_path):
    root = tmp_path / "c4"
    _write_jsonl_gz(root / "en" / "c4-train.00001-of-01024.json.gz", ["second"])
    _write_jsonl_gz(root / "en" / "c4-train.00000-of-01024.json.gz", ["first"])
    _write_jsonl_gz(root / "en" / "c4-validation.00000-of-00008.json.gz", ["val"])
    c = c4_corpus(str(root), "train")
    assert [os.path.basename(f.path) for f in c.files] == ["c4-train.00000-of-01024.json.gz",
                                                          "c4-train.00001-of-01024.json.gz"]
    assert list(c.documents()) == ["first", "second"]
    assert list(c4_corpus(str(root), "validation").documents()) == ["val"]
    assert c.revision == "1ddc917116b730e1859edef32896ec5c16be51d0"
    with pytest.raises(DataError, match="mirror .* has none of the expected files"):
        c4_corpus(str(tmp_path), "train")


def test_hub_streaming_refuses_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    c = open_corpus("c4", None, "train")
    assert c.files[0].hub_repo == "allenai/c4" and c.files[0].revision.startswith("1ddc9171")
    with pytest.raises(DataError, match="offline"):
        next(iter(c.documents()))


def test_slimpajama_permutation_and_zstd(tmp_path):
    c = slimpajama_corpus(None, "train")
    assert len(c.files) == 59166
    rel = [f"train/chunk{ci + 1}/example_train_{i}.jsonl.zst"
           for ci, n in enumerate([5912, 5911, 5919, 5917, 5933, 5915, 5906, 5921, 5920, 5912]) for i in range(n)]
    perm = np.random.default_rng(123).permutation(len(rel))
    assert [f.path for f in c.files[:5]] == [rel[i] for i in perm[:5]]
    p = tmp_path / "train" / "chunk1" / "example_train_0.jsonl.zst"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"")
    mirror = slimpajama_corpus(str(tmp_path), "train")
    assert len(mirror.files) == 1
    try:
        import zstandard  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="zstandard"):
            list(read_documents(mirror.files[0]))


# ---------------------------------------------------------------------------- tokenizer + shards

def test_tokenizer_on_real_text(c4_tok):
    assert c4_tok.vocab_size == 1000
    ids = c4_tok.encode("In 2019 there were 12345 cats." + DOC_SEPARATOR)
    pieces = [c4_tok.id_to_piece(i) for i in ids]
    # split_digits: a piece never holds more than one digit
    digit_pieces = [p for p in pieces if any(ch.isdigit() for ch in p)]
    assert len(digit_pieces) == 9 and all(sum(ch.isdigit() for ch in p) == 1 for p in digit_pieces)
    assert 0 not in ids  # the separator's characters are in the vocabulary (no <unk>)
    assert c4_tok.decode(ids) == "In 2019 there were 12345 cats." + DOC_SEPARATOR


def test_memmap_round_trip_matches_naive_encoding(tmp_path, c4_docs, c4_tok):
    corpus = local_corpus(str(C4 / "train.jsonl.gz"), "train")
    m = prepare_tokens(corpus, c4_tok, str(tmp_path), max_tokens=60000, shard_tokens=7000, num_workers=0,
                       log=lambda *a: None)
    # reference: documents encoded one at a time with the separator, concatenated
    ref = []
    for t in c4_docs:
        if t:
            ref.extend(c4_tok.encode(t + DOC_SEPARATOR))
        if len(ref) >= 60000:
            break
    ref = np.array(ref[:60000], dtype=np.int64)
    assert m.total_tokens == 60000 and not m.complete and len(m.shards) > 1  # several shards
    stream = TokenStream(m)
    assert len(stream) == 60000
    np.testing.assert_array_equal(stream.slice(0, 60000), ref)
    with open(os.path.join(m.path, "manifest.json")) as f:
        man = json.load(f)
    assert man["dtype"] == "uint16" and man["tokenizer_sha256"] == c4_tok.sha256 and man["vocab_size"] == 1000
    assert sum(s["tokens"] for s in man["shards"]) == 60000
    # the raw files are plain uint16
    raw = np.concatenate([np.fromfile(p, dtype=np.uint16) for p in m.shard_paths()])
    np.testing.assert_array_equal(raw, ref)
    # windows: i -> tokens [iT, iT+T+1), crossing shard boundaries
    T = 100
    ds = WindowDataset(stream, T)
    assert len(ds) == (60000 - 1) // T
    for i in (0, 69, 70, len(ds) - 1):
        np.testing.assert_array_equal(ds.window(i), ref[i * T:i * T + T + 1])
    b = ds.batch([3, 5])
    assert tuple(b.shape) == (2, T + 1) and b.dtype.is_floating_point is False
    # a second call reuses the cache (same directory, no re-tokenisation)
    seen = []
    m2 = prepare_tokens(corpus, c4_tok, str(tmp_path), max_tokens=50000, log=seen.append)
    assert m2.path == m.path and "reusing" in seen[0]


def test_pool_gives_same_tokens_as_in_process(tmp_path, c4_tok):
    corpus = local_corpus(str(C4 / "train.jsonl.gz"), "train")
    # small shards -> small chunks: several pool tasks (a single chunk is encoded in-process)
    a = prepare_tokens(corpus, c4_tok, str(tmp_path / "a"), max_tokens=30000, num_workers=0, shard_tokens=4000,
                       log=lambda *a: None)
    b = prepare_tokens(corpus, c4_tok, str(tmp_path / "b"), max_tokens=30000, num_workers=2, shard_tokens=4000,
                       log=lambda *a: None)
    assert len(b.shards) > 2 and json.load(open(os.path.join(b.path, "manifest.json")))["shards"] == \
        json.load(open(os.path.join(a.path, "manifest.json")))["shards"]
    np.testing.assert_array_equal(TokenStream(a).slice(0, 30000), TokenStream(b).slice(0, 30000))


# ---------------------------------------------------------------------------- samplers

def test_sequential_sampler_streams_and_ranks():
    s = StreamSampler(n_windows=103, batch_size=4)
    n = 103 // 4
    assert s.steps_per_epoch == n == 25
    assert list(s.next()) == [0, 25, 50, 75]
    assert list(s.next()) == [1, 26, 51, 76]
    # stream j reads j*n ... j*n+n-1 in order
    s.position = 24
    assert list(s.next()) == [24, 49, 74, 99]
    assert list(s.next()) == [0, 25, 50, 75]  # epoch 2 repeats the order
    # two ranks take contiguous blocks of streams; together they equal the 1-rank batch
    r0, r1 = StreamSampler(103, 4, rank=0, world_size=2), StreamSampler(103, 4, rank=1, world_size=2)
    assert list(r0.next()) + list(r1.next()) == [0, 25, 50, 75]
    st = r0.state_dict()
    r0b = StreamSampler(103, 4, rank=0, world_size=2)
    r0b.load_state_dict(st)
    assert list(r0b.next()) == list(r0.next()) == [1, 26]


def test_shuffled_sampler_is_a_seeded_permutation():
    s = StreamSampler(40, 8, mode="shuffled", seed=5)
    epoch = np.concatenate([s.next() for _ in range(5)])
    assert sorted(epoch.tolist()) == list(range(40))
    assert epoch.tolist() != list(range(40))
    t = StreamSampler(40, 8, mode="shuffled", seed=5)
    t.load_state_dict({"position": 3, "n_windows": 40, "batch_size": 8})
    np.testing.assert_array_equal(t.next(), epoch[24:32])
    with pytest.raises(ValueError, match="data.sampler"):
        StreamSampler(40, 8, mode="random")
    with pytest.raises(ValueError, match="fewer than one batch"):
        StreamSampler(3, 8)


def test_paper_validation_budgets():
    assert paper_valid_tokens("c4") == 1032192 == 1008 * 1024
    assert paper_valid_tokens("pes2o") == 4209664 == 4111 * 1024
