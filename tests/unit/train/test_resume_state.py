"""Resume state per rank (SPEC 4.5): a checkpoint written by W processes and resumed by W processes gives
each rank its own saved random streams and routing accumulators, not rank 0's. Checked on rank 1 of 2
with hand-built per-rank entries (no process group needed: loading is local). And the log window's
training time saved across the interruption, on a fake clock."""
import random

import numpy as np
import torch

from moeut.data.dataset import StreamSampler
from moeut.analysis.routing import RoutingStats
from moeut.train_lib.distributed import DistInfo
from moeut.train_lib.state import TrainState, rng_state, seed_all


def _state(rank, world):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return TrainState(model, opt, None, StreamSampler(100, 4, "shuffled", 7, rank, world),
                      DistInfo(rank=rank, world_size=world), RoutingStats(2, 2, 4), seed=0)


def _rank_entry(seed, routing):
    seed_all(seed)
    st = rng_state(torch.device("cpu"))
    want = (torch.rand(3), np.random.rand(2), random.random())  # what this rank draws after the resume
    counts = {k: torch.full(v.shape, seed).to(v.dtype) for k, v in routing.state_counts().items()}
    return {"rng": st, "routing": {"counts": counts, "layer_index": np.array([[0, 2], [1, 3]])}}, want, counts


def test_each_rank_restores_its_own_streams_and_counts():
    single = _state(0, 1)
    d = single.state_dict()
    r0, want0, counts0 = _rank_entry(10, single.routing)
    r1, want1, counts1 = _rank_entry(20, single.routing)
    d["ranks"], d["world_size"] = [r0, r1], 2
    for rank, want, counts in ((0, want0, counts0), (1, want1, counts1)):
        seed_all(999)
        st = _state(rank, 2)
        st.load_state_dict(d, source="test")
        got = (torch.rand(3), np.random.rand(2), random.random())
        assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2], rank
        for k, v in counts.items():
            assert torch.equal(st.routing.state_counts()[k], v), (rank, k)


def test_log_window_saves_the_time_run_so_far_in_this_process(monkeypatch):
    """train/tokens_per_s after a resume divides by the window's training time before and after the
    interruption: state_dict's `seconds` includes the time timed in this process (fake clock)."""
    import time

    from moeut.train_lib.state import LogWindow
    clock = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    w = LogWindow(seconds=5.0)
    w.start_clock()
    w.tokens = 700
    clock[0] = 130.0
    d = w.state_dict()
    assert d["seconds"] == 35.0  # 5 s from an earlier process + 30 s timed here
    v = LogWindow()
    v.load_state_dict(d)
    clock[0] = 500.0  # downtime between the save and the resume is not counted
    v.start_clock()
    v.tokens += 300
    clock[0] = 515.0
    assert v.record()["train/tokens_per_s"] == 1000 / 50.0
