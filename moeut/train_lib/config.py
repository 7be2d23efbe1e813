"""Hydra structured configs for training (schemas in the ConfigStore) and their conversion.

The YAML files in `conf/` hold values only; these dataclasses are the schemas, so a typo or a
wrong type fails at composition. Each field is declared with `moeut.cli.option` (its help line,
range and choices), and `train.py --help` is generated from them (`train_help`). `to_typed(cfg)` turns the composed DictConfig into a
`TrainConfig` and validates cross-field constraints with messages that name the key. Nothing is
built from the config with `_target_`: the training library reads typed fields.

Model configs: the `model` group has one ConfigStore entry per preset of `moeut.registry.PRESETS`
(`register_configs`; no YAML files), so `model=<preset>` selects one; `model.preset=<name>` does
the same inside any entry. The schema (`model_schema`) has one Optional field per field of the
registered architectures' config classes (`moeut.registry.config_fields`: their types and their
range metadata, so `model.d_model=0` fails naming the option), plus a free `model.overrides` dict.
A field's default is the interpolation `${moeut.preset:${.preset},<field>}`: the value of the
selected preset (null where the preset's config class has no such field), so the composed config
(`train.py --cfg job`, the run's saved config) shows the real model values. Setting a field
(`model.d_model=128`) replaces the interpolation; null keeps the preset's value; a field the
preset's class does not have is refused by `build_model_config`, naming it.
"""
from __future__ import annotations

import dataclasses
import typing
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .. import paths
from ..cli import DEVICE_HELP, PRECISIONS, check_device, option
from ..registry import PRESETS, config_fields, get_preset
from ..validate import check_ranges, check_value, field_range

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
# Model schema: the fields of every registered architecture (moeut.registry.config_fields, with
# each config class's own types and ranges), all Optional, defaulting to the preset's value.
# ------------------------------------------------------------------------------------------

PRESET_VALUE = "${{moeut.preset:${{.preset}},{name}}}"  # a model field's default: the preset's value


def model_schema() -> type:
    """The `model` group's schema for the architectures registered now: `preset` (a name of
    moeut.registry.PRESETS), `overrides` (a free dict, for fields no schema field covers) and one
    Optional field per architecture field (moeut.registry.config_fields: type int/float/bool/str
    or Any, the range metadata of the config class), defaulting to the interpolation
    `${moeut.preset:${.preset},<field>}`. Cross-field rules stay in each config's validate()."""
    fields: List[tuple] = [("preset", str, field(default=MISSING)),
                           ("overrides", Dict[str, Any], field(default_factory=dict))]
    for name, (tp, f) in config_fields().items():
        tp = tp if tp in (int, float, bool, str) else Any
        fields.append((name, Optional[tp], field(default=PRESET_VALUE.format(name=name), metadata=dict(f.metadata))))
    schema = dataclasses.make_dataclass("ModelSchema", fields)
    schema.__module__ = __name__
    schema.__doc__ = ("model.preset names a preset of moeut.registry.PRESETS; every other field defaults to "
                      "the preset's value (an interpolation) and overrides it when set (None = keep).")
    return schema


ModelSchema = model_schema()  # the built-in architectures' (register_configs rebuilds it for later ones)

# What each model field means, for `train.py --help` (the model configs keep their comments; the
# model never imports this module). A test checks every built-in architecture's field is here.
MODEL_FIELD_HELP = {
    "d_model": "residual width d_model",
    "n_layers": "layers (MoEUT: applications of the shared group, L = G x R; SUT: maximum ACT steps)",
    "group_size": "G, unique layers of the shared group (MoEUT; dense: layer sharing, n_layers = no sharing)",
    "n_heads": "attention heads per layer",
    "d_head": "width of one attention head",
    "d_ff": "dense MLP width (dense baselines; MoE transformer: its non-MoE layers)",
    "vocab_size": "tokenizer vocabulary size V",
    "ff_n_experts": "N_E, MLP experts per layer",
    "ff_k": "K, MLP experts each token selects",
    "ff_expert_size": "width of one MLP expert",
    "att_n_experts": "SwitchHead: value/output experts per head (SUT: MoA attention experts)",
    "att_k": "attention experts each token selects per head",
    "att_expert_size": "SUT: width of one MoA expert (heads per expert x d_head)",
    "entropy_reg": "gamma, weight of the sigma-MoE gate's entropy regulariser (SPEC 1.7)",
    "att_entropy_reg": "delta, weight of the entropy regulariser of the SwitchHead V and O gates",
    "norm_init": "rescale W_v/W_o at init as the paper's runs >= 126M do (SPEC 1.6)",
    "mlp_gate_renorm": "renormalise W_S like the official slim code (the training code does not)",
    "ln_placement": "peri (paper) | pre | post: where layer norms sit (SPEC 1.2)",
    "layer_order": "abab (paper) | aabb: order of attention and MLP blocks in a group",
    "rope_base": "RoPE frequency base",
    "rotate_fraction": "fraction of each head's dimensions RoPE rotates",
    "dropout": "dropout on both branch outputs (0 in every paper run)",
    "expert_dropout": "probability of masking a sigma-MoE gate before the top-k (training only)",
    "mlp_type": "sigma_moe (paper) | switch | deepseek: the MoE MLP",
    "moe_n_shared": "DeepSeekMoE: always-on shared experts",
    "moe_balance_weight": "Switch/DeepSeekMoE expert-level balance loss weight",
    "moe_zloss_weight": "Switch router z-loss weight (softmax routers)",
    "moe_capacity_factor": "Switch expert capacity factor (0 = dropless)",
    "moe_device_groups": "DeepSeekMoE device-level balance: expert groups (SPEC 8.5)",
    "moe_device_balance_weight": "DeepSeekMoE device-level balance loss weight (0 = off)",
    "moe_every": "MoE transformer: every n-th MLP is a MoE",
    "cvmm_backend": "expert matmul backend: auto | triton | grouped_mm | torch_loop | ... (docs/kernels.md)",
    "router_zloss": "sigmoid router z-loss weight on the sigma-MoE gate (0 = off; docs/training.md \"Routing stability\")",
    "att_router_zloss": "sigmoid router z-loss weight on the SwitchHead V and O gates (0 = off)",
    "bias_balance_rate": "auxiliary-loss-free bias balancing update rate (0 = off; docs/training.md \"Routing stability\")",
    "mim_weight": "SUT: mutual-information maximisation loss weight",
    "act_weight": "SUT: ACT (halting) loss weight",
    "halt_threshold": "SUT: a position halts when its remaining mass < 1 - threshold",
    "sample_topk": "SUT: experts sampled instead of taken top-k in training (0 = none)",
    "max_relative_positions": "SUT: relative-position window of the attention",
}


@dataclass
class DataSchema:
    """The `data` group (SPEC §5): corpus, tokenizer, window length and token budgets, cache.
    Token counts are tokens; `seq_len` is T (each window holds T + 1 tokens)."""
    source: str = option("local", help="the corpus", choices=["local", "c4", "slimpajama", "pes2o", "thestack"])
    path: Optional[str] = option(None, help="local file/dir, or a hub-layout mirror root (null: stream C4 from the hub)")
    valid_path: Optional[str] = option(None, help="local only: validation file/dir (null: the *valid* files in path)")
    text_field: str = option("text", help="the JSON field holding a document's text")
    revision: Optional[str] = option(None, help="hub revision (C4: null = the paper's pinned commit)")
    languages: List[str] = option(default_factory=list, help="The Stack: the languages to read")
    seq_len: int = option(1024, help="window length T in tokens (each window holds T + 1 tokens)", lo=1)
    train_tokens: Optional[int] = option(None, help="training token budget; null = (train.steps + 100) x "
                                         "train.batch_size x seq_len + 1", lo=1)
    valid_tokens: Optional[int] = option(1032192, help="validation tokens (SPEC 5.7); null = the whole validation "
                                         "split", lo=1)
    extra_valid: Dict[str, str] = option(default_factory=dict, help="more validation sets: name -> local file/dir, "
                                         "e.g. data.extra_valid.books=/data/books")
    sampler: str = option("sequential", help="window order: sequential (paper) | shuffled",
                          choices=["sequential", "shuffled"])
    shuffle_seed: int = option(123, help="seed of the shuffled sampler", lo=0)
    # tokenizer (SPEC 5.2)
    tokenizer_path: Optional[str] = option(None, help="an existing SentencePiece .model (e.g. the released one); "
                                           "null = train one")
    vocab_size: int = option(8000, help="tokenizer vocabulary (token shards are uint16); must equal "
                             "model.vocab_size", lo=2, hi=65536)
    tokenizer_files: Optional[int] = option(10, help="train the tokenizer on the first N files (C4 10, SlimPajama "
                                            "200, ...)", lo=1)
    tokenizer_docs: Optional[int] = option(None, help="train the tokenizer on at most N documents", lo=1)
    tokenizer_chars: Optional[int] = option(None, help="train the tokenizer on at most N characters", lo=1)
    tokenizer_split_paragraphs: bool = option(False, help="books: cut documents into < 4 kB pieces for "
                                              "tokenizer training")
    tokenizer_byte_fallback: bool = option(False, help="[ours] byte pieces, so no text maps to <unk>; false = "
                                           "the paper's settings")
    cache_dir: str = option("${oc.env:MOEUT_CACHE,${moeut.cache:}}", help="token-cache directory "
                            "($MOEUT_CACHE, else the default cache)")
    num_workers: int = option(2, help="tokenisation processes (0 = in-process)", lo=0)


@dataclass
class OptimGroupSchema:
    """`optim.groups.<group>`: settings of one parameter group (moeut.train_lib.optim; docs/training.md
    "Routing stability"). Defaults change nothing (the paper's single group)."""
    # Sources: a separate router optimiser group (marin-community/marin #5478); no decay on non-matmul
    # weights (nanoGPT configure_optimizers); the per-group warm-up is ours (docs/results.md).
    lr_mult: float = option(1.0, help="the group's lr = the schedule's lr x lr_mult", lo=0, lo_open=True)
    weight_decay: Optional[float] = option(None, help="the group's weight decay; null = optim.weight_decay", lo=0)
    warmup: int = option(0, help="extra linear ramp of the group's lr over these steps; 0 = off", lo=0)


@dataclass
class OptimGroupsSchema:
    """`optim.groups`: per-parameter-group settings for router/gate weights, norms and embeddings."""
    router: OptimGroupSchema = field(default_factory=OptimGroupSchema)
    norm: OptimGroupSchema = field(default_factory=OptimGroupSchema)
    embedding: OptimGroupSchema = field(default_factory=OptimGroupSchema)


@dataclass
class OptimSchema:
    """The `optim` group (SPEC §4.1-4.3): AdamW over all parameters, LR schedule, grad clipping;
    `groups`: optional per-parameter-group settings (off by default)."""
    lr: float = option(2.5e-4, help="peak learning rate", lo=0, lo_open=True)
    betas: List[float] = option(default_factory=lambda: [0.9, 0.999], help="AdamW betas (two values)",
                                lo=0, hi=1, hi_open=True)
    eps: float = option(1e-8, help="AdamW epsilon", lo=0, lo_open=True)
    weight_decay: float = option(0.01, help="AdamW weight decay", lo=0)
    warmup: int = option(0, help="linear warm-up steps (<= train.steps)", lo=0)
    min_lr_ratio: float = option(0.1, help="the cosine schedule ends at lr x min_lr_ratio", lo=0, hi=1)
    schedule: str = option("cosine", help="learning-rate schedule (SPEC 4.2)", choices=["cosine", "constant"])
    grad_clip: Optional[float] = option(0.1, help="gradient-norm clipping; null/0 = off", lo=0)
    groups: OptimGroupsSchema = field(default_factory=OptimGroupsSchema)


@dataclass
class ZeroShotSchema:
    """`train.zeroshot`: zero-shot evaluation during training, as `python -m moeut.evaluate` runs it
    on the checkpoint of that step (docs/training.md "Zero-shot evaluation during training")."""
    interval: int = option(0, help="evaluate every N steps (a checkpoint is saved there); 0 = off", lo=0)
    tasks: List[str] = option(default_factory=lambda: ["lambada", "blimp", "piqa"],
                              help="moeut.evaluate's task names")
    limit: Optional[int] = option(None, help="items per task, as moeut.evaluate's limit; null = all", lo=1)


@dataclass
class ProfileSchema:
    """`train.profile`: a torch.profiler trace of steps start..end (the logged step numbers) into
    <run dir>/profile/ (docs/training.md "Profiles"); start null = off."""
    start: Optional[int] = option(None, help="first profiled step; null = no profile", lo=1)
    end: Optional[int] = option(None, help="last profiled step; null = start (one step)", lo=1)


@dataclass
class AlarmSchema:
    """`train.alarm`: the collapse alarm (moeut.train_lib.alarm; docs/training.md "Collapse alarm"),
    on by default: it only warns, once per metric and layer group, in train.log and metrics.jsonl."""
    enabled: bool = option(True, help="warn on a routing collapse (it only warns)")
    usage_rel_ppl: float = option(0.7, help="warn below this sigma-MoE expert-usage perplexity / N_E", lo=0, hi=1)
    dead_frac: float = option(0.1, help="warn at this fraction of dead experts", lo=0, hi=1)
    min_selections: float = option(10.0, help="check usage and dead experts only over routing windows with at "
                                   "least this many selections per expert (fewer look collapsed by chance)", lo=0)
    ce_plateau_drop: float = option(0.2, help="CE plateau: warn when CE fell less than this (nats) ...", lo=0)
    ce_plateau_window: float = option(0.08, help="... over this fraction of train.steps ...", lo=0, hi=1, lo_open=True)
    ce_plateau_until: float = option(0.25, help="... checked up to this fraction of train.steps", lo=0, hi=1)


@dataclass
class TrainSchema:
    """The `train` group (SPEC §4.3-4.5): steps, batch, precision, intervals (in steps), resume."""
    steps: int = option(100000, help="the schedule length S in optimizer steps", lo=1)
    stop_at: Optional[int] = option(None, help="end this invocation early at this step (the schedule still "
                                    "spans train.steps)", lo=1)
    batch_size: int = option(64, help="global batch in sequences", lo=1)
    micro_batch_size: Optional[int] = option(None, help="per-rank micro-batch; null = the local batch (no "
                                             "accumulation)", lo=1)
    seed: int = option(0, help="random seed", lo=0)
    device: str = option("auto", help=DEVICE_HELP)
    precision: str = option("auto", help="auto = bf16 on CUDA cc>=8, fp16 + loss scaler below, fp32 on CPU",
                            choices=["auto", *PRECISIONS])
    compile: bool = option(False, help="torch.compile the model")
    activation_checkpointing: bool = option(False, help="recompute activations in the backward pass")
    parallel: str = option("ddp", help="ddp (replicas) | fsdp (FSDP2, sharded per unique layer; docs/training.md "
                           "\"FSDP\")", choices=["ddp", "fsdp"])
    log_interval: int = option(100, help="log training metrics every N steps", lo=1)
    val_interval: int = option(2000, help="validate every N steps", lo=1)
    val_batch_size: Optional[int] = option(None, help="validation batch; null = the micro-batch size", lo=1)
    save_interval: int = option(10000, help="save a checkpoint every N steps", lo=1)
    keep_last: int = option(3, help="checkpoints kept", lo=1)
    keep_every: Optional[int] = option(None, help="also keep every checkpoint whose step is a multiple of N "
                                       "(a multiple of save_interval; null = only keep_last)", lo=1)
    routing_interval: int = option(500, help="log routing metrics every N steps (SPEC 4.4)", lo=1)
    routing_every: int = option(10, help="collect routing counts on every N-th step (SPEC 7.3)", lo=1)
    resume: str = option("auto", help="auto (newest valid checkpoint in the run dir) | never | <checkpoint path>")
    init_from: Optional[str] = option(None, help="warm start: a checkpoint's model weights only")
    max_nonfinite: int = option(10, help="abort after this many skipped steps (non-finite loss or gradients) in "
                                "a row", lo=1)
    aux_loss_scope: str = option("step", help="step: balance/MIM losses from the whole step's statistics; "
                                 "micro_batch: each forward's own", choices=["step", "micro_batch"])
    threads: Optional[int] = option(None, help="torch CPU threads; null = torch's default", lo=1)
    dist_timeout_min: int = option(30, help="timeout of collective operations, minutes", lo=1)
    final_eval: bool = option(True, help="validate at the end of training")
    zeroshot: ZeroShotSchema = field(default_factory=ZeroShotSchema)
    profile: ProfileSchema = field(default_factory=ProfileSchema)
    alarm: AlarmSchema = field(default_factory=AlarmSchema)


@dataclass
class LoggerSchema:
    """The `logger` group: wandb mode and run naming, console progress style (metrics.jsonl is always written)."""
    wandb: str = option("disabled", help="wandb mode", choices=["disabled", "offline", "online"])
    project: str = option("moeut", help="wandb project")
    entity: Optional[str] = option(None, help="wandb entity")
    name: Optional[str] = option(None, help="wandb run name; null = the experiment name")
    group: Optional[str] = option(None, help="wandb group")
    tags: List[str] = option(default_factory=list, help="wandb tags")
    progress: str = option("auto", help="console progress: auto = a bar on a terminal, lines otherwise",
                           choices=["auto", "bar", "lines", "none"])


@dataclass
class TrainConfigSchema:
    """The whole training config (conf/config.yaml's schema): model, data, optim, train, logger."""
    model: Any = option(MISSING, help="the model group (ModelSchema, typed through the group's own schema)")
    data: DataSchema = field(default_factory=DataSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    train: TrainSchema = field(default_factory=TrainSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    name: str = option("run", help="run name (conf/config.yaml: the experiment's name); the run dir is runs/<name>/...")
    print_config: bool = option(True, help="print the composed config at the start")


TRAIN_SUMMARY = """\
Train a language model (MoEUT or a baseline) from a composed config: the experiment overlay picks
model, data and training settings together; any option can be overridden. The run directory
runs/<name>/<SLURM job id or start time> holds checkpoints, metrics.jsonl and train.log, and a
restarted run resumes from its newest checkpoint. With no arguments: the CPU demo
(experiment=cpu_small). See docs/training.md."""
TRAIN_USAGE = ("python train.py | moeut-train | python -m moeut.train [experiment=<name>] [group=option ...] "
               "[key=value ...]   (sweeps: -m)")
CONFIG_GROUPS = ("experiment", "model", "data", "optim", "train", "logger")


def group_options(group: str) -> List[str]:
    """The options of config group `group`: its conf/<group>/*.yaml files and the entries stored in
    Hydra's ConfigStore under it (the `base_<group>` schemas left out), sorted."""
    from hydra.core.config_store import ConfigStore

    names = {p.stem for p in (paths.conf_dir() / group).glob("*.yaml")}
    node = ConfigStore.instance().repo.get(group, {})
    names |= {k[:-5] if k.endswith(".yaml") else k for k, v in node.items() if not isinstance(v, dict)}
    return sorted(n for n in names if not n.startswith("base_"))


def _wrapped(head: str, items: List[str], width: int = 100) -> List[str]:
    """`head` followed by `items` comma-separated, wrapped at `width` between items, continuation
    lines indented by six spaces."""
    indent = " " * 6
    lines, line = [], head
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "")
        fresh = line in (head, indent)
        if not fresh and len(line) + 1 + len(piece) > width:
            lines.append(line)
            line, fresh = indent, True
        line += ("" if fresh else " ") + piece
    lines.append(line)
    return lines


def train_help(app: str, usage: str = TRAIN_USAGE, summary: str = TRAIN_SUMMARY, extra: Any = None,
               extra_prefix: str = "", multirun: bool = True) -> str:
    """`train.py --help`, generated: the config groups with their options, the model presets
    (moeut.registry.PRESETS), every option of the data/optim/train/logger schemas with its help,
    default and range, the model fields (ModelSchema), and `extra`'s options under `extra_prefix`
    (moeut.prepare_data's `prepare.*`)."""
    from ..cli import EXIT_STATUS_LINE, type_label, format_options, schema_options

    lines = [summary.strip(), "", f"Usage: {usage}", "",
             "Config groups (group=option; the experiment overlay sets model, data and training together):"]
    for group in CONFIG_GROUPS:
        lines += _wrapped(f"  {group}: ", group_options(group))
    lines += ["", "Model presets (model=<preset>, or model.preset=<preset>):"]
    lines += _wrapped("  ", sorted(PRESETS))
    rows = [("model.preset", "STR", "", "the architecture: a preset of moeut.registry.PRESETS (set by model=...)")]
    rows += [r for r in schema_options(TrainConfigSchema) if r[0] != "model"]
    if extra is not None:
        rows += schema_options(extra, extra_prefix)
    lines += ["", "Options (key=value; a [default] is the schema's: the group files and the experiment set their own, "
              "`--cfg job` prints the composed values):", *format_options(rows)]
    hints = typing.get_type_hints(ModelSchema)
    fields = []
    for f in dataclasses.fields(ModelSchema):
        if f.name in ("preset", "overrides"):
            continue
        rng = field_range(f)
        text = MODEL_FIELD_HELP.get(f.name, "a field of an architecture registered later")
        fields.append((f"model.{f.name}", type_label(hints[f.name]), "the preset's",
                       text + (f" ({rng.describe()})" if rng is not None else "")))
    lines += ["", "Model fields (model.<field>=VALUE, SPEC 1; each defaults to the preset's value, null keeps it; "
              "model.overrides.<field>=VALUE for a field of an architecture registered later):",
              *format_options(fields)]
    lines += ["", EXIT_STATUS_LINE,
              f"Hydra's own flags: --cfg job (the resolved config), --hydra-help{', -m (multirun)' if multirun else ''}. ({app})"]
    return "\n".join(lines)


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore: base_config and base_<group> (the YAML files in
    conf/ list them first in their defaults), so composing fails on a misspelt key or a wrong
    type, and one `model` group entry per preset of moeut.registry.PRESETS (`model=<preset>`,
    also `override /model: <preset>` in an experiment): the model schema with `preset` set.
    Idempotent; presets and architectures registered before a call are included. Called when
    this module is imported, and again by train.py and moeut.sweep before they compose conf/."""
    global ModelSchema, _registered
    from ..registry import ARCHS
    cs = ConfigStore.instance()
    signature = (tuple(PRESETS), tuple((k, a.config_cls) for k, a in ARCHS.items()))
    stored = cs.repo.get("model", {})
    if signature == _registered and all(f"{n}.yaml" in stored for n in PRESETS) and "base_config.yaml" in cs.repo:
        return  # nothing new since the last call (storing ~60 preset nodes costs ~1 s per start)
    ModelSchema = model_schema()
    cs.store(name="base_config", node=TrainConfigSchema)
    for name in PRESETS:
        cs.store(group="model", name=name, node=ModelSchema(preset=name))
    cs.store(group="data", name="base_data", node=DataSchema)
    cs.store(group="optim", name="base_optim", node=OptimSchema)
    cs.store(group="train", name="base_train", node=TrainSchema)
    cs.store(group="logger", name="base_logger", node=LoggerSchema)
    # conf/config.yaml: `override hydra/help: train`
    from ..cli import help_node
    cs.store(group="hydra/help", name="train", node=help_node("train.py", train_help("train.py")))
    _registered = signature


_registered: Optional[tuple] = None  # the (presets, architectures) the ConfigStore holds now
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
    ranges = {f.name: field_range(f) for f in dataclasses.fields(base)}
    for k, v in extra.items():  # the schema fields were range-checked by to_typed; the free dict is here
        if ranges.get(k) is not None and not isinstance(v, (list, tuple)):
            check_value(f"model.overrides.{k}", v, ranges[k])
    try:
        return get_preset(preset, **overrides)
    except ValueError as e:
        raise ValueError(f"model: {e}") from e


def _shared_data_hint(path: str) -> str:
    """For a missing file of the shared text corpora (data=gutenberg, the cpu_result experiments):
    where they are looked for and how to point there; '' for any other path."""
    if os.sep + os.path.join("shared", "data", "text") + os.sep not in path or os.environ.get("MOEUT_DATA"):
        return ""
    return (" (this data config reads $MOEUT_DATA, else ../shared/data/text beside the clone: set "
            "MOEUT_DATA=<dir holding gutenberg/ and c4/>; data/README.md says where the corpora come from)")


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
        _fail("data.path", f"does not exist: {d.path}{_shared_data_hint(d.path)}")
    if d.valid_path and not os.path.exists(os.path.expanduser(d.valid_path)):
        _fail("data.valid_path", f"does not exist: {d.valid_path}{_shared_data_hint(d.valid_path)}")
    for k, p in d.extra_valid.items():
        if not os.path.exists(os.path.expanduser(p)):
            _fail(f"data.extra_valid.{k}", f"does not exist: {p}{_shared_data_hint(p)}")
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
    for g in ("router", "norm", "embedding"):
        if getattr(o.groups, g).warmup > t.steps:
            _fail(f"optim.groups.{g}.warmup", f"must be in [0, train.steps={t.steps}], got {getattr(o.groups, g).warmup}")
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
    check_device(t.device, "train.device")
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

