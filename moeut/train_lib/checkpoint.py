"""Full training-state checkpoints on top of `moeut.checkpoint` (layout in its docstring).

    train_state.pt  optimiser, grad scaler, step, tokens seen, sampler position, RNG states
                    (python, numpy, torch CPU, CUDA), wandb run id, routing counters
    config.yaml     the resolved run config

The LR schedule is a closed form of the step (schedule.py), so its "state" is the step itself.
Resume picks the newest checkpoint whose files all load; a truncated or corrupt one is skipped
with a warning (a crash can only leave `step_*.tmp`, but disks and copies do fail).
"""
from __future__ import annotations

import os
import random
import shutil
from typing import Any, Dict, Optional

import numpy as np
import torch
import yaml

from ..checkpoint import (find_checkpoints, load_state_dict_strict, open_checkpoint, read_checkpoint_file,
                          save_checkpoint, unwrap_model)

TRAIN_STATE = "train_state.pt"


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(run_dir: str, step: int, model, model_config, *, optimizer, scaler, sampler,
                             tokens_seen: int, tokenizer, raw_config: Dict[str, Any],
                             wandb_id: Optional[str] = None, extra_state: Optional[Dict[str, Any]] = None,
                             keep_last: Optional[int] = None, meta: Optional[Dict[str, Any]] = None) -> str:
    state = {
        "step": step, "tokens_seen": tokens_seen, "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "sampler": sampler.state_dict(), "rng": rng_state(), "wandb_id": wandb_id,
        **(extra_state or {}),
    }

    def write_state(path: str) -> None:
        torch.save(state, path)

    def write_config(path: str) -> None:
        with open(path, "w") as f:
            yaml.safe_dump(raw_config, f, sort_keys=False)

    m = {"tokens_seen": tokens_seen, "wandb_id": wandb_id, "kind": "training"}
    m.update(meta or {})
    path = save_checkpoint(os.path.join(run_dir, "checkpoints"), step, unwrap_model(model), model_config,
                           tokenizer=tokenizer, meta=m,
                           extra_files={TRAIN_STATE: write_state, "config.yaml": write_config})
    if keep_last:
        prune_checkpoints(run_dir, keep_last)
    return path


def prune_checkpoints(run_dir: str, keep_last: int) -> None:
    for old in find_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _load_all(path: str) -> Dict[str, Any]:
    # read_checkpoint_file names the file in a CheckpointError (missing, truncated, corrupt)
    meta = read_checkpoint_file(os.path.join(path, "meta.json"))
    model_config = read_checkpoint_file(os.path.join(path, "model_config.json"))
    model_state = read_checkpoint_file(os.path.join(path, "model.pt"))
    train_state = read_checkpoint_file(os.path.join(path, TRAIN_STATE), weights_only=False)
    return {"meta": meta, "model_config": model_config, "model": model_state, "train": train_state, "path": path}


def load_latest_training_checkpoint(run_dir: str, log=print) -> Optional[Dict[str, Any]]:
    """The newest checkpoint in `run_dir` whose files all load, or None when there is none.
    Unreadable ones are skipped with a warning naming the file (moeut.checkpoint.open_checkpoint);
    when every checkpoint is unreadable it raises rather than silently starting over."""
    if not find_checkpoints(run_dir):
        return None
    return open_checkpoint(run_dir, _load_all, option="train.resume", log=log)


def load_training_checkpoint(path: str) -> Dict[str, Any]:
    """One checkpoint dir (or a run dir: its newest readable checkpoint), see open_checkpoint."""
    return open_checkpoint(path, _load_all, option="train.resume")


def restore_model(ckpt: Dict[str, Any], model) -> None:
    """Load the model weights (before building the optimiser: `load_state_dict_strict` assigns
    new parameter tensors). Raises naming the mismatching keys when the checkpoint comes from
    another architecture."""
    load_state_dict_strict(unwrap_model(model), ckpt["model"], source=ckpt["path"])


def restore_train_state(ckpt: Dict[str, Any], optimizer, scaler, sampler) -> None:
    st = ckpt["train"]
    optimizer.load_state_dict(st["optimizer"])
    if scaler is not None and st.get("scaler") is not None:
        scaler.load_state_dict(st["scaler"])
    sampler.load_state_dict(st["sampler"])
    set_rng_state(st["rng"])
