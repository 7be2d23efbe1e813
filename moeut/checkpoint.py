"""Checkpoint layout shared by training, evaluation, analysis and export (no Hydra, no wandb).

    <run_dir>/checkpoints/step_0001000/
        model.pt            unwrapped model state dict (no compile/DDP prefixes)
        model_config.json   dataclasses.asdict(model config), with its "arch"
        tokenizer.model     SentencePiece model bytes (when the run has a tokenizer)
        meta.json           {"step", "tokens_seen", "format_version", ...}; written last
        train_state.pt      optimiser/scheduler/scaler/RNG/sampler state (training checkpoints only)
        config.yaml         the resolved run config (training checkpoints only)

A checkpoint is written under a temporary name and renamed into place, so a directory named
`step_*` is complete unless the disk itself corrupted it; `find_checkpoints` also checks that
meta.json and model.pt load.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from .config import config_from_dict
from .data.tokenizer import Tokenizer

FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)$")
PathLike = Union[str, os.PathLike]


def build_model(cfg) -> torch.nn.Module:
    """Instantiate the model class registered for `cfg.arch` (see moeut.config.ARCHS)."""
    from .config import ARCHS, _ensure_baselines_registered
    if cfg.arch not in ARCHS:
        _ensure_baselines_registered()
    if cfg.arch not in ARCHS:
        raise ValueError(f"model.arch: unknown architecture {cfg.arch!r}; known: {sorted(ARCHS)}")
    module_name, cls_name = ARCHS[cfg.arch][1].split(":")
    import importlib
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(cfg)


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def save_checkpoint(ckpt_root: PathLike, step: int, model: torch.nn.Module, model_config, *,
                    tokenizer: Optional[Tokenizer] = None, meta: Optional[Dict[str, Any]] = None,
                    extra_files: Optional[Dict[str, Callable[[str], None]]] = None) -> str:
    """Atomically write `ckpt_root/step_XXXXXXX`. `extra_files` maps a file name to a writer
    `fn(path)` (training adds train_state.pt and config.yaml this way). Returns the final path."""
    ckpt_root = os.fspath(ckpt_root)
    os.makedirs(ckpt_root, exist_ok=True)
    final = os.path.join(ckpt_root, checkpoint_dir_name(step))
    tmp = final + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    model = unwrap_model(model)
    torch.save(model.state_dict(), os.path.join(tmp, "model.pt"))
    with open(os.path.join(tmp, "model_config.json"), "w") as f:
        json.dump(dataclasses.asdict(model_config), f, indent=1)
    if tokenizer is not None:
        tokenizer.save(os.path.join(tmp, "tokenizer.model"))
    for name, writer in (extra_files or {}).items():
        writer(os.path.join(tmp, name))
    m = {"step": int(step), "format_version": FORMAT_VERSION}
    m.update(meta or {})
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(m, f, indent=1)
    if os.path.exists(final):  # re-saving the same step (e.g. after a signal): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def is_valid_checkpoint(path: PathLike) -> bool:
    path = os.fspath(path)
    try:
        with open(os.path.join(path, "meta.json")) as f:
            json.load(f)
        with open(os.path.join(path, "model_config.json")) as f:
            json.load(f)
        return os.path.getsize(os.path.join(path, "model.pt")) > 0
    except (OSError, ValueError):
        return False


def find_checkpoints(run_dir: PathLike) -> List[str]:
    """Complete checkpoints under `run_dir/checkpoints` (or `run_dir` itself), oldest first."""
    run_dir = os.fspath(run_dir)
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        root = run_dir
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: PathLike) -> str:
    """A checkpoint directory from either itself or a run dir (newest valid checkpoint)."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "model_config.json")):
        if not is_valid_checkpoint(path):
            raise ValueError(f"checkpoint {path} is incomplete or corrupt")
        return path
    candidates = find_checkpoints(path)
    for c in reversed(candidates):
        if is_valid_checkpoint(c):
            return c
        warnings.warn(f"skipping incomplete or corrupt checkpoint {c}")
    raise FileNotFoundError(f"no valid checkpoint found in {path} (looked for checkpoints/step_*/)")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: Any
    tokenizer: Optional[Tokenizer]
    meta: Dict[str, Any]
    path: str


def load_model(path: PathLike, map_location: Union[str, torch.device] = "cpu",
               expected_vocab_size: Optional[int] = None) -> LoadedModel:
    """Load a model for inference from a checkpoint dir or a run dir; eval mode."""
    ckpt = resolve_checkpoint(path)
    with open(os.path.join(ckpt, "model_config.json")) as f:
        cfg = config_from_dict(json.load(f))
    with open(os.path.join(ckpt, "meta.json")) as f:
        meta = json.load(f)
    tok_path = os.path.join(ckpt, "tokenizer.model")
    tokenizer = Tokenizer.load(tok_path) if os.path.isfile(tok_path) else None
    if tokenizer is not None and tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"checkpoint {ckpt}: tokenizer has {tokenizer.vocab_size} pieces but the "
                         f"model's vocab_size is {cfg.vocab_size}")
    if expected_vocab_size is not None and expected_vocab_size != cfg.vocab_size:
        raise ValueError(f"checkpoint {ckpt}: vocab_size {cfg.vocab_size} != expected {expected_vocab_size}")
    with torch.device("meta"):
        model = build_model(cfg)
    state = torch.load(os.path.join(ckpt, "model.pt"), map_location=map_location, weights_only=True)
    load_state_dict_strict(model, state, source=ckpt)
    model.eval()
    return LoadedModel(model=model, config=cfg, tokenizer=tokenizer, meta=meta, path=ckpt)


def load_state_dict_strict(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str = "") -> None:
    """load_state_dict with a readable error naming missing/unexpected/mismatched keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
        if mismatched:
            parts.append("shape mismatches " + ", ".join(
                f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:20]))
        raise ValueError(f"checkpoint {source} does not match the model architecture: " + "; ".join(parts))
    model.load_state_dict(state, assign=True)
