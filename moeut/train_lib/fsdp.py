"""FSDP2 sharding and world-size-independent model/optimiser state (docs/training.md "FSDP").

Owns `shard_model` (train.parallel=fsdp: `torch.distributed.fsdp.fully_shard` on every unique
layer, then on the root, with a bf16-compute / fp32-reduce `MixedPrecisionPolicy` when training
in bf16) and the checkpoint side of every parallel mode: `full_model_state` /
`full_optimizer_state` gather full, parameter-name-keyed state dicts through
`torch.distributed.checkpoint.state_dict` (DTensor-aware: the same dict from a plain, DDP or
FSDP run at any world size), and `load_optimizer_state` loads such a dict into a plain or
sharded optimiser (each rank keeps its shard). A checkpoint therefore reshards on load: saved
with W processes (DDP or FSDP), it resumes with any W' and either mode.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

OPTIM_KEYS = "fqn"  # train_state.pt "optimizer_keys": state keyed by parameter name (not position)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` (the plain module of the run) has been sharded by `shard_model`."""
    return isinstance(model, FSDPModule)


def mixed_precision_policy(autocast_dtype: Optional[torch.dtype]) -> MixedPrecisionPolicy:
    """The FSDP policy for train.precision: bf16 -> parameters all-gathered and computed in bf16,
    gradients reduced in fp32; fp32 (None) -> no cast (numerics equal an unsharded run).
    Raises ValueError naming train.parallel for fp16 (the grad scaler does not support sharded
    gradients here)."""
    if autocast_dtype is None:
        return MixedPrecisionPolicy()
    if autocast_dtype == torch.bfloat16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    raise ValueError(f"train.parallel=fsdp: train.precision {autocast_dtype} is not supported with FSDP; "
                     "use bf16 or fp32, or train.parallel=ddp")


def shard_model(model: torch.nn.Module, autocast_dtype: Optional[torch.dtype]) -> torch.nn.Module:
    """Shard `model` in place over the default process group (every rank must call it, with
    identical weights): `fully_shard` on each unique layer (`model.unique_layer(g)` for every g
    of `model.execution_order()`, a shared layer once), then on the root (embedding, head).
    Returns the same module, now an FSDPModule whose parameters are DTensors; build the
    optimiser after this call. Raises ValueError naming train.parallel for a model without
    `unique_layer` / `execution_order`, or for fp16."""
    policy = mixed_precision_policy(autocast_dtype)
    if not (hasattr(model, "unique_layer") and hasattr(model, "execution_order")):
        raise ValueError(f"train.parallel=fsdp: {type(model).__name__} has no unique_layer/execution_order")
    done = set()
    for _, g, _ in model.execution_order():
        layer = model.unique_layer(g)
        if id(layer) not in done:
            done.add(id(layer))
            fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The model's full state dict (parameter names as in an unsharded model, CPU tensors).
    Collective for a sharded model (every rank calls it; rank 0 gets the tensors, the others
    an empty dict); a plain model's own `state_dict()` otherwise."""
    if not is_sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=_FULL)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """The optimiser's full state keyed by parameter name ({"state": {name: {...}},
    "param_groups": [...]}), loadable at any world size, plain or sharded. Collective for a
    sharded model (rank 0 gets it, the others an empty dict)."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """Load a `full_optimizer_state` dict (every rank passes the full dict; a sharded optimiser
    keeps its rank's shard). Raises ValueError/KeyError when it does not fit the model."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
