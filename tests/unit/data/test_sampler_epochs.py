"""Data order across epoch boundaries (SPEC 5.6): the samplers over several epochs against a naive
reference built from the spec's words, and a resume at any position (mid-epoch, on the boundary, in a
later epoch) continuing exactly as the uninterrupted sampler."""
import numpy as np
import pytest

from moeut.data.dataset import StreamSampler


def naive_sequential(n_windows, B, steps):
    """SPEC 5.6 by hand: n = N div B windows per stream; stream j reads j*n .. j*n+n-1, then starts again."""
    n = n_windows // B
    order, p = [], 0
    for _ in range(steps):
        order.append([j * n + p for j in range(B)])
        p += 1
        if p == n:  # end of an epoch: every stream starts again from its first window
            p = 0
    return order


def naive_shuffled(n_windows, B, seed, steps):
    """SPEC 5.6 by hand: epoch e is a fresh permutation (seeded by seed + e) of the n*B sampled windows,
    read B at a time."""
    n = n_windows // B
    out = []
    for e in range(-(-steps // n)):
        perm = np.random.default_rng(seed + e).permutation(n * B).tolist()
        out.extend(perm[p * B:(p + 1) * B] for p in range(n))
    return out[:steps]


def run(sampler, steps):
    return [sampler.next().tolist() for _ in range(steps)]


@pytest.mark.filterwarnings("ignore:.*never sampled")
def test_sequential_order_over_three_epochs():
    s = StreamSampler(103, 4)  # n = 25, 3 windows unused
    got = run(s, 3 * 25 + 7)
    assert got == naive_sequential(103, 4, 3 * 25 + 7)
    assert s.epoch == 3 and s.position == 82


def test_shuffled_epochs_are_fresh_permutations():
    B, n = 8, 5
    s = StreamSampler(n * B, B, mode="shuffled", seed=3)
    got = run(s, 3 * n)
    assert got == naive_shuffled(n * B, B, 3, 3 * n)
    epochs = [sum(got[e * n:(e + 1) * n], []) for e in range(3)]
    for e in epochs:  # each epoch visits every window exactly once
        assert sorted(e) == list(range(n * B))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]  # re-drawn at each boundary
    assert s.epoch == 3


@pytest.mark.parametrize("mode", ["sequential", "shuffled"])
@pytest.mark.parametrize("resume_at", [3, 5, 6, 11, 14])  # mid-epoch, on a boundary, in later epochs
def test_resume_at_any_position_continues_the_uninterrupted_order(mode, resume_at):
    B, n = 4, 5
    full = run(StreamSampler(n * B, B, mode=mode, seed=9), 16)
    first = StreamSampler(n * B, B, mode=mode, seed=9)
    run(first, resume_at)
    resumed = StreamSampler(n * B, B, mode=mode, seed=9)
    resumed.load_state_dict(first.state_dict())
    assert run(resumed, 16 - resume_at) == full[resume_at:]


@pytest.mark.parametrize("mode", ["sequential", "shuffled"])
def test_ranks_split_each_global_batch_into_contiguous_blocks_in_every_epoch(mode):
    B, n, W = 6, 4, 3
    ref = run(StreamSampler(n * B, B, mode=mode, seed=2), 2 * n + 1)
    ranks = [StreamSampler(n * B, B, mode=mode, seed=2, rank=r, world_size=W) for r in range(W)]
    for step in range(2 * n + 1):
        parts = [rk.next().tolist() for rk in ranks]
        assert all(len(p) == B // W for p in parts)
        assert sum(parts, []) == ref[step]  # rank r holds streams [r*B/W, (r+1)*B/W)
