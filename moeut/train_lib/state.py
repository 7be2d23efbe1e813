"""A training run's state, as one object with `state_dict` / `load_state_dict` (SPEC §4.5).

Owns `TrainState`: everything a training step reads and changes, and everything that feeds the
next step or the next log record, so that an interrupted and resumed run logs exactly what an
uninterrupted one logs (single- and multi-process):

    model                           the plain module being trained (no DDP / torch.compile wrapper);
                                    its weights are checkpointed as model files beside the training
                                    state (moeut.checkpoint), so evaluation reads them without it
    step, tokens_seen               counters (the LR schedule is a closed form of `step`)
    optimizer, scaler, sampler      their own state dicts; the optimiser's is the full state keyed
                                    by parameter name (moeut.train_lib.fsdp: the same under DDP and
                                    FSDP, loadable at any world size; older checkpoints keyed by
                                    position still load unsharded); the sampler's position is the
                                    global data position
    wandb_id                        the logger's run id, so a resume continues the same wandb run
    alarm                           the collapse alarm's fired warnings and CE history (rank 0's)
    window                          accumulators of the train/ record in progress: loss/ce/reg sums
                                    and the number of finite steps in them, tokens and seconds
                                    since the last record (train/tokens_per_s), the run of
                                    non-finite losses
    ranks[r]                        per-rank state, gathered to rank 0 for the checkpoint: RNG
                                    streams (python, numpy, torch CPU, this rank's CUDA device;
                                    each rank draws its own dropout), and the rank's routing-metric
                                    accumulators (counts are summed over ranks only when logged)

`state_dict()` is a collective under DDP and FSDP (every rank must call it; rank 0 receives the full
list). `load_state_dict()` gives each rank its own entry. A checkpoint written by another number
of processes cannot restore per-rank streams: that is reported with a warning naming
`train.resume`, never silently.
"""
from __future__ import annotations

import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .distributed import DistInfo, gather_object
from .fsdp import OPTIM_KEYS, full_optimizer_state, is_sharded, load_optimizer_state

STATE_FORMAT = 2  # 1: one RNG state from rank 0, no log-window accumulators


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """This process's RNG streams: python, numpy, torch CPU and (on CUDA) `device`'s generator."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: Optional[torch.device] = None) -> None:
    """Restore the streams of `rng_state` (python, numpy, torch CPU; CUDA on a CUDA `device`).
    A CUDA device without a saved CUDA state warns naming train.resume and keeps its stream."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device is not None and device.type == "cuda":
        cuda = state.get("cuda")
        if isinstance(cuda, (list, tuple)):  # format 1 saved get_rng_state_all()
            cuda = cuda[device.index or 0] if len(cuda) > (device.index or 0) else None
        if cuda is None:
            warnings.warn(f"train.resume: the checkpoint has no CUDA RNG state for {device}; "
                          "this rank's CUDA random stream restarts from the seed")
        else:
            torch.cuda.set_rng_state(cuda, device)


@dataclass
class LogWindow:
    """Accumulators of the train/ log record in progress (global values: identical on all ranks)."""
    loss_sum: float = 0.0
    ce_sum: float = 0.0
    reg_sum: float = 0.0
    n_finite: int = 0  # steps whose loss entered the sums (non-finite steps are skipped)
    tokens: int = 0  # tokens trained on since the last record
    seconds: float = 0.0  # wall time of this window before the current process started timing it
    nonfinite_run: int = 0  # non-finite losses in a row (train.max_nonfinite)
    aux_sums: Dict[str, float] = field(default_factory=dict)  # "aux/<name>": each auxiliary loss's sum (part of reg)
    _t0: float = field(default_factory=time.perf_counter, repr=False, compare=False)

    def add(self, loss: float, ce: float, reg: float, aux: Optional[Dict[str, float]] = None) -> None:
        """Add one finite step's global mean loss, cross-entropy and regulariser (nats/token), and
        the auxiliary losses `aux` ("aux/<name>" -> value) that the regulariser includes."""
        self.loss_sum += loss
        self.ce_sum += ce
        self.reg_sum += reg
        for name, value in (aux or {}).items():
            self.aux_sums[name] = self.aux_sums.get(name, 0.0) + value
        self.n_finite += 1

    def start_clock(self) -> None:
        """Time from now (the training loop starts): start-up work is not training time."""
        self._t0 = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds of training in this window, summed over the processes that ran it (downtime
        between an interruption and the resume is not counted)."""
        return self.seconds + time.perf_counter() - self._t0

    def record(self) -> Dict[str, float]:
        """The window's train/ means and throughput; then the window starts again."""
        n = max(self.n_finite, 1)
        out = {"train/loss": self.loss_sum / n, "train/ce": self.ce_sum / n, "train/reg": self.reg_sum / n,
               "train/tokens_per_s": self.tokens / max(self.elapsed(), 1e-9)}
        out.update({name: total / n for name, total in sorted(self.aux_sums.items())})
        run = self.nonfinite_run
        self.__init__()
        self.nonfinite_run = run  # a run of non-finite losses spans log records
        return out

    def state_dict(self) -> Dict[str, Any]:
        """The accumulators as plain numbers; `seconds` includes the time timed so far."""
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        d["seconds"] = self.elapsed()
        return d

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        """Restore from `state_dict()`; the clock restarts now (downtime is not counted)."""
        self.__init__(**d)


class TrainState:
    """The run state of the module docstring (SPEC §4.5).

    model: the plain nn.Module trained (its weights are not part of `state_dict()`: the
    checkpoint stores them as model files); optimizer: torch.optim.Optimizer over all its
    parameters; scaler: torch.amp.GradScaler or None (fp16 only); sampler: StreamSampler (the data
    position); dist: this process's DistInfo; routing: RoutingStats (routing-metric accumulators)
    or None for a model without experts; seed: train.seed (re-seeds per-rank streams when a
    checkpoint of another world size is resumed). `step` and `tokens_seen` start at 0, `window`
    (LogWindow) empty, `wandb_id` None."""

    def __init__(self, model: torch.nn.Module, optimizer, scaler, sampler, dist: DistInfo, routing=None,
                 seed: int = 0):
        self.seed = seed
        self.model = model
        self.dist, self.optimizer, self.scaler, self.sampler, self.routing = dist, optimizer, scaler, sampler, routing
        self.step = 0
        self.tokens_seen = 0
        self.wandb_id: Optional[str] = None
        self.window = LogWindow()
        self.alarm = None  # the collapse alarm (alarm.CollapseAlarm; fed on rank 0), set by the start

    # -- per-rank part ---------------------------------------------------------------------
    def _rank_state(self) -> Dict[str, Any]:
        st: Dict[str, Any] = {"rng": rng_state(self.dist.device), "routing": None}
        if self.routing is not None:
            st["routing"] = {"counts": {k: torch.as_tensor(v) for k, v in self.routing.counts_numpy().items()},
                             "layer_index": self.routing.layer_index.copy()}
        return st

    def _load_rank_state(self, ranks: List[Dict[str, Any]], source: str) -> None:
        W, r = self.dist.world_size, self.dist.rank
        if len(ranks) == W:
            mine = ranks[r]
            set_rng_state(mine["rng"], self.dist.device)
            if self.routing is not None and mine.get("routing") is not None:
                self.routing.load_counts(mine["routing"]["counts"])
                self.routing.layer_index[...] = mine["routing"]["layer_index"]
            return
        warnings.warn(f"train.resume: {source} was written by {len(ranks)} process(es), this run has {W}: "
                      f"the per-rank dropout streams cannot be restored (each rank is re-seeded from "
                      f"train.seed, the step and its rank), so with dropout or expert dropout the losses "
                      f"differ from an uninterrupted run")
        seed_all(self.seed + 1 + r + 1_000_003 * self.step)
        # Routing counts are only ever used summed over ranks: put the saved sum on rank 0.
        if self.routing is not None and all(s.get("routing") is not None for s in ranks):
            total = {k: sum(s["routing"]["counts"][k] for s in ranks) for k in ranks[0]["routing"]["counts"]}
            if r != 0:
                total = {k: torch.zeros_like(v) for k, v in total.items()}
            self.routing.load_counts(total)
            self.routing.layer_index[...] = ranks[0]["routing"]["layer_index"]

    # -- whole state -----------------------------------------------------------------------
    def state_dict(self) -> Optional[Dict[str, Any]]:
        """Everything but the weights, as saved in a checkpoint's train_state.pt: counters,
        optimizer / scaler / sampler state, the log window, the wandb id and every rank's RNG and
        routing accumulators (gathered), the optimiser state gathered in full keyed by parameter name.
        Collective under DDP and FSDP: every rank calls it; rank 0 gets
        the dict, the others None."""
        optim = full_optimizer_state(self.model, self.optimizer)  # collective when sharded
        ranks = gather_object(self._rank_state())
        if not self.dist.is_main:
            return None
        return {
            "format": STATE_FORMAT, "step": self.step, "tokens_seen": self.tokens_seen, "wandb_id": self.wandb_id,
            "optimizer": optim, "optimizer_keys": OPTIM_KEYS,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "sampler": self.sampler.state_dict(), "window": self.window.state_dict(),
            "world_size": self.dist.world_size, "ranks": ranks,
            "alarm": self.alarm.state_dict() if self.alarm is not None else None,
        }

    def load_state_dict(self, d: Dict[str, Any], source: str = "checkpoint") -> None:
        """Restore on every rank (each takes its own RNG/routing entry). Raises ValueError naming
        `source` when the optimiser state does not fit this model."""
        saved_groups = [g.get("name", "all") for g in d["optimizer"].get("param_groups", [])]
        now_groups = [g.get("name", "all") for g in self.optimizer.param_groups]
        if saved_groups and saved_groups != now_groups:
            raise ValueError(f"optim.groups: {source} was trained with the parameter groups {saved_groups}, these "
                             f"settings give {now_groups}; resume with optim.groups.* set as when it was started "
                             "(all at their defaults = one group)")
        try:
            if d.get("optimizer_keys") == OPTIM_KEYS:  # by parameter name: any world size, DDP or FSDP
                load_optimizer_state(self.model, self.optimizer, d["optimizer"])
            elif is_sharded(self.model):
                raise ValueError("it is keyed by parameter position (a checkpoint written before train.parallel "
                                 "existed); resume it once with train.parallel=ddp, whose checkpoints load here")
            else:
                self.optimizer.load_state_dict(d["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise ValueError(f"train.resume: optimizer state in {source} does not fit this model: {e}") from e
        if self.scaler is not None:
            if d.get("scaler") is not None:
                self.scaler.load_state_dict(d["scaler"])
            else:
                warnings.warn(f"train.precision: {source} has no fp16 grad-scaler state (saved with another "
                              "precision); the loss scale restarts from its default")
        saved = d["sampler"]
        for key in ("mode", "seed"):
            if key in saved and saved[key] != getattr(self.sampler, key):
                warnings.warn(f"data.{'sampler' if key == 'mode' else 'shuffle_seed'}: {source} was trained with "
                              f"{saved[key]!r}, now {getattr(self.sampler, key)!r}: the data order after the "
                              "resume differs from the original run")
        self.sampler.load_state_dict(saved)
        self.step, self.tokens_seen, self.wandb_id = int(d["step"]), int(d["tokens_seen"]), d.get("wandb_id")
        if self.alarm is not None and d.get("alarm") is not None:
            self.alarm.load_state_dict(d["alarm"])
        if d.get("format", 1) >= 2:
            self.window.load_state_dict(d["window"])
            self._load_rank_state(d["ranks"], source)
        else:  # format 1: one RNG state (rank 0's) and the routing counts of rank 0
            warnings.warn(f"train.resume: {source} is an older checkpoint without per-rank RNG state or log "
                          "accumulators; the first train/ record after the resume averages only the steps "
                          "run since, and other ranks re-use rank 0's random streams")
            set_rng_state(d["rng"], self.dist.device)
            if self.routing is not None and d.get("routing_counts") is not None and self.dist.is_main:
                self.routing.load_counts(d["routing_counts"])
