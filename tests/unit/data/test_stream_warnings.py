"""One warning per token stream: what the windows leave out of a stream (fewer tokens than the
limit, a tail shorter than a window) and, for the training stream, what the sampler leaves out
(windows that do not fill one more per stream) come in one warning naming the stream's file, with
every number of the separate messages (hand-computed here)."""
import warnings
from types import SimpleNamespace

import pytest

from moeut.data.dataset import StreamSampler, WindowDataset
from moeut.train_lib.data import RunData, train_sampler
from moeut.train_lib.distributed import DistInfo


class FakeStream:
    """What WindowDataset reads of a stream to size it: its length and its cache path."""

    def __init__(self, n_tokens: int, path: str):
        self.n_tokens, self.manifest = n_tokens, SimpleNamespace(path=path)

    def __len__(self) -> int:
        return self.n_tokens


def caught(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(x.message) for x in w]


def test_short_stream_with_a_tail_is_one_warning():
    # 1,000 tokens, limit 2,000 (+1 target): all 999 predicted tokens usable; 999 = 15 x 64 + 39
    ds, msgs = caught(lambda: WindowDataset(FakeStream(1000, "/cache/c4-validation"), 64, limit_tokens=2000,
                                            limit_name="data.valid_tokens, validation set 'c4'"))
    assert len(ds) == 15 and ds.unused_tokens == 39
    assert msgs == ["/cache/c4-validation: holds 1,000 tokens, fewer than the 2,001 asked for (data.valid_tokens, "
                    "validation set 'c4'); using all of them; the last 39 of 999 tokens (the whole stream) do not "
                    "fill a window of data.seq_len=64 and are not used"]


def test_each_note_alone_and_none():
    _, msgs = caught(lambda: WindowDataset(FakeStream(1000, "/s"), 64))
    assert msgs == ["/s: the last 39 of 999 tokens (the whole stream) do not fill a window of data.seq_len=64 "
                    "and are not used"]
    _, msgs = caught(lambda: WindowDataset(FakeStream(1025, "/s"), 64, limit_tokens=2000, limit_name="L"))
    assert msgs == ["/s: holds 1,025 tokens, fewer than the 2,001 asked for (L); using all of them"]  # 1024 = 16 x 64
    _, msgs = caught(lambda: WindowDataset(FakeStream(5000, "/s"), 64, limit_tokens=640))  # 640 = 10 x 64
    assert msgs == []
    ds, msgs = caught(lambda: WindowDataset(FakeStream(1000, "/s"), 64, limit_tokens=2000, warn=False))
    assert msgs == [] and len(ds.notes) == 2  # left to the caller


def test_training_stream_and_its_sampler_are_one_warning():
    # 999 predicted tokens = 62 x 16 + 7; 62 windows = 15 x 4 + 2
    train = WindowDataset(FakeStream(1000, "/cache/train"), 16, warn=False)
    data = RunData(tokenizer=None, train=train, valid={})
    d = SimpleNamespace(sampler="sequential", shuffle_seed=0)
    sampler, msgs = caught(lambda: train_sampler(data, d, 4, DistInfo()))
    assert sampler.n_per_stream == 15 and sampler.unused_windows == 2
    assert msgs == ["/cache/train: the last 7 of 999 tokens (the whole stream) do not fill a window of "
                    "data.seq_len=16 and are not used; 2 of 62 windows are never sampled: they do not fill one "
                    "more window for each of the train.batch_size=4 streams"]
    # another rank of a data-parallel job reads the same stream: it samples its share, silently
    other, msgs = caught(lambda: train_sampler(data, d, 4, DistInfo(rank=1, world_size=2)))
    assert msgs == [] and other.notes == sampler.notes


def test_a_sampler_alone_still_warns():
    with pytest.warns(UserWarning, match=r"^3 of 19 windows are never sampled.*train.batch_size=4 streams$"):
        StreamSampler(19, 4)
    _, msgs = caught(lambda: StreamSampler(19, 4, warn=False))
    assert msgs == []
