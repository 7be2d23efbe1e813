"""A validated start: everything a run needs, built and checked against each other, before
anything is written into the run directory (SPEC §4, §5).

Owns `validated_start`: the checkpoint to resume (read only), the model (restored, or warm-started
from train.init_from), the tokenizer (data.vocab_size, the run's tokenizer.model and the
checkpoint's must agree), the token windows (written to the data cache, never the run dir), the
optimiser, grad scaler, routing accumulators and the `TrainState` holding them, restored from the
checkpoint. Any mismatch raises ValueError naming the option or file, and a refused start leaves
the run dir byte-for-byte as it was; the loop (loop.py) commits the run dir afterwards.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import yaml

import torch

from moeut import checkpoint as ckpt_lib
from moeut.checkpoint import load_state_dict_strict, resolve_checkpoint
from moeut.compute import total_params
from moeut.data.tokenizer import Tokenizer
from moeut.registry import build_model
from moeut.rundir import METRICS_FILE, TruncatedLineWarning, read_jsonl
from moeut.wrappers import unwrap_model
from .schedule import lr_at

from .config import TrainConfig
from .data import RunData, prepare_run_data, resolve_tokenizer, train_sampler
from .distributed import DistInfo
from .fsdp import shard_model
from .alarm import CollapseAlarm, off_line as alarm_off_line
from .metrics import make_routing_stats
from .optim import build_optimizer, reapply_group_settings
from .precision import pick_precision
from .state import TrainState, seed_all


@dataclass
class RunSetup:
    """What `validated_start` built. state: the run state (model on the device, optimiser,
    scaler, sampler, routing accumulators; restored when resumed); data: tokenizer and windows;
    tokenizer: the run's tokenizer (`data.tokenizer`); n_params: parameters of the model;
    autocast_dtype: from train.precision (None = fp32); resumed: whether a checkpoint was loaded;
    abandoned: checkpoint dirs newer than the resumed one that were skipped as unreadable
    (train.resume=auto): the loop moves them to checkpoints/unreadable/ when it commits."""
    state: TrainState
    data: RunData
    tokenizer: Tokenizer
    n_params: int
    autocast_dtype: Optional[torch.dtype]
    resumed: bool
    abandoned: List[str] = field(default_factory=list)


def check_metrics_history(run_dir: str) -> None:
    """Refuse a start whose metrics.jsonl the resume would have to rewrite but cannot read under
    the run-dir corrupt-line policy (moeut.rundir): a damaged line other than a cut last line
    raises CorruptRunFile (a ValueError) naming metrics.jsonl:LINE; a cut last line is allowed
    (the logger moves it aside with its own message). Reads only."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return
    with warnings.catch_warnings():  # a cut last line is reported when it is moved (logging.rewind_metrics)
        warnings.simplefilter("ignore", TruncatedLineWarning)
        read_jsonl(path)


def checkpoint_run_config(ckpt_path: str) -> Optional[Dict[str, Any]]:
    """The resolved run config saved with a training checkpoint (<ckpt_path>/config.yaml, the
    `TrainConfig.raw` of the run that wrote it) as a dict, or None when the file is missing or
    not a YAML mapping (an older or damaged checkpoint: nothing can then be compared)."""
    try:
        with open(os.path.join(ckpt_path, "config.yaml")) as f:
            stored = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None
    return stored if isinstance(stored, dict) else None


def warn_schedule_change(tc: TrainConfig, stored: Optional[Dict[str, Any]], ckpt_path: str, step: int,
                         say: Callable[[str], None]) -> None:
    """A resume with another train.steps than the checkpoint's run re-computes the LR schedule
    over the new total (it is a closed form of step and train.steps, SPEC 4.2), so the LR jumps at
    the resumed step: say so once, naming train.steps old -> new and the LR before/after. The old
    value comes from `stored`, the checkpoint's config.yaml (`checkpoint_run_config`); without
    one nothing can be compared."""
    train_old = (stored or {}).get("train")
    old = train_old.get("steps") if isinstance(train_old, dict) else None
    new = tc.train.steps
    if not isinstance(old, int) or old == new:
        return
    o = tc.optim
    lr_old = lr_at(step, o.lr, o.warmup, old, o.min_lr_ratio, o.schedule)
    lr_new = lr_at(step, o.lr, o.warmup, new, o.min_lr_ratio, o.schedule)
    if o.schedule == "constant":  # the only schedule whose curve does not depend on train.steps
        return
    say(f"[train] WARNING train.steps: {old} in the checkpoint {ckpt_path}, now {new}: the LR schedule "
        f"(optim.schedule={o.schedule}) is re-computed over the new total, so the LR at step {step} jumps "
        f"from {lr_old:.4g} to {lr_new:.4g} (docs/training.md, \"Run directory, checkpoints, resume\")")


# Options (dotted keys and everything under them) whose change on resume gets no "[resume]" line:
# NO_TRAINING_EFFECT: cadence, logging, evaluation, file places and tokenizer-training options (a
# resume reuses the run's tokenizer.model): none of them changes the numbers of training.
NO_TRAINING_EFFECT = (
    "train.stop_at", "train.log_interval", "train.val_interval", "train.val_batch_size", "train.save_interval",
    "train.keep_last", "train.keep_every", "train.routing_interval", "train.routing_every", "train.resume",
    "train.threads", "train.dist_timeout_min", "train.final_eval", "train.max_nonfinite", "train.zeroshot",
    "train.profile", "train.alarm", "data.valid_path", "data.valid_tokens", "data.extra_valid", "data.cache_dir",
    "data.num_workers", "data.tokenizer_files", "data.tokenizer_docs", "data.tokenizer_chars",
    "data.tokenizer_split_paragraphs", "data.tokenizer_byte_fallback", "logger", "name", "print_config")
# OWN_MESSAGE: options a resume already warns about or refuses on its own (said once, there): model.*
# and data.vocab_size (refused), train.steps (warn_schedule_change), the optimiser's param-group
# settings (optim.reapply_group_settings), train.init_from (ignored, said), data.tokenizer_path
# (another tokenizer is refused).
OWN_MESSAGE = ("model", "data.vocab_size", "train.steps", "optim.betas", "optim.eps", "optim.weight_decay",
               "optim.groups", "train.init_from", "data.tokenizer_path")


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    """{dotted key: value} of the leaves of nested dicts (a list is a leaf)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _schema_defaults() -> Dict[str, Any]:
    """{dotted key: schema default} of every option of the data/optim/train/logger schemas and the
    top-level ones (config.TrainConfigSchema; model.* is compared by `model_config_diff`)."""
    from .config import TrainConfigSchema

    def walk(cls: type, prefix: str) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            if f.default is not dataclasses.MISSING:
                out[key] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                value = f.default_factory()  # type: ignore[misc]
                if dataclasses.is_dataclass(value):
                    out.update(walk(type(value), key + "."))
                else:
                    out[key] = value
        return out
    return walk(TrainConfigSchema, "")


def _under(key: str, prefixes: Tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _show(v: Any) -> str:
    """A config value as it is written on the command line (null, true/false, 0.001, [0.5, 0.6])."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def resume_config_changes(stored: Dict[str, Any], now: Dict[str, Any]) -> List[str]:
    """One "[resume] <option>: the checkpoint's run used <old>, now <new>" line per option that
    differs between the checkpoint's run config `stored` (its config.yaml) and this run's `now`
    (`TrainConfig.raw`), both nested dicts, in key order; options in NO_TRAINING_EFFECT or
    OWN_MESSAGE are left out. An option the checkpoint predates is a change only when set away
    from its schema default (docs/architecture.md, "New options and old checkpoints")."""
    old, new = _flatten(stored), _flatten(now)
    defaults = _schema_defaults()
    lines = []
    for key in sorted(set(old) | set(new)):
        if _under(key, NO_TRAINING_EFFECT) or _under(key, OWN_MESSAGE):
            continue
        if key not in old:
            if key in defaults and new[key] == defaults[key]:
                continue
            lines.append(f"[resume] {key}: the checkpoint's run predates this option, now {_show(new[key])}")
        elif key not in new:
            lines.append(f"[resume] {key}: the checkpoint's run used {_show(old[key])}; not an option now")
        elif old[key] != new[key]:
            lines.append(f"[resume] {key}: the checkpoint's run used {_show(old[key])}, now {_show(new[key])}")
    return lines


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """train.activation_checkpointing: recompute each layer's activations in backward, through
    the model's own `set_activation_checkpointing(True)` (every LM class of the package has it).
    A model without that method warns naming the option and trains without it."""
    lm = unwrap_model(model)
    if hasattr(lm, "set_activation_checkpointing"):
        lm.set_activation_checkpointing(True)
    else:
        warnings.warn(f"train.activation_checkpointing: {type(lm).__name__} has no set_activation_checkpointing; "
                      "ignored")


def model_config_diff(stored: Dict[str, Any], now: Dict[str, Any], config_cls: type) -> Tuple[List[str], List[str]]:
    """(differing keys, keys the checkpoint predates) between a checkpoint's stored model config and
    the run's (both `dataclasses.asdict` as JSON). A key absent from `stored` whose value in `now` is
    `config_cls`'s field default is not a difference: that option was added after the checkpoint was
    written, and every option's default is the behaviour from before it existed (docs/architecture.md,
    "New options and old checkpoints"). Any other mismatch, including a new option set away from
    its default, is a difference."""
    defaults = {}
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            defaults[f.name] = f.default_factory()  # type: ignore[misc]
    defaults = json.loads(json.dumps(defaults, default=str))
    predates = sorted(k for k in now if k not in stored and k in defaults and now[k] == defaults[k])
    diff = sorted(k for k in set(stored) | set(now) if k not in predates and stored.get(k) != now.get(k))
    return diff, predates


def _describe_change(key: str, stored: Dict[str, Any], now: Dict[str, Any]) -> str:
    """`model.<key>=<checkpoint's value> (now <run's value>)`, saying "absent" for a key the
    checkpoint predates and "not an option now" for one the run's config lacks."""
    was = repr(stored[key]) if key in stored else "absent (an older checkpoint)"
    return f"model.{key}={was} " + (f"(now {now[key]!r})" if key in now else "(not an option now)")


def validated_start(tc: TrainConfig, run_dir: str, dist: DistInfo, say: Callable[[str], None]) -> RunSetup:
    """Everything a start needs, checked against each other; reads the run dir, never writes it.

    Resumes per train.resume ("auto": the newest readable checkpoint in `run_dir`; "never"; or a
    checkpoint path). Seeds train.seed before building the model, then train.seed + 1 + rank for
    a fresh start's dropout streams (a resume restores each rank's saved streams instead).
    Raises ValueError naming the option (or the checkpoint file) on any mismatch: a different
    model config or architecture than the checkpoint's (the changed model.* options first), a
    tokenizer that is not the run's, data.vocab_size against the tokenizer, optimiser state that
    does not fit, train.steps below the checkpoint's step. A resume sets the configured optimiser
    hyperparameters on the restored param groups (`reapply_group_settings`) and says one line per
    option changed since the checkpoint (`warn_schedule_change`, `resume_config_changes`)."""
    t_cfg, o_cfg, d_cfg = tc.train, tc.optim, tc.data
    device = dist.device
    # --- checkpoint to resume and the metrics history it rewinds (read only) ---------------
    check_metrics_history(run_dir)  # every rank: a refusal must stop all of them
    resume = None
    if t_cfg.resume == "auto":
        resume = ckpt_lib.load_latest_training_checkpoint(run_dir, log=say)
    elif t_cfg.resume != "never":
        resume = ckpt_lib.load_training_checkpoint(resolve_checkpoint(t_cfg.resume, option="train.resume"))

    # --- model ----------------------------------------------------------------------------
    seed_all(t_cfg.seed)
    model = build_model(tc.model)
    n_params = total_params(model)
    say(f"[model] {tc.model_preset} ({type(model).__name__}): {n_params:,} parameters")
    if resume is not None:
        stored, now = resume["model_config"], json.loads(json.dumps(dataclasses.asdict(tc.model)))
        diff, predates = model_config_diff(stored, now, type(tc.model))
        if predates and not diff:
            say(f"[resume] checkpoint {resume['path']} predates " + ", ".join(f"model.{k}" for k in predates)
                + "; resuming with " + ", ".join(f"model.{k}={now[k]!r}" for k in predates)
                + (" (its default)" if len(predates) == 1 else " (their defaults)"))
        config_diff = (f"train.resume: checkpoint {resume['path']} has a different model config: "
                       + ", ".join(_describe_change(k, stored, now) for k in diff))
        try:
            ckpt_lib.restore_model(resume, model)  # names mismatching keys for another architecture
        except ValueError as e:
            if diff:  # name the options first: a key-by-key shape dump alone does not say which to undo
                raise ValueError(f"{config_diff}; {e}") from e
            raise
        if diff:
            raise ValueError(config_diff)
        if t_cfg.init_from:
            say(f"[model] train.init_from={t_cfg.init_from} ignored: resuming from {resume['path']}")
    elif t_cfg.init_from:
        from moeut.checkpoint import load_model
        load_state_dict_strict(model, load_model(t_cfg.init_from, option="train.init_from").model.state_dict(),
                               source=t_cfg.init_from)
        say(f"[model] initialised weights from {t_cfg.init_from}")
    # --- tokenizer: data.vocab_size, the run's tokenizer.model and the checkpoint's must agree --
    tok = resolve_tokenizer(d_cfg, run_dir, dist, resume["tokenizer_path"] if resume else None, log=say)
    model.to(device)
    if t_cfg.activation_checkpointing:
        enable_activation_checkpointing(model)

    # --- data (token shards go to the cache, not the run dir) ------------------------------
    T, B = d_cfg.seq_len, t_cfg.batch_size
    train_tokens = d_cfg.train_tokens or (t_cfg.steps + 100) * B * T  # SPEC 5.4 train limit
    data = prepare_run_data(d_cfg, T, train_tokens, tok, dist, log=say)
    sampler = train_sampler(data, d_cfg, B, dist)  # one warning about what the training stream loses
    if sampler.steps_per_epoch < t_cfg.steps:
        say(f"[data] WARNING: {len(data.train)} windows give {sampler.steps_per_epoch} steps per epoch "
            f"< train.steps={t_cfg.steps}: data will repeat")

    # --- optimiser and run state -----------------------------------------------------------
    autocast_dtype, use_scaler = pick_precision(t_cfg.precision, device)
    if t_cfg.parallel == "fsdp":
        if dist.enabled:  # shard before the optimiser is built over the (now DTensor) parameters
            shard_model(model, autocast_dtype)
            say(f"[train] train.parallel=fsdp: sharded over {dist.world_size} processes per unique layer")
        else:
            say("[train] train.parallel=fsdp with one process: nothing to shard, the model trains unsharded")
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    optimizer, groups_line = build_optimizer(model, o_cfg)  # all parameters (SPEC 4.1), optim.groups
    say(groups_line)
    routing = make_routing_stats(tc.model)
    if routing is None:
        say(f"[train] {tc.model_preset} has no experts: no routing metrics (train.routing_interval unused)")
    state = TrainState(model, optimizer, scaler, sampler, dist, routing, seed=t_cfg.seed)
    in_use = stability_options_in_use(tc)
    state.alarm = CollapseAlarm(t_cfg.alarm, o_cfg.warmup, t_cfg.steps, in_use=in_use,
                                sigma_moe=getattr(tc.model, "mlp_type", None) == "sigma_moe", lr=o_cfg.lr)
    if in_use:  # off by default: a run that sets any says so once, beside the config dump
        say("[train] routing-stability options: " + ", ".join(f"{k}={v}" for k, v in in_use.items())
            + " (docs/training.md \"Routing stability\")")
    for line in switched_off(tc):
        say(line)
    if resume is not None:
        configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        state.load_state_dict(resume["train"], source=resume["path"])
        reapply_group_settings(optimizer, configured, lambda msg: say(f"[optim] WARNING: {msg}"))
        if state.step > t_cfg.steps:
            raise ValueError(f"train.steps: {t_cfg.steps} but the checkpoint {resume['path']} is at step {state.step}")
        say(f"[ckpt] resumed from {resume['path']} at step {state.step}")
        stored = checkpoint_run_config(resume["path"])
        warn_schedule_change(tc, stored, resume["path"], state.step, say)
        if stored is None:
            say(f"[resume] WARNING: {resume['path']} has no readable config.yaml: the options changed since that "
                "checkpoint cannot be named")
        for line in resume_config_changes(stored or {}, tc.raw) if stored is not None else []:
            say(line)
    else:
        seed_all(t_cfg.seed + 1 + dist.rank)  # dropout streams differ per rank
    return RunSetup(state=state, data=data, tokenizer=tok, n_params=n_params, autocast_dtype=autocast_dtype,
                    resumed=resume is not None, abandoned=list((resume or {}).get("abandoned", [])))


def switched_off(tc: TrainConfig) -> List[str]:
    """One train.log line per safeguard that is on by default and this run switches off, naming the
    option that did it: the collapse alarm (train.alarm.enabled), gradient clipping (optim.grad_clip)
    and the validation at the end of training (train.final_eval)."""
    lines = [line] if (line := alarm_off_line(tc.train.alarm)) is not None else []
    if not tc.optim.grad_clip:
        value = "null" if tc.optim.grad_clip is None else tc.optim.grad_clip
        lines.append(f"[optim] optim.grad_clip={value}: gradient clipping is off (the gradient norm is still logged)")
    if not tc.train.final_eval:
        lines.append("[train] train.final_eval=false: no validation at the end of training (only every "
                     f"train.val_interval={tc.train.val_interval} steps)")
    return lines


def stability_options_in_use(tc) -> Dict[str, Any]:
    """The routing-stability options this run sets away from their defaults (option -> value),
    for the collapse alarm's advice (docs/training.md "Routing stability")."""
    router = tc.optim.groups.router
    used: Dict[str, Any] = {}
    if router.lr_mult != 1.0:
        used["optim.groups.router.lr_mult"] = router.lr_mult
    if router.warmup:
        used["optim.groups.router.warmup"] = router.warmup
    for name in ("bias_balance_rate", "router_zloss", "att_router_zloss"):
        if getattr(tc.model, name, 0.0):
            used[f"model.{name}"] = getattr(tc.model, name)
    return used
