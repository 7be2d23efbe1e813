"""Resume state per rank (SPEC 4.5): a checkpoint written by W processes and resumed by W processes gives
each rank its own saved random streams and routing accumulators, not rank 0's. Checked on rank 1 of 2
with hand-built per-rank entries (no process group needed: loading is local)."""
import random

import numpy as np
import torch

from moeut.data.dataset import StreamSampler
from moeut.routing import RoutingStats
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
