"""Checkpoint layout shared by training, evaluation, analysis and export (no Hydra, no wandb).

    <run_dir>/checkpoints/step_0001000/
        model.pt            unwrapped model state dict (no compile/DDP prefixes)
        model_config.json   dataclasses.asdict(model config), with its "arch"
        tokenizer.model     SentencePiece model bytes (when the run has a tokenizer)
        meta.json           {"step", "tokens_seen", "format_version", ...}; written last
        train_state.pt      optimiser/scheduler/scaler/RNG/sampler state (training checkpoints only)
        config.yaml         the resolved run config (training checkpoints only)

A checkpoint is written under a temporary name and renamed into place, so a directory named
`step_*` is complete unless the disk itself (or a copy) damaged it. Every reader goes through
`open_checkpoint` (`load_model`, `resolve_checkpoint`, training's resume): given a run dir it
uses the newest readable checkpoint and warns naming each unreadable file it skipped; given one
checkpoint (its dir or a file in it) it stops with a CheckpointError naming the bad file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import warnings
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

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


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated or corrupt. `file` names it."""

    def __init__(self, file: str, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = file, reason


def read_checkpoint_file(path: PathLike, *, map_location: Union[str, torch.device] = "cpu",
                         weights_only: bool = True) -> Any:
    """Read one file of a checkpoint: `.json` with json, anything else with torch.load.
    Every failure (missing, truncated, corrupt) raises CheckpointError naming the file."""
    path = os.fspath(path)
    try:
        if path.endswith(".json"):
            with open(path) as f:
                return json.load(f)
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except FileNotFoundError:
        raise CheckpointError(path, "missing") from None
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise CheckpointError(path, f"unreadable (truncated or corrupt?): {type(e).__name__}: {e}") from None


def verify_checkpoint_files(path: PathLike) -> None:
    """Cheap completeness check of a checkpoint dir without loading the weights: meta.json and
    model_config.json parse, model.pt exists, and every torch file is a complete zip archive (its
    central directory, at the end of the file, is readable: a truncated copy fails here).
    Raises CheckpointError naming the first bad file."""
    path = os.fspath(path)
    read_checkpoint_file(os.path.join(path, "meta.json"))
    read_checkpoint_file(os.path.join(path, "model_config.json"))
    if not os.path.isfile(os.path.join(path, "model.pt")):
        raise CheckpointError(os.path.join(path, "model.pt"), "missing")
    for name in sorted(os.listdir(path)):
        f = os.path.join(path, name)
        if not name.endswith(".pt") or not os.path.isfile(f):
            continue
        try:
            with open(f, "rb") as fh:
                is_zip = fh.read(2) == b"PK"  # torch.save's default format; a legacy pickle is left to torch.load
            if os.path.getsize(f) == 0:
                raise CheckpointError(f, "empty file")
            if is_zip:
                with zipfile.ZipFile(f) as z:
                    z.infolist()
        except (OSError, zipfile.BadZipFile) as e:
            raise CheckpointError(f, f"unreadable (truncated or corrupt?): {type(e).__name__}: {e}") from None


def is_valid_checkpoint(path: PathLike) -> bool:
    try:
        verify_checkpoint_files(path)
        return True
    except CheckpointError:
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


def _candidates(path: str, option: str) -> Tuple[List[str], bool]:
    """(checkpoint dirs to try, newest first; whether the user named one exact checkpoint)."""
    if not path or path == "???":
        raise ValueError(f"{option}: required: a run dir or a checkpoints/step_XXXXXXX dir ({option}=<path>)")
    if os.path.isfile(path):  # a file of a checkpoint (model.pt, meta.json, ...): exactly that checkpoint
        return [os.path.dirname(os.path.abspath(path))], True
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no valid checkpoint: {option}={path} does not exist (give a run dir or a "
                                f"checkpoints/step_XXXXXXX dir)")
    if _STEP_RE.match(os.path.basename(os.path.normpath(path))) or any(
            os.path.exists(os.path.join(path, n)) for n in ("model_config.json", "meta.json", "model.pt")):
        return [path], True
    return list(reversed(find_checkpoints(path))), False


def open_checkpoint(path: PathLike, read: Callable[[str], Any], *, option: str = "checkpoint",
                    log: Optional[Callable[[str], None]] = None) -> Any:
    """The one way to read a checkpoint: `read(checkpoint_dir)` on the checkpoint `path` names.

    - `path` is one checkpoint (a `step_*` dir, or a file inside one such as its model.pt): read
      it; a missing, truncated or corrupt file raises CheckpointError naming the file.
    - `path` is a run dir: try its checkpoints newest first; an unreadable one is skipped with a
      warning naming the file ("skipping unreadable checkpoint ..."), and the newest readable one
      is used. None readable: FileNotFoundError naming the run dir and `option`.
    `read` must raise CheckpointError for unreadable files (read_checkpoint_file does); any other
    error (e.g. a vocabulary mismatch) is not corruption and propagates at once. `log` also gets
    every warning (training writes them to its log).
    """
    path = os.fspath(path)
    candidates, exact = _candidates(path, option)
    skipped = []
    for i, c in enumerate(candidates):
        try:
            result = read(c)
        except CheckpointError as e:
            if exact:
                raise
            msg = (f"skipping unreadable checkpoint {c}: {e}; "
                   + ("trying the previous one" if i + 1 < len(candidates) else "no older checkpoint left"))
            warnings.warn(msg, stacklevel=2)
            if log is not None:
                log(f"[ckpt] WARNING {msg}")
            skipped.append(e.file)
            continue
        if skipped:
            msg = f"{option}={path}: using {c}, the newest readable checkpoint (skipped {', '.join(skipped)})"
            warnings.warn(msg, stacklevel=2)
            if log is not None:
                log(f"[ckpt] WARNING {msg}")
        return result
    looked = (f"{len(candidates)} checkpoint(s), none readable: {', '.join(skipped)}" if candidates
              else "no checkpoints/step_*/ directories")
    raise FileNotFoundError(f"no valid checkpoint in {path} ({looked}); set {option}= to a run dir with a "
                            f"readable checkpoint or to one checkpoints/step_XXXXXXX dir")


def resolve_checkpoint(path: PathLike, option: str = "checkpoint") -> str:
    """A checkpoint directory from either itself or a run dir (newest checkpoint whose files pass
    `verify_checkpoint_files`), with open_checkpoint's fallback and errors. Prefer `load_model` /
    `open_checkpoint`, which fall back on errors found while actually loading too."""
    def check(c: str) -> str:
        verify_checkpoint_files(c)
        return c
    return open_checkpoint(path, check, option=option)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: Any
    tokenizer: Optional[Tokenizer]
    meta: Dict[str, Any]
    path: str


def load_model(path: PathLike, map_location: Union[str, torch.device] = "cpu",
               expected_vocab_size: Optional[int] = None, *, option: str = "checkpoint") -> LoadedModel:
    """Load a model for inference (eval mode) from a checkpoint dir, a file in one, or a run dir
    (newest readable checkpoint, skipping unreadable ones with a warning): see open_checkpoint.
    `option` is the config key the path came from, named in errors.
    Raises CheckpointError (file named), FileNotFoundError (no readable checkpoint), ValueError
    (architecture or vocabulary mismatch)."""
    return open_checkpoint(path, lambda c: _load_model_from(c, map_location, expected_vocab_size), option=option)


def _load_model_from(ckpt: str, map_location, expected_vocab_size: Optional[int]) -> LoadedModel:
    cfg_path = os.path.join(ckpt, "model_config.json")
    try:
        cfg = config_from_dict(read_checkpoint_file(cfg_path))
    except CheckpointError:
        raise
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    meta = read_checkpoint_file(os.path.join(ckpt, "meta.json"))
    tok_path = os.path.join(ckpt, "tokenizer.model")
    tokenizer = None
    if os.path.isfile(tok_path):
        try:
            tokenizer = Tokenizer.load(tok_path)
        except Exception as e:  # sentencepiece raises RuntimeError / OSError on a damaged proto
            raise CheckpointError(tok_path, f"unreadable (truncated or corrupt?): {type(e).__name__}: {e}") from None
    if tokenizer is not None and tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"checkpoint {ckpt}: tokenizer has {tokenizer.vocab_size} pieces but the "
                         f"model's vocab_size is {cfg.vocab_size}")
    if expected_vocab_size is not None and expected_vocab_size != cfg.vocab_size:
        raise ValueError(f"checkpoint {ckpt}: vocab_size {cfg.vocab_size} != expected {expected_vocab_size}")
    with torch.device("meta"):
        model = build_model(cfg)
    state = read_checkpoint_file(os.path.join(ckpt, "model.pt"), map_location=map_location)
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
