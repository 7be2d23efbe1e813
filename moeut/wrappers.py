"""The wrappers training puts around a model, and `unwrap_model`, which strips them.

    DistributedDataParallel   `.module` (moeut.train_lib.distributed sets it up)
    torch.compile             `._orig_mod` (an OptimizedModule)

FSDP2 (`fully_shard`, moeut.train_lib.fsdp) shards in place and adds no wrapper. A bottom-layer
module (imports only torch), so that both the checkpoint code and the training loop use it
without the checkpoint code importing training, or the training loop importing checkpoint I/O
to strip a wrapper.
"""
from __future__ import annotations

import torch


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside any nesting of DDP (`.module`) and torch.compile (`._orig_mod`) wrappers
    (the module itself when it has none)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


__all__ = ["unwrap_model"]
