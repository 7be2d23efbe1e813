"""Windows of T+1 tokens over memmapped shards and the paper's samplers (SPEC 5.5-5.7).

Window i is tokens [i*T, i*T + T + 1) of the concatenated stream of all shards: inputs are
w[:-1], targets w[1:], and the extra token is the next window's first. Windows ignore document
boundaries. Shard offsets are cumulative sizes of the *previous* shards (the official code's
off-by-one accumulation is deliberately not replicated, SPEC 5.5).
"""
from __future__ import annotations

import bisect
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .prepare import TokenManifest

SAMPLERS = ("sequential", "shuffled")


class TokenStream:
    """Read-only concatenation of the memmapped token shards of a `TokenManifest` (SPEC 5.4/5.5).

    Empty shards are skipped; `len()` is the total token count. Raises ValueError naming the shard
    file when its size disagrees with manifest.json."""

    def __init__(self, manifest: TokenManifest):
        self.manifest = manifest
        self.shards: List[np.memmap] = []
        for path, info in zip(manifest.shard_paths(), manifest.shards):
            n = int(info["tokens"])
            if n == 0:
                continue
            mm = np.memmap(path, dtype=np.dtype(manifest.dtype), mode="r")
            if len(mm) != n:
                raise ValueError(f"{path}: holds {len(mm)} tokens but manifest.json says {n} "
                                 f"(delete {manifest.path} to re-tokenise)")
            self.shards.append(mm)
        # starts[k] = first global position of shard k
        self.starts = [0]
        for mm in self.shards:
            self.starts.append(self.starts[-1] + len(mm))

    def __len__(self) -> int:
        return self.starts[-1]

    def slice(self, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) as int64, crossing shard boundaries when needed."""
        if not 0 <= a <= b <= len(self):
            raise IndexError(f"token range [{a}, {b}) outside stream of {len(self)}")
        out = np.empty(b - a, dtype=np.int64)
        k = bisect.bisect_right(self.starts, a) - 1
        pos = a
        while pos < b:
            s0 = self.starts[k]
            take = min(b, self.starts[k + 1]) - pos
            out[pos - a: pos - a + take] = self.shards[k][pos - s0: pos - s0 + take]
            pos += take
            k += 1
        return out


def stream_warning(stream: TokenStream, notes: Sequence[str]) -> str:
    """The one warning text about a token stream: its cache path, then every note (what the
    windows or the sampler leave out of it), joined by "; "."""
    return f"{stream.manifest.path}: " + "; ".join(notes)


class WindowDataset:
    """Non-overlapping windows of T inputs + 1 target token. `limit_tokens` caps the stream used
    (the paper's train limit / validation budget); `limit_name` says where that limit comes from
    (an option, or the train budget), named when the stream holds fewer tokens than it (not with
    `warn_short=False`: a default budget whose shortfall the caller reports in its own terms).

    What the stream loses (fewer tokens than the limit; a tail shorter than a window) is collected
    in `notes` and warned about in one warning naming the stream's file; `warn=False` leaves the
    warning to the caller, which adds its own notes on the same stream (one warning per stream)."""

    def __init__(self, stream: TokenStream, seq_len: int, limit_tokens: Optional[int] = None,
                 limit_name: str = "the token limit", warn_short: bool = True, warn: bool = True):
        self.stream = stream
        self.seq_len = seq_len
        usable = len(stream) if limit_tokens is None else min(len(stream), limit_tokens + 1)
        # Each window needs T+1 tokens; the last target may be the first token past the limit.
        self.n_windows = max(0, (usable - 1) // seq_len)
        # Predicted tokens inside the limit that no window covers (fewer than T): reported, not hidden.
        self.unused_tokens = max(0, usable - 1 - self.n_windows * seq_len)
        self.notes: List[str] = []
        if warn_short and limit_tokens is not None and len(stream) < limit_tokens + 1 and self.n_windows:
            self.notes.append(f"holds {len(stream):,} tokens, fewer than the {limit_tokens + 1:,} asked for "
                              f"({limit_name}); using all of them")
        if self.unused_tokens and self.n_windows:
            limit = ("the whole stream" if limit_tokens is None or len(stream) <= limit_tokens
                     else f"the limit of {limit_tokens:,}")
            self.notes.append(f"the last {self.unused_tokens} of {usable - 1:,} tokens ({limit}) do not fill a "
                              f"window of data.seq_len={seq_len} and are not used")
        if warn and self.notes:
            import warnings
            warnings.warn(stream_warning(stream, self.notes), stacklevel=2)

    def __len__(self) -> int:
        return self.n_windows

    def window(self, i: int) -> np.ndarray:
        """Window i: tokens [i*T, i*T + T + 1) as int64 [T+1] (SPEC 5.5); IndexError if out of range."""
        if not 0 <= i < self.n_windows:
            raise IndexError(f"window {i} outside [0, {self.n_windows})")
        a = i * self.seq_len
        return self.stream.slice(a, a + self.seq_len + 1)

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """int64 [len(indices), T+1]."""
        if len(indices) == 0:
            return torch.empty(0, self.seq_len + 1, dtype=torch.long)
        return torch.from_numpy(np.stack([self.window(int(i)) for i in indices]))


class StreamSampler:
    """The paper's sequential multi-stream sampler, or a shuffled variant (SPEC 5.6).

    `batch_size` is the *global* batch B. Sequential: n = N div B windows per stream; step p
    uses windows [p, p+n, ..., p+(B-1)n]; stream j reads windows j*n ... j*n+n-1 in order.
    Shuffled: a fresh permutation of the N windows per epoch (seeded by seed+epoch), B per step.
    After n steps an epoch ends and the order repeats (sequential) or is re-drawn (shuffled);
    the paper's train limit makes that never happen there.
    Data parallelism: rank r takes the contiguous block of B/W streams [r*B/W, (r+1)*B/W).
    The state is the global step position p (and nothing else), saved in checkpoints.
    """

    def __init__(self, n_windows: int, batch_size: int, mode: str = "sequential", seed: int = 0,
                 rank: int = 0, world_size: int = 1, warn: bool = True):
        if mode not in SAMPLERS:
            raise ValueError(f"data.sampler: {mode!r} is not one of {SAMPLERS}")
        if batch_size % world_size:
            raise ValueError(f"train.batch_size={batch_size} not divisible by world size {world_size}")
        self.n_per_stream = n_windows // batch_size
        if self.n_per_stream == 0:
            raise ValueError(f"dataset has {n_windows} windows, fewer than one batch of {batch_size}; "
                             f"use more data or a smaller batch")
        self.n_windows, self.batch_size, self.mode, self.seed = n_windows, batch_size, mode, seed
        self.unused_windows = n_windows - self.n_per_stream * batch_size
        self.notes: List[str] = []  # what the sampler leaves out; warned about unless warn=False
        if self.unused_windows:  # the paper's sampler gives each of the B streams N div B windows
            self.notes.append(f"{self.unused_windows} of {n_windows} windows are never sampled: they do not fill "
                              f"one more window for each of the train.batch_size={batch_size} streams")
        if warn and self.notes:
            import warnings
            warnings.warn("; ".join(self.notes), stacklevel=2)
        self.rank, self.world_size = rank, world_size
        self.position = 0  # global step position p
        self._perm_epoch, self._perm = -1, None

    @property
    def steps_per_epoch(self) -> int:
        """n = N div B: steps before the order repeats (sequential) or is re-drawn (shuffled)."""
        return self.n_per_stream

    def global_indices(self, position: int) -> np.ndarray:
        """Window ids of all B streams at `position` (int64 [B])."""
        epoch, p = divmod(position, self.n_per_stream)
        if self.mode == "sequential":
            return p + self.n_per_stream * np.arange(self.batch_size, dtype=np.int64)
        if self._perm_epoch != epoch:
            rng = np.random.default_rng(self.seed + epoch)
            self._perm = rng.permutation(self.n_per_stream * self.batch_size)
            self._perm_epoch = epoch
        return self._perm[p * self.batch_size:(p + 1) * self.batch_size].astype(np.int64)

    def local_indices(self, position: int) -> np.ndarray:
        """This rank's window ids at `position`: its contiguous B/W of the global batch (int64 [B/W])."""
        b = self.batch_size // self.world_size
        return self.global_indices(position)[self.rank * b:(self.rank + 1) * b]

    def next(self) -> np.ndarray:
        """This rank's window ids at the current position (int64 [B/W]); advances the position by one."""
        idx = self.local_indices(self.position)
        self.position += 1
        return idx

    @property
    def epoch(self) -> int:
        """Completed passes over the windows: position div steps_per_epoch."""
        return self.position // self.n_per_stream

    def state_dict(self) -> Dict[str, int]:
        """{"position", "mode", "seed", "n_windows", "batch_size"}: the position is the whole state;
        the rest lets `load_state_dict` detect a changed dataset or batch."""
        return {"position": self.position, "mode": self.mode, "seed": self.seed,
                "n_windows": self.n_windows, "batch_size": self.batch_size}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Resume at `state["position"]` (KeyError if absent); warns when the state was saved for
        another window count or batch size (the data order then differs from the original run)."""
        if state.get("n_windows") != self.n_windows or state.get("batch_size") != self.batch_size:
            import warnings
            warnings.warn(f"sampler state was saved for {state.get('n_windows')} windows x batch "
                          f"{state.get('batch_size')}, now {self.n_windows} x {self.batch_size}: "
                          f"the data order after resume differs from the original run")
        self.position = int(state["position"])


def paper_valid_tokens(corpus: str, seq_len: int = 1024) -> int:
    """SPEC 5.7: int((const div T) * 0.005) * T with the authors' constants."""
    const = 842021184 if corpus == "pes2o" else 206453965
    return int((const // seq_len) * 0.005) * seq_len
