"""Process-group setup for one process, torchrun, or plain `srun` (SLURM_* variables).

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT. Under `srun python
train.py` (one task per GPU) we read SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS and take the
first host of SLURM_JOB_NODELIST as the master (via `scontrol show hostnames`). Only rank 0
logs and writes files.
"""
from __future__ import annotations

import datetime
import gc
import os
import subprocess
import time
import weakref
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """This process's place in the job: global `rank`, `local_rank` on its node, `world_size`
    (1 without torch.distributed), and the torch `device` it trains on."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes the run dir."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one process (a torch.distributed process group is in use)."""
        return self.world_size > 1


def _slurm_master() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        return out[0] if out else "127.0.0.1"
    except (OSError, subprocess.SubprocessError):
        # a single-node list such as "node017" needs no expansion
        return nodelist.split(",")[0].split("[")[0]


def env_rank_info() -> tuple:
    """(rank, local_rank, world_size) from torchrun, else SLURM (if several tasks), else 0/0/1."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return (int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        local = int(os.environ.get("SLURM_LOCALID", 0))
        os.environ.setdefault("MASTER_ADDR", _slurm_master())
        # a port derived from the job id, so two jobs sharing a node do not collide
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(local), WORLD_SIZE=str(world))
        return rank, local, world
    return 0, 0, 1


def pick_device(spec: str, local_rank: int) -> torch.device:
    """train.device -> a torch device: "auto" is CUDA when available, else CPU; a bare "cuda" is
    the GPU of this node-local rank (and made current). Raises ValueError naming train.device
    when CUDA is asked for but not available (moeut.cli.check_device_available)."""
    from ..cli import check_device_available
    check_device_available(spec, "train.device")
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(spec)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device_spec: str = "auto", timeout_min: int = 30) -> DistInfo:
    """Rank and device of this process (torchrun / SLURM / single process) and, with several
    processes, the process group (NCCL on CUDA, gloo on CPU; collectives time out after
    `timeout_min` minutes, train.dist_timeout_min)."""
    rank, local_rank, world = env_rank_info()
    device = pick_device(device_spec, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_min))
    return DistInfo(rank, local_rank, world, device)


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` (picklable) on every rank; `obj` itself without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box: List[Any] = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(obj: Any, dst: int = 0) -> Optional[List[Any]]:
    """Every rank's `obj` as a list on rank `dst` (None elsewhere); [obj] without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: Optional[List[Any]] = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def all_reduce_sum_(tensors: List[torch.Tensor]) -> None:
    """Sum each tensor over ranks, in place (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def any_rank(flag: bool, device: Optional[torch.device] = None) -> bool:
    """True if `flag` is set on any rank (e.g. a pre-emption signal seen by one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device or torch.device("cpu"))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def cleanup() -> None:
    """Destroy the process group, if any (end of training); free the run's model wrappers before
    calling it (docs/architecture.md, "Process-group teardown")."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # a freed DDP wrapper in a reference cycle would otherwise keep the group past its destruction
        group = weakref.ref(dist.group.WORLD)
        dist.destroy_process_group()
        gc.collect()
        if group() is not None:
            # Still held (torch's fully_shard keeps it): its gloo workers live on into interpreter
            # shutdown, so give them the CPU to drop their last work while they can take the GIL.
            time.sleep(0.2)
