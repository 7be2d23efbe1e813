"""Checkpoint layout shared by training, evaluation, analysis and export (no Hydra, no wandb).

    <run_dir>/checkpoints/step_0001000/
        model.pt            unwrapped model state dict (no compile/DDP prefixes)
        model_config.json   dataclasses.asdict(model config), with its "arch"
        tokenizer.model     SentencePiece model bytes (when the run has a tokenizer)
        meta.json           {"step", "tokens_seen", "format_version", ...}; written last
        train_state.pt      optimiser/scheduler/scaler/RNG/sampler state (training checkpoints only)
        config.yaml         the resolved run config (training checkpoints only)

Training checkpoints (`save_training_checkpoint`, `load_latest_training_checkpoint`) add:

    train_state.pt  `TrainState.state_dict()` (train_lib/state.py): optimiser, grad scaler, step,
                    tokens seen, sampler position, wandb run id, the open log window's
                    accumulators, and per rank: RNG states and routing-metric accumulators
    config.yaml     the resolved run config

The LR schedule is a closed form of the step (train_lib/schedule.py), so its "state" is the step.

A checkpoint is written under a temporary name and renamed into place, so a directory named
`step_*` is complete unless the disk itself (or a copy) damaged it. Every reader goes through
`open_checkpoint` (`load_model`, `resolve_checkpoint`, training's resume): given a run dir it
uses the newest readable checkpoint and warns naming each unreadable file it skipped; given one
checkpoint (its dir or a file in it) it stops with a CheckpointError naming the bad file.

This module holds all checkpoint file I/O (model and training state); the model classes come from
`moeut.registry.build_model`, the config classes from `moeut.registry.config_from_dict`.
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
import yaml

from .data.tokenizer import Tokenizer
from .registry import build_model, config_from_dict
from .wrappers import unwrap_model

FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)$")
PathLike = Union[str, os.PathLike]


def checkpoint_dir_name(step: int) -> str:
    """The directory name of the checkpoint at optimiser step `step`: "step_" + 7 digits."""
    return f"step_{step:07d}"


class NonFiniteWeightsError(ValueError):
    """A checkpoint was not written because the model's weights hold inf/NaN."""


def _local(t: torch.Tensor) -> torch.Tensor:
    # a DTensor (an FSDP-sharded parameter) -> this rank's shard; a plain tensor -> itself
    return t.to_local() if hasattr(t, "to_local") else t


def check_finite_weights(model: Union[torch.nn.Module, Dict[str, torch.Tensor]], where: str) -> None:
    """Raise NonFiniteWeightsError (naming `where` and up to 5 tensors) when a floating-point
    parameter or buffer of `model` (a module, or a state dict) holds inf or NaN: such weights are
    never checkpointed, so they cannot replace (and, by rotation, delete) the good checkpoints.
    A sharded (FSDP) model is checked on this rank's shards only."""
    tensors = model if isinstance(model, dict) else unwrap_model(model).state_dict()
    bad = [name for name, t in tensors.items()
           if t.is_floating_point() and not bool(torch.isfinite(_local(t)).all())]
    if bad:
        raise NonFiniteWeightsError(f"{where}: not written: the weights hold inf/NaN in {len(bad)} tensor(s) "
                                    f"({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}); the existing "
                                    f"checkpoints are kept")


def save_checkpoint(ckpt_root: PathLike, step: int, model: torch.nn.Module, model_config, *,
                    tokenizer: Optional[Tokenizer] = None, meta: Optional[Dict[str, Any]] = None,
                    extra_files: Optional[Dict[str, Callable[[str], None]]] = None,
                    model_state: Optional[Dict[str, torch.Tensor]] = None) -> str:
    """Atomically write `ckpt_root/step_XXXXXXX`. `extra_files` maps a file name to a writer
    `fn(path)` (training adds train_state.pt and config.yaml this way); `model_state`, when given,
    is written as model.pt instead of the model's own state dict (training passes the full state
    of an FSDP-sharded model). Returns the final path. Raises NonFiniteWeightsError, writing
    nothing, when the weights hold inf/NaN."""
    ckpt_root = os.fspath(ckpt_root)
    check_finite_weights(model if model_state is None else model_state,
                         os.path.join(ckpt_root, checkpoint_dir_name(step)))
    os.makedirs(ckpt_root, exist_ok=True)
    final = os.path.join(ckpt_root, checkpoint_dir_name(step))
    tmp = final + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    model = unwrap_model(model)
    torch.save(model.state_dict() if model_state is None else model_state, os.path.join(tmp, "model.pt"))
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


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated or corrupt. `file` names it, `reason` says why;
    str(e) is "<file>: <reason>"."""

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


def _looks_like_checkpoint(path: str) -> bool:
    """Whether directory `path` is one checkpoint: a `step_*` dir, or one holding model.pt,
    meta.json or model_config.json."""
    return bool(_STEP_RE.match(os.path.basename(os.path.normpath(path)))) or any(
        os.path.exists(os.path.join(path, n)) for n in ("model_config.json", "meta.json", "model.pt"))


def check_checkpoint_path(path: PathLike, option: str = "checkpoint") -> None:
    """Check, reading nothing, that `path` can name a checkpoint: an existing run or checkpoint
    directory, or a file inside a checkpoint. Raises ValueError `<option>: <path> is a file, not a
    run or checkpoint directory` / FileNotFoundError `... <option>=<path> does not exist ...`."""
    _candidates(os.fspath(path), option)


def _candidates(path: str, option: str) -> Tuple[List[str], bool]:
    """(checkpoint dirs to try, newest first; whether the user named one exact checkpoint)."""
    if not path or path == "???":
        raise ValueError(f"{option}: required: a run dir or a checkpoints/step_XXXXXXX dir ({option}=<path>)")
    if os.path.isfile(path):  # a file of a checkpoint (model.pt, meta.json, ...): exactly that checkpoint
        parent = os.path.dirname(os.path.abspath(path))
        if not _looks_like_checkpoint(parent):  # any other file: say so, naming the option and the path given
            raise ValueError(f"{option}: {path} is a file, not a run or checkpoint directory")
        return [parent], True
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no valid checkpoint: {option}={path} does not exist (give a run dir or a "
                                f"checkpoints/step_XXXXXXX dir)")
    if _looks_like_checkpoint(path):
        return [path], True
    return list(reversed(find_checkpoints(path))), False


def open_checkpoint(path: PathLike, read: Callable[[str], Any], *, option: str = "checkpoint",
                    log: Optional[Callable[[str], None]] = None, setting: Optional[str] = None) -> Any:
    """The one way to read a checkpoint: `read(checkpoint_dir)` on the checkpoint `path` names.

    - `path` is one checkpoint (a `step_*` dir, or a file inside one such as its model.pt): read
      it; a missing, truncated or corrupt file raises CheckpointError naming the file.
    - `path` is a run dir: try its checkpoints newest first; an unreadable one is skipped with a
      warning naming the file ("skipping unreadable checkpoint ..."), and the newest readable one
      is used. None readable: FileNotFoundError naming the run dir and `option`.
    `read` must raise CheckpointError for unreadable files (read_checkpoint_file does); any other
    error (e.g. a vocabulary mismatch) is not corruption and propagates at once. Each warning is
    given once: to `log` when given (training writes it to its log and the console), else as a
    UserWarning. `setting` is how the path was chosen, named in warnings (default
    "{option}={path}", e.g. "train.resume=auto (run dir ...)" when the path was not given).
    """
    path = os.fspath(path)
    setting = setting or f"{option}={path}"
    candidates, exact = _candidates(path, option)
    skipped = []

    def warn(msg: str) -> None:
        if log is not None:
            log(f"[ckpt] WARNING {msg}")
        else:
            warnings.warn(msg, stacklevel=3)
    for i, c in enumerate(candidates):
        try:
            result = read(c)
        except CheckpointError as e:
            if exact:
                raise
            warn(f"skipping unreadable checkpoint {c}: {e}; "
                 + ("trying the previous one" if i + 1 < len(candidates) else "no older checkpoint left"))
            skipped.append(e.file)
            continue
        if skipped:
            warn(f"{setting}: using {c}, the newest readable checkpoint (skipped {', '.join(skipped)})")
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
    """What `load_model` returns: the model (eval mode), its config, the checkpoint's tokenizer
    (None when it has none), meta.json as a dict and the checkpoint dir it came from."""

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
        cfg = config_from_dict(read_checkpoint_file(cfg_path), source=cfg_path)
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
    load_state_dict_strict(model, state, source=os.path.join(ckpt, "model.pt"))
    model.eval()
    return LoadedModel(model=model, config=cfg, tokenizer=tokenizer, meta=meta, path=ckpt)


def load_state_dict_strict(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str = "") -> None:
    """load_state_dict (assigning the tensors) with a readable error naming missing/unexpected/
    mismatched keys. `source` names where `state` came from (the file, when there is one).

    Dtype policy (docs/architecture.md "Checkpoint dtypes"): the model keeps its own dtypes. A
    floating-point tensor stored in another floating dtype (e.g. a bf16 export loaded into the
    fp32 model that trains or evaluates) is cast to the model's dtype, with one warning naming
    `source`, the dtypes and the number of tensors; it never changes the model's parameters to
    the stored dtype. Raises ValueError on missing/unexpected keys or shape mismatches."""
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
    cast: Dict[Tuple[torch.dtype, torch.dtype], int] = {}
    fixed = dict(state)
    for k, v in state.items():
        want = own[k].dtype
        if v.is_floating_point() and want.is_floating_point and v.dtype != want:
            fixed[k] = v.to(want)
            cast[(v.dtype, want)] = cast.get((v.dtype, want), 0) + 1
    if cast:
        what = ", ".join(f"{n} tensor(s) stored as {str(a).replace('torch.', '')} cast to "
                         f"{str(b).replace('torch.', '')}" for (a, b), n in sorted(cast.items(), key=str))
        warnings.warn(f"{source}: {what}: the model keeps its own dtype (the stored values are converted; "
                      f"weights saved in a lower precision stay rounded)")
    model.load_state_dict(fixed, assign=True)


# ------------------------------------------------------------------------------------------
# Training checkpoints: the model checkpoint plus train_state.pt and config.yaml
# ------------------------------------------------------------------------------------------

TRAIN_STATE = "train_state.pt"


def save_training_checkpoint(run_dir: str, step: int, model, model_config, *, train_state: Dict[str, Any],
                             tokenizer, raw_config: Dict[str, Any], keep_last: Optional[int] = None,
                             keep_every: Optional[int] = None, meta: Optional[Dict[str, Any]] = None,
                             log: Optional[Callable[[str], None]] = None,
                             model_state: Optional[Dict[str, torch.Tensor]] = None) -> str:
    """Write checkpoints/step_XXXXXXX atomically (rank 0 only). `train_state` is
    `TrainState.state_dict()` (train_lib/state.py): everything besides the weights; `raw_config`
    the resolved run config (written as config.yaml); `model_state` the full model state to write
    as model.pt (default: the model's state dict; training gives the gathered full state, so an
    FSDP run writes the same unsharded model.pt as any other); `keep_last` prunes older checkpoints after
    the write (`prune_checkpoints`: only valid ones count; `log` gets its warnings), besides every
    checkpoint whose step is a multiple of `keep_every` (None: none). Returns the checkpoint dir. Raises OSError when the disk refuses the write (the
    previous checkpoints stay untouched: the new one is renamed into place only when complete),
    and NonFiniteWeightsError, writing and pruning nothing, when the weights hold inf/NaN."""

    def write_state(path: str) -> None:
        torch.save(train_state, path)

    def write_config(path: str) -> None:
        with open(path, "w") as f:
            yaml.safe_dump(raw_config, f, sort_keys=False)

    m = {"tokens_seen": train_state["tokens_seen"], "wandb_id": train_state.get("wandb_id"), "kind": "training"}
    m.update(meta or {})
    path = save_checkpoint(os.path.join(run_dir, "checkpoints"), step, unwrap_model(model), model_config,
                           tokenizer=tokenizer, meta=m, model_state=model_state,
                           extra_files={TRAIN_STATE: write_state, "config.yaml": write_config})
    if keep_last:
        prune_checkpoints(run_dir, keep_last, log, keep_every=keep_every)
    return path


UNREADABLE_DIR = "unreadable"  # checkpoints/unreadable/: checkpoints moved aside, never read or rotated


def set_aside_checkpoint(ckpt_dir: str, why: str, log: Optional[Callable[[str], None]] = None) -> str:
    """Move the checkpoint dir `ckpt_dir` (checkpoints/step_XXXXXXX) to
    checkpoints/unreadable/step_XXXXXXX (a numeric suffix when that exists), so no resume or
    rotation sees it again; nothing is deleted. Warns once (to `log`, else a UserWarning) naming
    the checkpoint, `why` and the new path. Returns the new path."""
    dest_root = os.path.join(os.path.dirname(os.path.abspath(ckpt_dir)), UNREADABLE_DIR)
    os.makedirs(dest_root, exist_ok=True)
    base = os.path.join(dest_root, os.path.basename(os.path.normpath(ckpt_dir)))
    dest, n = base, 1
    while os.path.exists(dest):
        dest, n = f"{base}.{n}", n + 1
    os.replace(ckpt_dir, dest)
    msg = f"moved checkpoint {ckpt_dir} to {dest} ({why}); it is never resumed from or rotated, delete it by hand"
    if log is not None:
        log(f"[ckpt] WARNING {msg}")
    else:
        warnings.warn(msg, stacklevel=2)
    return dest


def prune_checkpoints(run_dir: str, keep_last: int, log: Optional[Callable[[str], None]] = None,
                      keep_every: Optional[int] = None) -> None:
    """Keep the newest `keep_last` (>= 1) VALID checkpoints of `run_dir` and delete older valid
    ones, except those whose step is a multiple of `keep_every` (None: no exception; the
    checkpoints the training-dynamics analysis reads, docs/training.md). Validity is `verify_checkpoint_files` (complete files, no weight loading). A checkpoint
    that fails it is never counted and never deleted: it is moved to checkpoints/unreadable/
    (`set_aside_checkpoint`, warning naming the bad file), so a valid checkpoint is never
    deleted while an unreadable one is kept."""
    valid = []
    for c in find_checkpoints(run_dir):
        try:
            verify_checkpoint_files(c)
        except CheckpointError as e:
            set_aside_checkpoint(c, f"unreadable: {e}", log)
            continue
        valid.append(c)
    for old in valid[:-keep_last]:
        m = _STEP_RE.match(os.path.basename(os.path.normpath(old)))
        if keep_every and m and int(m.group(1)) % keep_every == 0:
            continue
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
    """The newest checkpoint in `run_dir` whose files all load (train.resume=auto), or None when
    there is none. Unreadable ones are skipped with one warning each naming the file
    (moeut.checkpoint.open_checkpoint, through `log`); when every checkpoint is unreadable it
    raises rather than silently starting over. The result's "abandoned" lists the skipped
    checkpoint dirs newer than the one used: a resume continues from an older step, so they
    belong to an abandoned timeline (training moves them aside with `set_aside_checkpoint` once
    the start is validated; this function only reads)."""
    if not find_checkpoints(run_dir):
        return None
    ckpt = open_checkpoint(run_dir, _load_all, option="train.resume", log=log,
                           setting=f"train.resume=auto (run dir {run_dir})")
    used = _step_of(ckpt["path"])
    ckpt["abandoned"] = [c for c in find_checkpoints(run_dir) if _step_of(c) > used]
    return ckpt


def _step_of(ckpt_dir: str) -> int:
    return int(_STEP_RE.match(os.path.basename(os.path.normpath(ckpt_dir))).group(1))


def load_training_checkpoint(path: str) -> Dict[str, Any]:
    """One checkpoint dir (or a run dir: its newest readable checkpoint), see open_checkpoint.
    Returns {"meta", "model_config" (dict), "model" (state dict), "train" (train_state.pt),
    "path", "tokenizer_path" (None without one)}. Raises CheckpointError naming a bad file."""
    return open_checkpoint(path, _load_all, option="train.resume")


def restore_model(ckpt: Dict[str, Any], model) -> None:
    """Load the model weights (before building the optimiser: `load_state_dict_strict` assigns
    new parameter tensors). Raises naming the mismatching keys when the checkpoint comes from
    another architecture; a stored dtype other than the model's is cast with a warning
    (`load_state_dict_strict`)."""
    load_state_dict_strict(unwrap_model(model), ckpt["model"], source=os.path.join(ckpt["path"], "model.pt"))


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
