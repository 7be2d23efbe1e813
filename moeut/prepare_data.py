"""Prepare a training run's data ahead of time: `python -m moeut.prepare_data [overrides]`.

Takes train.py's config and overrides (`experiment=c4_moeut_244m data.path=/data/c4 ...`) plus
the `prepare.*` options of `PrepareOptions` (`--help`, generated from the schemas), trains or loads the tokenizer and tokenises the train split (up to the
run's train limit), the validation split and every data.extra_valid set into data.cache_dir, on
all cores (`prepare.workers`), with progress, resumable after a kill, each cache with a
manifest.json that train.py verifies. A DDP run refuses to start without it
(moeut.data.pipeline.ensure_prepared). `prepare.check=true` only reports (exit status 1 when
something is missing). docs/training.md, "Preparing data".
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .cli import CONF_DIR, bad_input_exits, check_options, check_out_dir, help_node, one_line_hydra_errors, option
from .data.pipeline import check_prepared, prepare_run_data_caches
from .data.sources import DataError
from .data.tokenizer import TokenizerTrainingError
from .train_lib.config import DataSchema, LoggerSchema, OptimSchema, TrainConfigSchema, TrainSchema, to_typed



@dataclass
class PrepareOptions:
    """The `prepare` node of `python -m moeut.prepare_data` (beside train.py's own options)."""

    workers: Optional[int] = option(None, help="tokenisation processes; null = every core this process may use "
                                    "(0 = in-process)", lo=0)
    progress: bool = option(True, help="a bar on a terminal, else a line every 30 s")
    run_dir: Optional[str] = option(None, help="resuming a run? its dir, so that its tokenizer.model is used")
    check: bool = option(False, help="only check the caches (exit 1 if the run would have to tokenise)")


@dataclass
class PrepareConfigSchema(TrainConfigSchema):
    """train.py's schema plus `prepare`. Listed after `config` in the defaults: MISSING fields
    leave the composed training config untouched, `prepare` is added."""
    model: Any = MISSING
    data: DataSchema = MISSING
    optim: OptimSchema = MISSING
    train: TrainSchema = MISSING
    logger: LoggerSchema = MISSING
    name: str = MISSING
    print_config: bool = MISSING
    prepare: PrepareOptions = field(default_factory=PrepareOptions)


PREPARE_SUMMARY = """\
Prepare a training run's data ahead of time: train or load the tokenizer and tokenise the train,
validation and data.extra_valid sets into data.cache_dir, on all cores, resumable after a kill (it
continues from the last finished shard). It composes train.py's config, so it prepares exactly the
caches `python train.py <same overrides>` reads; the options besides prepare.* are train.py's
(data.* and train.* set how many tokens are prepared). See docs/training.md, "Preparing data"."""


def register_configs() -> None:
    """Store the prepare_data config in Hydra's ConfigStore: `prepare_data` (train.py's conf/config.yaml
    plus the `prepare` options; no conf/ file) and its generated `--help`. Idempotent."""
    from .train_lib.config import train_help

    cs = ConfigStore.instance()
    cs.store(name="base_prepare_config", node=PrepareConfigSchema)
    text = train_help("moeut.prepare_data", usage="python -m moeut.prepare_data [experiment=<name>] [key=value ...]"
                      "   (train.py's overrides; also moeut-prepare-data)", summary=PREPARE_SUMMARY,
                      extra=PrepareOptions, extra_prefix="prepare.", multirun=False)
    cs.store(name="prepare_data", node={
        "defaults": ["config", "base_prepare_config", "_self_", {"override hydra/job_logging": "stdout"}],
        # no run dir, no .hydra/: this command only writes data.cache_dir
        "hydra": {"output_subdir": None, "run": {"dir": "."}, "help": help_node("moeut.prepare_data", text)}})


register_configs()


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask on Linux, else os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def validated_options(cfg: DictConfig):
    """The `prepare` options and the typed training config (config.to_typed) of a composed
    prepare_data config, as (PrepareOptions, TrainConfig). Raises ValueError naming the key for a
    bad value (e.g. `prepare.workers: must be >= 0`) or a data.cache_dir that a file blocks."""
    opts = OmegaConf.to_object(cfg.prepare)
    check_options(opts, "prepare")
    tc = to_typed(cfg)  # train.py's validation (the extra `prepare` node is ignored there)
    check_out_dir(tc.data.cache_dir, "data.cache_dir")
    return opts, tc


def run(cfg: DictConfig, log=print) -> Dict[str, Any]:
    """Prepare (or with prepare.check only check) from a composed prepare_data config.
    Returns {"problems": [...]} for a check, else {"manifests": {name: TokenManifest}}."""
    opts, tc = validated_options(cfg)
    if opts.check:
        problems = check_prepared(tc, opts.run_dir)
        for p in problems:
            log(f"[data] not ready: {p}")
        if not problems:
            log("[data] every cache this run reads is prepared and verified")
        return {"problems": problems}
    workers = available_cores() if opts.workers is None else opts.workers
    log(f"[data] preparing {tc.data.source} data for {tc.name} in {tc.data.cache_dir} with {workers} worker(s)")
    return {"manifests": prepare_run_data_caches(tc, workers, opts.run_dir, progress=opts.progress, log=log)}


@one_line_hydra_errors("moeut.prepare_data")
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="prepare_data")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: prepare (tokenise, verify) every data cache the training config reads,
    or with prepare.check=true only check them (exit status 1 if any is not ready). A bad option
    exits 1 with one line `moeut.prepare_data: error: <message naming the key>` (moeut.cli), and
    so does bad data (DataError naming file:line, TokenizerTrainingError)."""
    with bad_input_exits("moeut.prepare_data"):
        validated_options(cfg)
    # bad data found while reading it (a malformed line, named file:line; a corpus too small for
    # the tokenizer) is one line too: finished shards stay, a rerun resumes after the fix
    with bad_input_exits("moeut.prepare_data", (DataError, TokenizerTrainingError)):
        res = run(cfg)
    if res.get("problems"):
        sys.exit(1)
    for name, m in res.get("manifests", {}).items():
        print(f"{name}: {m.total_tokens:,} tokens in {len(m.shards)} shard(s) -> {m.path}")


if __name__ == "__main__":
    main()
