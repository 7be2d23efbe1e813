"""Hydra structured configs for training (schemas in the ConfigStore) and their conversion.

The YAML files in `conf/` hold values only; these dataclasses are the schemas, so a typo or a
wrong type fails at composition. `to_typed(cfg)` turns the composed DictConfig into a
`TrainConfig` and validates cross-field constraints with messages that name the key. Nothing is
built from the config with `_target_`: the training library reads typed fields.

Model configs: `model.preset` names a preset of `moeut.registry.PRESETS`; every architecture field
of every registered config class (MoEUTConfig, DenseConfig, baselines) is an Optional override,
plus a free `model.overrides` dict for fields of architectures registered after this module was
imported. A field's default is the interpolation `${moeut.preset:${.preset},<field>}`: the value of
the selected preset (null where the preset's config class has no such field), so the composed
config (`train.py --cfg job`, the run's saved config) shows the real model values, and it follows
`model=<preset>` / `model.preset=<name>`. Setting a field (`model.d_model=128`) replaces the
interpolation; null keeps the preset's value.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .. import paths
from ..registry import ARCHS, PAPER_TRAIN, PRESETS, get_preset
from ..validate import Range, at_least, check_mapping, check_ranges, field_range, in_range, positive

# ------------------------------------------------------------------------------------------
# Resolvers (moeut/paths.py), so default data paths work from any cwd, in a clone or an installed
# wheel: `${moeut.data:}` is the carried data/ (conf/data/books.yaml), `${moeut.cache:}` the default
# token-cache directory, `${moeut.repo:}` the directory holding conf/ and data/ (the clone's root,
# or the wheel's carried copy; older run configs spell data paths with it).
# ------------------------------------------------------------------------------------------
for _name, _fn in (("moeut.repo", lambda: str(paths.root())), ("moeut.data", lambda: str(paths.data_dir())),
                   ("moeut.cache", lambda: str(paths.cache_dir()))):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)


def preset_value(preset: Any, name: str) -> Any:
    """`${moeut.preset:<preset>,<field>}`: field `name` of preset `preset` of moeut.registry.PRESETS;
    None for an unknown preset or a field its config class does not have (an unknown preset is
    reported by build_model_config, naming model.preset)."""
    base = PRESETS.get(str(preset))
    if base is None or name == "arch" or name not in {f.name for f in dataclasses.fields(base)}:
        return None  # (a property such as MoETransformerConfig.group_size is not a field)
    return getattr(base, name)


if not OmegaConf.has_resolver("moeut.preset"):
    OmegaConf.register_new_resolver("moeut.preset", preset_value)


# ------------------------------------------------------------------------------------------
# Model schema: union of the fields of every registered architecture, all Optional.
# ------------------------------------------------------------------------------------------

# Ranges of the architecture fields as command-line overrides (`model.<name>=...`), checked at
# start with the option's name. A field of an architecture config may instead declare its own
# range in its metadata (moeut.validate), which wins. Cross-field rules (ff_k <= ff_n_experts,
# n_layers divisible by group_size, ...) stay in each config class's validate().
MODEL_RANGES: Dict[str, Range] = {
    **{k: Range(1) for k in ("d_model", "n_layers", "group_size", "n_heads", "d_head", "att_n_experts",
                             "ff_n_experts", "ff_k", "ff_expert_size", "att_k", "d_ff", "moe_every",
                             "moe_device_groups", "att_expert_size", "max_relative_positions")},
    "vocab_size": Range(2, 65536),
    **{k: Range(0) for k in ("entropy_reg", "att_entropy_reg", "moe_n_shared", "moe_balance_weight",
                             "moe_zloss_weight", "moe_capacity_factor", "moe_device_balance_weight",
                             "mim_weight", "act_weight", "sample_topk")},
    "rope_base": Range(0, lo_open=True),
    "rotate_fraction": Range(0, 1, lo_open=True),
    "dropout": Range(0, 1, hi_open=True),
    "expert_dropout": Range(0, 1, hi_open=True),
    "halt_threshold": Range(0.5, 1, lo_open=True, hi_open=True),
}


PRESET_VALUE = "${{moeut.preset:${{.preset}},{name}}}"  # a model field's default: the preset's value


def _optional_model_fields() -> List[tuple]:
    seen: Dict[str, Any] = {}
    ranges: Dict[str, Range] = {}
    for cls, _ in ARCHS.values():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "arch":
                continue
            if field_range(f) is not None:
                ranges.setdefault(f.name, field_range(f))
            if f.name in seen:
                continue
            tp = hints[f.name]
            if typing.get_origin(tp) is typing.Union:  # Optional[X] -> X
                args = [a for a in typing.get_args(tp) if a is not type(None)]
                tp = args[0] if len(args) == 1 else Any
            if tp not in (int, float, bool, str):
                tp = Any
            seen[f.name] = tp
    out = []
    for name, tp in sorted(seen.items()):
        rng = ranges.get(name) or MODEL_RANGES.get(name)
        meta = {"range": rng} if rng is not None else {}
        out.append((name, Optional[tp], field(default=PRESET_VALUE.format(name=name), metadata=meta)))
    return out


ModelSchema = dataclasses.make_dataclass(
    "ModelSchema",
    [("preset", str, field(default=MISSING)),
     ("overrides", Dict[str, Any], field(default_factory=dict))] + _optional_model_fields(),
)
ModelSchema.__doc__ = ("model.preset names a preset of moeut.registry.PRESETS; every other field "
                       "defaults to the preset's value (an interpolation) and overrides it when set "
                       "(None = keep).")


@dataclass
class DataSchema:
    """The `data` group (SPEC §5): corpus, tokenizer, window length and token budgets, cache.
    Token counts are tokens; `seq_len` is T (each window holds T + 1 tokens)."""
    source: str = "local"  # local | c4 | slimpajama | pes2o | thestack
    path: Optional[str] = None  # local file/dir, or a hub-layout mirror root (None: stream C4 from the hub)
    valid_path: Optional[str] = None  # local only: validation file/dir (default: *valid* files in path)
    text_field: str = "text"
    revision: Optional[str] = None  # hub revision (C4 defaults to the paper's pinned commit)
    languages: List[str] = field(default_factory=list)  # The Stack
    seq_len: int = field(default=1024, metadata=at_least(1))
    train_tokens: Optional[int] = field(default=None, metadata=at_least(1))  # token budget; None = (steps + 100) * batch * seq_len + 1
    valid_tokens: Optional[int] = field(default=1032192, metadata=at_least(1))  # SPEC 5.7; None = the whole validation split
    extra_valid: Dict[str, str] = field(default_factory=dict)  # name -> local file/dir, more val sets
    sampler: str = "sequential"  # sequential (paper) | shuffled
    shuffle_seed: int = field(default=123, metadata=at_least(0))
    # tokenizer (SPEC 5.2)
    tokenizer_path: Optional[str] = None  # an existing SentencePiece .model (e.g. the released one)
    vocab_size: int = field(default=8000, metadata=in_range(2, 65536))  # token shards are uint16
    tokenizer_files: Optional[int] = field(default=10, metadata=at_least(1))  # train on the first N files (C4 10, SlimPajama 200, ...)
    tokenizer_docs: Optional[int] = field(default=None, metadata=at_least(1))
    tokenizer_chars: Optional[int] = field(default=None, metadata=at_least(1))
    tokenizer_split_paragraphs: bool = False  # books: cut into < 4 kB pieces (see prepare.py)
    tokenizer_byte_fallback: bool = False  # [ours] no text maps to <unk> (byte pieces); off = the paper's settings
    cache_dir: str = "${oc.env:MOEUT_CACHE,${moeut.cache:}}"
    num_workers: int = field(default=2, metadata=at_least(0))  # tokenisation processes (0 = in-process)


@dataclass
class OptimSchema:
    """The `optim` group (SPEC §4.1-4.3): AdamW over all parameters, LR schedule, grad clipping."""
    lr: float = field(default=2.5e-4, metadata=positive())
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999], metadata=in_range(0, 1, hi_open=True))
    eps: float = field(default=1e-8, metadata=positive())
    weight_decay: float = field(default=0.01, metadata=at_least(0))
    warmup: int = field(default=0, metadata=at_least(0))  # <= train.steps (checked with it)
    min_lr_ratio: float = field(default=0.1, metadata=in_range(0, 1))
    schedule: str = "cosine"  # cosine (SPEC 4.2) | constant
    grad_clip: Optional[float] = field(default=0.1, metadata=at_least(0))  # None/0 = off


@dataclass
class ZeroShotSchema:
    """`train.zeroshot`: zero-shot evaluation during training, as `python -m moeut.evaluate` runs it
    on the checkpoint of that step (docs/training.md "Zero-shot evaluation during training")."""
    interval: int = field(default=0, metadata=at_least(0))  # every N steps (a checkpoint is saved there); 0 = off
    tasks: List[str] = field(default_factory=lambda: ["lambada", "blimp", "piqa"])  # moeut.evaluate's task names
    limit: Optional[int] = field(default=None, metadata=at_least(1))  # items per task, as moeut.evaluate's limit


@dataclass
class ProfileSchema:
    """`train.profile`: a torch.profiler trace of steps start..end (the logged step numbers) into
    <run dir>/profile/ (docs/training.md "Profiles"); start null = off."""
    start: Optional[int] = field(default=None, metadata=at_least(1))
    end: Optional[int] = field(default=None, metadata=at_least(1))  # null = start (one step)


@dataclass
class TrainSchema:
    """The `train` group (SPEC §4.3-4.5): steps, batch, precision, intervals (in steps), resume."""
    steps: int = field(default=100000, metadata=at_least(1))  # the schedule length S (`stop_after`)
    stop_at: Optional[int] = field(default=None, metadata=at_least(1))  # end this invocation early (schedule still spans `steps`)
    batch_size: int = field(default=64, metadata=at_least(1))  # global batch in sequences
    micro_batch_size: Optional[int] = field(default=None, metadata=at_least(1))  # per-rank micro-batch; None = local batch (no accumulation)
    seed: int = field(default=0, metadata=at_least(0))
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA cc>=8, fp16+scaler below, fp32 on CPU) | fp32 | bf16 | fp16
    compile: bool = False
    activation_checkpointing: bool = False
    parallel: str = "ddp"  # ddp (replicas) | fsdp (FSDP2, sharded per unique layer; docs/training.md "FSDP")
    log_interval: int = field(default=100, metadata=at_least(1))
    val_interval: int = field(default=2000, metadata=at_least(1))
    val_batch_size: Optional[int] = field(default=None, metadata=at_least(1))  # None = micro batch size
    save_interval: int = field(default=10000, metadata=at_least(1))
    keep_last: int = field(default=3, metadata=at_least(1))
    keep_every: Optional[int] = field(default=None, metadata=at_least(1))  # also keep every checkpoint whose step is a multiple of N (None = only keep_last)
    routing_interval: int = field(default=500, metadata=at_least(1))  # log routing metrics every N steps (SPEC 4.4)
    routing_every: int = field(default=10, metadata=at_least(1))  # collect routing counts on every N-th step (SPEC 7.3)
    resume: str = "auto"  # auto (newest valid checkpoint in the run dir) | never | <checkpoint path>
    init_from: Optional[str] = None  # warm start: model weights only
    max_nonfinite: int = field(default=10, metadata=at_least(1))  # abort after this many skipped steps (non-finite loss or gradients) in a row
    aux_loss_scope: str = "step"  # step (balance/MIM losses from the whole step's statistics) | micro_batch (each forward's own)
    threads: Optional[int] = field(default=None, metadata=at_least(1))  # torch CPU threads (None = torch default)
    dist_timeout_min: int = field(default=30, metadata=at_least(1))
    final_eval: bool = True  # validation at the end of training
    zeroshot: ZeroShotSchema = field(default_factory=ZeroShotSchema)
    profile: ProfileSchema = field(default_factory=ProfileSchema)


@dataclass
class LoggerSchema:
    """The `logger` group: wandb mode and run naming, console progress style (metrics.jsonl is always written)."""
    wandb: str = "disabled"  # disabled | offline | online
    project: str = "moeut"
    entity: Optional[str] = None
    name: Optional[str] = None  # default: the experiment name
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    progress: str = "auto"  # auto (bar on a TTY, lines otherwise) | bar | lines | none


@dataclass
class TrainConfigSchema:
    """The whole training config (conf/config.yaml's schema): model, data, optim, train, logger."""
    model: Any = MISSING  # ModelSchema (typed through the group's own schema)
    data: DataSchema = field(default_factory=DataSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    train: TrainSchema = field(default_factory=TrainSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    name: str = "run"  # experiment name (wandb name, run-dir name)
    print_config: bool = True


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore as base_config and base_<group> (the YAML files in
    conf/ list them first in their defaults), so composing fails on a misspelt key or a wrong
    type. Idempotent. Called when this module is imported, and explicitly by train.py and by
    moeut.sweep before they compose conf/."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=TrainConfigSchema)
    cs.store(group="model", name="base_model", node=ModelSchema)
    cs.store(group="data", name="base_data", node=DataSchema)
    cs.store(group="optim", name="base_optim", node=OptimSchema)
    cs.store(group="train", name="base_train", node=TrainSchema)
    cs.store(group="logger", name="base_logger", node=LoggerSchema)


register_configs()


# ------------------------------------------------------------------------------------------
# Typed config
# ------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """The typed, validated config a run is built from (`to_typed`): `model` is the architecture's
    config dataclass (MoEUTConfig, DenseConfig, ...), the groups their schema objects, `raw` the
    resolved container (saved in checkpoints, given to wandb)."""
    model: Any  # MoEUTConfig | DenseConfig | ...
    model_preset: str
    data: DataSchema
    optim: OptimSchema
    train: TrainSchema
    logger: LoggerSchema
    name: str
    print_config: bool
    raw: Dict[str, Any]  # the resolved container (saved in checkpoints, given to wandb)


def build_model_config(model_node: Any):
    """model.preset + overrides -> the architecture's config dataclass (validated). Raises
    ValueError naming model.preset (missing / unknown) or the model.<field> that the preset's
    config class does not have, or the failing check of the config class."""
    d = OmegaConf.to_container(model_node, resolve=True) if isinstance(model_node, DictConfig) else dict(
        dataclasses.asdict(model_node) if dataclasses.is_dataclass(model_node) else model_node)
    preset = d.pop("preset", None)
    extra = d.pop("overrides", None) or {}
    if not preset or preset == MISSING:
        raise ValueError("model.preset: missing; choose one of " + ", ".join(sorted(PRESETS)))
    if preset not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}")
    base = PRESETS[preset]
    own = {f.name for f in dataclasses.fields(base)}
    overrides = {k: v for k, v in d.items() if v is not None}
    overrides.update(extra)
    foreign = sorted(k for k in overrides if k not in own)
    if foreign:
        raise ValueError(f"model.{foreign[0]}: not a field of {type(base).__name__} (preset {preset!r}); "
                         f"fields: {', '.join(sorted(own))}")
    try:
        return get_preset(preset, **overrides)
    except ValueError as e:
        raise ValueError(f"model: {e}") from e


def _fail(key: str, msg: str) -> None:
    raise ValueError(f"{key}: {msg}")


def unknown_keys(node: DictConfig, prefix: str = "") -> List[str]:
    """Dotted names of the keys of `node` (a composed config) that its structured schema does not
    declare, depth first: what a `+key=value` override added. Mappings typed as plain dicts
    (`data.extra_valid`, `model.overrides`) take any key."""
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return []
    fields = {f.name for f in dataclasses.fields(schema)}
    out: List[str] = []
    for key in node.keys():
        name = f"{prefix}{key}"
        if key not in fields:
            out.append(name)
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            out.extend(unknown_keys(child, name + "."))
    return out


def to_typed(cfg: DictConfig, world_size: int = 1) -> TrainConfig:
    """Resolve the composed `cfg`, convert it to a TrainConfig and validate it for `world_size`
    processes (ranges from the schemas, then `validate`). Raises ValueError naming the offending key."""
    try:
        raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as e:  # omegaconf MissingMandatoryValue / InterpolationResolutionError
        raise ValueError(f"config: {e}") from e
    unknown = unknown_keys(cfg)
    if unknown:  # `+train.stepz=5` adds a key Hydra accepts; no code would read it
        _fail(unknown[0], "no such option (a '+' override adds a key that nothing reads; "
                          "`python train.py --help` lists the options)")
    obj = OmegaConf.to_object(cfg)
    data, optim, train, logger = obj.data, obj.optim, obj.train, obj.logger
    for cls, node in ((DataSchema, data), (OptimSchema, optim), (TrainSchema, train), (LoggerSchema, logger)):
        assert isinstance(node, cls), f"{cls.__name__} expected, got {type(node)}"
    # Every numeric option against the range declared in its schema, before any cross-field rule.
    for key, node in (("model", obj.model), ("data", data), ("optim", optim), ("train", train), ("logger", logger)):
        if dataclasses.is_dataclass(node):
            check_ranges(node, key)
    check_mapping(dict(getattr(obj.model, "overrides", None) or {}), MODEL_RANGES, "model.overrides")
    model_cfg = build_model_config(cfg.model)
    tc = TrainConfig(model=model_cfg, model_preset=cfg.model.preset, data=data, optim=optim, train=train,
                     logger=logger, name=obj.name, print_config=obj.print_config, raw=raw)
    validate(tc, world_size)
    return tc


def validate(tc: TrainConfig, world_size: int = 1) -> None:
    """Cross-field checks of a typed config for `world_size` processes: paths exist, choices are
    known, data.vocab_size equals the model's, warm-up and stop_at within train.steps, the global
    batch divides into ranks x micro-batches. Raises ValueError naming the key."""
    from ..data.dataset import SAMPLERS
    from ..data.sources import SOURCES
    d, o, t, lg = tc.data, tc.optim, tc.train, tc.logger
    if d.source not in SOURCES:
        _fail("data.source", f"{d.source!r} is not one of {SOURCES}")
    if d.source in ("local", "thestack") and not d.path:
        _fail("data.path", f"required for data.source={d.source}")
    if d.path and d.source == "local" and not os.path.exists(os.path.expanduser(d.path)):
        _fail("data.path", f"does not exist: {d.path}")
    if d.valid_path and not os.path.exists(os.path.expanduser(d.valid_path)):
        _fail("data.valid_path", f"does not exist: {d.valid_path}")
    for k, p in d.extra_valid.items():
        if not os.path.exists(os.path.expanduser(p)):
            _fail(f"data.extra_valid.{k}", f"does not exist: {p}")
    if d.tokenizer_path and not os.path.isfile(os.path.expanduser(d.tokenizer_path)):
        _fail("data.tokenizer_path", f"not a file: {d.tokenizer_path}")
    if d.sampler not in SAMPLERS:
        _fail("data.sampler", f"{d.sampler!r} is not one of {SAMPLERS}")
    if d.vocab_size != tc.model.vocab_size:
        _fail("data.vocab_size", f"{d.vocab_size} differs from the model's vocab_size "
                                 f"{tc.model.vocab_size} (set model.vocab_size too)")
    if o.schedule not in ("cosine", "constant"):
        _fail("optim.schedule", f"{o.schedule!r} is not one of ('cosine', 'constant')")
    if len(o.betas) != 2:
        _fail("optim.betas", f"needs two values, got {o.betas}")
    if o.warmup > t.steps:
        _fail("optim.warmup", f"must be in [0, train.steps={t.steps}], got {o.warmup}")
    if t.stop_at is not None and not 0 < t.stop_at <= t.steps:
        _fail("train.stop_at", f"must be in (0, train.steps={t.steps}], got {t.stop_at}")
    if t.batch_size % world_size:
        _fail("train.batch_size", f"global batch {t.batch_size} is not divisible by the world size {world_size}")
    local = t.batch_size // world_size
    mb = t.micro_batch_size or local
    if local % mb:
        _fail("train.batch_size", f"global batch {t.batch_size} is not divisible by world size {world_size} "
                                  f"x train.micro_batch_size {mb}")
    if t.keep_every is not None and t.keep_every % t.save_interval:
        _fail("train.keep_every", f"must be a multiple of train.save_interval={t.save_interval} (checkpoints are "
                                  f"written only there), got {t.keep_every}")
    if t.aux_loss_scope not in ("step", "micro_batch"):
        _fail("train.aux_loss_scope", f"{t.aux_loss_scope!r} is not one of step, micro_batch")
    if t.precision not in ("auto", "fp32", "bf16", "fp16"):
        _fail("train.precision", f"{t.precision!r} is not one of auto, fp32, bf16, fp16")
    if t.parallel not in ("ddp", "fsdp"):
        _fail("train.parallel", f"{t.parallel!r} is not one of ddp, fsdp")
    if t.resume not in ("auto", "never") and not os.path.exists(t.resume):
        _fail("train.resume", f"'auto', 'never' or an existing checkpoint path; got {t.resume!r}")
    if t.zeroshot.interval:
        from ..eval.tasks import resolve_tasks
        if not t.zeroshot.tasks:
            _fail("train.zeroshot.tasks", "empty: name at least one task (or set train.zeroshot.interval=0)")
        try:
            resolve_tasks(t.zeroshot.tasks)
        except (KeyError, ValueError) as e:
            _fail("train.zeroshot.tasks", str(e).strip("'\""))
    if t.profile.start is None and t.profile.end is not None:
        _fail("train.profile.end", "set without train.profile.start")
    if t.profile.start is not None:
        end = t.profile.end if t.profile.end is not None else t.profile.start
        if not t.profile.start <= end <= t.steps:
            _fail("train.profile", f"needs start <= end <= train.steps={t.steps}, got start={t.profile.start}, "
                                   f"end={t.profile.end}")
    if lg.wandb not in ("disabled", "offline", "online"):
        _fail("logger.wandb", f"{lg.wandb!r} is not one of disabled, offline, online")
    if lg.progress not in ("auto", "bar", "lines", "none"):
        _fail("logger.progress", f"{lg.progress!r} is not one of auto, bar, lines, none")


def micro_batch_size(tc: TrainConfig, world_size: int) -> int:
    """Sequences per micro-batch on each rank: train.micro_batch_size, or the whole local batch
    (train.batch_size / world_size) when unset."""
    return tc.train.micro_batch_size or tc.train.batch_size // world_size


def paper_train_settings(size: str) -> Dict[str, float]:
    """PAPER_TRAIN warm-up and clip for a size label ("44m", ...)."""
    return dict(PAPER_TRAIN[size])
