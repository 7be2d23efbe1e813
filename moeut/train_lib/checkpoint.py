"""Full training-state checkpoints on top of `moeut.checkpoint` (layout in its docstring).

    train_state.pt  `TrainState.state_dict()` (train_lib/state.py): optimiser, grad scaler, step,
                    tokens seen, sampler position, wandb run id, the open log window's
                    accumulators, and per rank: RNG states and routing-metric accumulators
    config.yaml     the resolved run config

The LR schedule is a closed form of the step (schedule.py), so its "state" is the step itself.
Resume picks the newest checkpoint whose files all load; a truncated or corrupt one is skipped
with a warning (a crash can only leave `step_*.tmp`, but disks and copies do fail).
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Dict, Optional

import torch
import yaml

from ..checkpoint import (find_checkpoints, load_state_dict_strict, open_checkpoint, read_checkpoint_file,
                          save_checkpoint, unwrap_model)

TRAIN_STATE = "train_state.pt"


def save_training_checkpoint(run_dir: str, step: int, model, model_config, *, train_state: Dict[str, Any],
                             tokenizer, raw_config: Dict[str, Any], keep_last: Optional[int] = None,
                             meta: Optional[Dict[str, Any]] = None) -> str:
    """Write checkpoints/step_XXXXXXX atomically (rank 0 only). `train_state` is
    `TrainState.state_dict()` (train_lib/state.py): everything besides the weights."""

    def write_state(path: str) -> None:
        torch.save(train_state, path)

    def write_config(path: str) -> None:
        with open(path, "w") as f:
            yaml.safe_dump(raw_config, f, sort_keys=False)

    m = {"tokens_seen": train_state["tokens_seen"], "wandb_id": train_state.get("wandb_id"), "kind": "training"}
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
    tok = os.path.join(path, "tokenizer.model")
    return {"meta": meta, "model_config": model_config, "model": model_state, "train": train_state, "path": path,
            "tokenizer_path": tok if os.path.isfile(tok) else None}


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


def write_file_atomic(path: str, data: bytes) -> None:
    """Write `path` through a temporary file and a rename, so a reader (or a crash) never sees
    it half-written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def commit_run_dir(run_dir: str, tokenizer, files: Optional[Dict[str, str]] = None) -> None:
    """The first write of a start into the run dir, after config, data, tokenizer and checkpoint
    have been validated against each other: the run's tokenizer.model (unchanged when it exists:
    validation has checked it is the same tokenizer) and `files` ({relative path: text}, e.g.
    Hydra's .hydra/config.yaml, hydra.yaml, overrides.yaml), each written atomically."""
    os.makedirs(run_dir, exist_ok=True)
    run_tok = os.path.join(run_dir, "tokenizer.model")
    if tokenizer is not None and not os.path.isfile(run_tok):
        write_file_atomic(run_tok, tokenizer.model_proto)
    for rel, text in (files or {}).items():
        write_file_atomic(os.path.join(run_dir, rel), text.encode("utf-8"))
