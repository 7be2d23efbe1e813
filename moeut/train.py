"""Train a MoEUT (or baseline) language model: the training entry point (SPEC 4).

    moeut-train experiment=<name>                     # the console script of an installed package
    python -m moeut.train experiment=<name>           # the same
    python train.py experiment=<name>                 # in a clone: train.py calls this `main`
    python train.py                                   # CPU demo: small MoEUT on the books in data/
    python train.py experiment=c4_moeut_244m data.path=/data/c4   # a paper run (C4 mirror)
    torchrun --standalone --nproc_per_node=8 train.py experiment=c4_moeut_244m
    srun python train.py experiment=...               # one task per GPU; reads SLURM_* variables
    python train.py --cfg job                         # print the resolved config (real model values)
    python train.py --help                            # the config groups and options

The Hydra entry point only (config: conf/config.yaml from moeut.paths.conf_dir, so it works in a
clone and from an installed wheel; the run dir is relative to the working directory): compose and
type the config (moeut.train_lib.config), check the data caches (moeut.data.pipeline), then
`moeut.train_lib.loop.train`, which validates the whole start before writing into the run dir,
commits it and runs the loop. The library (SPEC §4):

    moeut/train_lib/config.py     schemas (Hydra ConfigStore), to_typed + cross-field checks
    moeut/train_lib/start.py      validated start: resume, model, tokenizer, data, optimiser, TrainState
    moeut/train_lib/state.py      TrainState (model, optimiser, scaler, step, data position, RNG, accumulators)
    moeut/train_lib/step.py       train_step: micro-batches, clipping, the optimiser step
    moeut/train_lib/evaluate.py   validation perplexity
    moeut/train_lib/loop.py       train(): the loop, logging/validation/checkpoint cadence, signals
    moeut/train_lib/precision.py, metrics.py, schedule.py, logging.py, distributed.py, data.py
Nothing in the package imports this module.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .cli import (CONF_DIR, INPUT_ERRORS, bad_input_exits, check_device_available, check_out_dir, exit_bad_input,
                  raised_in, setup_tool_output, one_line_hydra_errors)
from .data.pipeline import ensure_prepared
from .train_lib.config import register_configs, to_typed
from .train_lib.distributed import env_rank_info
from .train_lib.loop import train

register_configs()  # the structured-config schemas must be in the ConfigStore before Hydra composes


def hydra_run_files() -> Dict[str, str]:
    """What Hydra writes into <run_dir>/.hydra/ at job start (hydra.yaml, overrides.yaml; config.yaml
    is added by `main`), as {relative path: YAML text}. conf/config.yaml sets
    hydra.output_subdir=null so Hydra writes nothing before validation; `train` writes these once
    the start is validated."""
    return {".hydra/hydra.yaml": OmegaConf.to_yaml(HydraConfig.instance().cfg),  # {"hydra": ...}
            ".hydra/overrides.yaml": OmegaConf.to_yaml(HydraConfig.get().overrides.task)}


def prog() -> str:
    """The name the training command was started by, for its error lines: `train.py` (the clone's
    script), `moeut-train` (the console script) or `moeut.train` (`python -m moeut.train`)."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "train.py"
    try:
        if Path(argv0).resolve() == Path(__file__).resolve():
            return "moeut.train"
    except OSError:
        pass
    return os.path.basename(argv0)


@one_line_hydra_errors(prog())
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> Optional[float]:
    """Train with the composed config `cfg` into Hydra's run dir; returns the final validation
    perplexity (for sweepers that minimise it), or None when there was none. A bad option or a
    refused start (ValueError / FileNotFoundError naming the key or file) exits 1 with one line
    `<prog>: error: ...` (SystemExit; `prog()`: train.py, moeut-train or moeut.train); a refused
    start into a new run dir removes the empty folder."""
    setup_tool_output(prog())  # one-line warnings; no progress frames in a log file
    logging.captureWarnings(True)  # warnings go to the console and, once the run starts, train.log
    run_dir = HydraConfig.get().runtime.output_dir
    # Hydra creates the run dir before we get here; a refused start into a NEW run dir removes the
    # empty folder again, so that a refused start leaves nothing behind (an existing run is never touched).
    created_empty = os.path.isdir(run_dir) and not os.listdir(run_dir)
    try:
        # Bad configuration or input is one line `<prog>: error: <message naming the key>`, exit 1
        # (moeut.cli, like every other tool); a crash of the training itself keeps its traceback.
        with bad_input_exits(prog()):
            world_size = env_rank_info()[2]
            tc = to_typed(cfg, world_size)  # fails here, naming the key, on a bad value
            check_device_available(tc.train.device, "train.device")  # a GPU this machine lacks: before any work
            check_out_dir(tc.data.cache_dir, "data.cache_dir")  # the token caches are written there
            ensure_prepared(tc, world_size, run_dir)  # DDP: no inline tokenising
        files = {".hydra/config.yaml": OmegaConf.to_yaml(cfg), **hydra_run_files()}
        try:
            result = train(tc, run_dir, run_files=files)
        except INPUT_ERRORS as err:
            if raised_in(err, "validated_start"):  # a refused start: nothing was written
                exit_bad_input(prog(), err)
            raise
    except BaseException:
        if created_empty and os.path.isdir(run_dir) and not os.listdir(run_dir):
            try:
                os.rmdir(run_dir)
                # and the empty parents Hydra made for the default runs/<name>/<time> (never above
                # the working directory): a refused start leaves no folder behind
                cwd, parent = os.path.abspath(os.getcwd()), os.path.dirname(os.path.abspath(run_dir))
                while parent.startswith(cwd + os.sep) and not os.listdir(parent):
                    os.rmdir(parent)
                    parent = os.path.dirname(parent)
            except OSError:  # another rank removed it, or wrote into it meanwhile
                pass
        raise
    return result["validation"].get("validation/val/perplexity")


def with_resolve(argv: List[str]) -> List[str]:
    """`argv` with Hydra's `--resolve` added when it asks to print the config (`--cfg`/`-c`): the model
    fields are interpolations of the preset's values (moeut.train_lib.config), so `--cfg job` shows
    the real values, as the rest of the config, rather than `${moeut.preset:...}`."""
    prints = any(a in ("--cfg", "-c") or a.startswith("--cfg=") for a in argv)
    return argv + ["--resolve"] if prints and "--resolve" not in argv else argv


def main() -> None:
    """The command line (`moeut-train`, `python -m moeut.train`, the clone's train.py): the Hydra
    app `hydra_main` with `--resolve` added to a `--cfg` request (`with_resolve`). `--help` / `-h`
    prints the generated help (the `hydra/help` node's text) without Hydra, whose help would first
    load every option of all ~85 config groups (about 10 s of CPU) for a template that does not show them.
    A run dir that Hydra cannot create because a file is in the way is one line `<prog>: error:
    hydra.run.dir: <file> is a file, not a directory`, exit status 1 (moeut.cli.check_out_dir)."""
    if any(a in ("--help", "-h") for a in sys.argv[1:]):
        from hydra.core.config_store import ConfigStore
        import string
        template = ConfigStore.instance().repo["hydra"]["help"]["train.yaml"].node.template  # "\\${" read as "${"
        print(string.Template(template).substitute())  # "$$" -> "$", as Hydra's help does
        return
    sys.argv = with_resolve(sys.argv)
    try:
        hydra_main()
    except (FileExistsError, NotADirectoryError) as err:
        if raised_in(err, "hydra_main"):  # the training's own: keeps its traceback
            raise
        # Hydra's mkdir of the run dir (hydra.run.dir, or the default runs/<name>/<time>; a multirun's
        # hydra.sweep.dir) met a file: one line naming the option and the file, before anything was written
        multirun = any(a in ("-m", "--multirun") for a in sys.argv[1:])
        try:
            check_out_dir(err.filename or "", "hydra.sweep.dir" if multirun else "hydra.run.dir")
        except ValueError as bad:
            exit_bad_input(prog(), bad)
        raise


if __name__ == "__main__":
    main()
