"""The training loop and the `train()` entry of the library (SPEC §4.4, §4.5).

Owns the order of a run: distributed setup -> validated start (start.py; nothing written) ->
commit of the run dir (tokenizer.model, .hydra/ files, train.log, metrics.jsonl) -> the loop
-> final validation and checkpoint. The loop decides, from the step and train.steps only, when
to log a train/ record, routing metrics, validation and a checkpoint, so an interrupted run
(train.stop_at, a signal, a crash) logs exactly what an uninterrupted one logs; it handles
SIGTERM / SIGUSR1 / SIGUSR2 (finish the step, save, hand the signal on) and Ctrl-C (SIGINT: finish
the step, save, return; a second Ctrl-C stops at once). One step's arithmetic
is step.py's, validation is evaluate.py's, the run state is state.py's.
"""
from __future__ import annotations

import functools
import io
import logging
import os
import signal
import traceback
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import OmegaConf

from moeut import checkpoint as ckpt_lib
from moeut.wrappers import unwrap_model

from .config import TrainConfig, micro_batch_size
from .distributed import DistInfo, all_reduce_sum_, any_rank, barrier, broadcast_object, cleanup, init_distributed
from .evaluate import validate
from .fsdp import full_model_state, is_sharded
from .logging import RunLogger, log_to_files, run_log_file
from .metrics import flops_per_token, memory_mb, mfu, mfu_peak
from .schedule import lr_at
from .start import RunSetup, validated_start
from .profile import StepProfiler
from .step import NonFiniteLossError, train_step
from .zeroshot import evaluate_saved_checkpoint, logged_zeroshot_steps

log = logging.getLogger("moeut.train")

# Pre-emption / time-limit signals (SLURM sends SIGUSR1 or SIGTERM; torchrun forwards SIGTERM).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def train(tc: TrainConfig, run_dir: str, run_files: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Train (or resume) into `run_dir` with the typed config `tc` (config.to_typed).

    `run_files` ({relative path: text}, e.g. Hydra's .hydra/ files) are written with the
    tokenizer once the start is validated. Until then nothing in `run_dir` is created or changed,
    so a refused start (ValueError naming the option) leaves an existing run byte-for-byte as it
    was; so does a start with nothing to do (the run is at train.stop_at or train.steps and owes
    no zero-shot point), which says so and returns. Under torchrun / srun every rank calls this; only rank 0 writes.
    Returns {"status": "finished" | "preempted", "step", "tokens_seen", "losses" (global mean loss
    of each step this call ran), "validation" (the last validation record), "checkpoint" (path of
    the last checkpoint written, rank 0), "run_dir"}. Raises ValueError on a refused start and
    NonFiniteLossError after train.max_nonfinite non-finite losses in a row; an error after the
    start is also written to train.log."""
    t_cfg = tc.train
    dist = init_distributed(t_cfg.device, t_cfg.dist_timeout_min)
    run_dir = broadcast_object(os.path.abspath(run_dir))  # ranks may compose different timestamps
    device = dist.device
    with run_log_file(run_dir, enabled=False) as held:  # train.log gets these once the start is validated
        say = log.info if dist.is_main else (lambda *a, **k: None)
        if device.type == "cpu":
            from moeut.cpu import keep_freed_memory
            keep_freed_memory()  # SPEC 3.8: avoid page-faulting large expert buffers every step
        if t_cfg.threads:
            torch.set_num_threads(t_cfg.threads)
        setup = validated_start(tc, run_dir, dist, say)
        if dist.is_main and tc.print_config:  # only for a started run: a refused one is its error line
            say(OmegaConf.to_yaml(tc.raw))
        # A start with nothing to do (the run is at train.stop_at / train.steps and owes no zero-shot
        # point) writes nothing: the run dir keeps the files of the runs that trained it.
        step, stop = setup.state.step, t_cfg.stop_at or t_cfg.steps
        idle = step >= stop and not zeroshot_pending(tc, run_dir, step, dist)
        if idle:
            stop_at = "null" if t_cfg.stop_at is None else t_cfg.stop_at
            say(f"[train] nothing to do: the run is at step {step} (train.steps={t_cfg.steps}, "
                f"train.stop_at={stop_at}); nothing written into {run_dir}")
    if idle:
        result: Dict[str, Any] = {"status": "finished", "step": step, "tokens_seen": setup.state.tokens_seen,
                                  "losses": [], "validation": {}, "checkpoint": None, "run_dir": run_dir}
        requeue = None
    else:
        if dist.is_main:  # --- commit: the first write into the run dir ----------------------------
            ckpt_lib.commit_run_dir(run_dir, setup.tokenizer, dict(run_files or {}))
            from moeut.provenance import record_provenance
            record_provenance(run_dir, step=setup.state.step, log=say)
        barrier()
        with run_log_file(run_dir, enabled=dist.is_main, held=held):
            if dist.is_main:  # newer than the resumed step, unreadable: an abandoned timeline (RunSetup)
                for c in setup.abandoned:
                    ckpt_lib.set_aside_checkpoint(c, f"unreadable, and newer than the resumed step {setup.state.step}",
                                                  say)
            try:
                result, requeue = run_loop(tc, run_dir, dist, setup, say)
            except Exception:  # the console gets the traceback from the caller; train.log gets it here
                log_to_files(f"[train] stopped by an error:\n{traceback.format_exc()}", logging.ERROR)
                raise
    setup = None  # nothing of the run may hold the process group when it goes (architecture.md, "Process-group teardown")
    barrier()
    cleanup()
    if requeue is not None:
        requeue()
    return result


def zeroshot_pending(tc: TrainConfig, run_dir: str, step: int, dist: DistInfo) -> bool:
    """Whether the zero-shot point of `step` (train.zeroshot.interval divides it) is owed: its
    checkpoint was saved but metrics.jsonl has no zeroshot/ record of it (the previous invocation
    stopped in between, e.g. a signal). Rank 0 reads metrics.jsonl; every rank gets its answer."""
    zs = tc.train.zeroshot
    if not (zs.interval and step > 0 and step % zs.interval == 0):
        return False
    from moeut.rundir import read_metrics
    path = os.path.join(run_dir, "metrics.jsonl")
    missing = dist.is_main and step not in logged_zeroshot_steps(read_metrics(path) if os.path.exists(path) else [])
    return bool(broadcast_object(missing))


def save_checkpoint(setup: RunSetup, tc: TrainConfig, run_dir: str, logger: RunLogger) -> Optional[str]:
    """Checkpoint the run at `setup.state.step` into <run_dir>/checkpoints/ (moeut.train_lib.
    checkpoint; keeps train.keep_last and every train.keep_every-th step's). A collective under DDP and FSDP (every rank contributes
    its RNG and routing state, and under FSDP its shards of the weights and optimiser state,
    gathered to full tensors); only rank 0 writes and gets the path, the others None. Raises
    NonFiniteWeightsError on every rank, before anything is gathered or written, when the weights
    (any rank's shard) hold inf/NaN: the run stops and the existing checkpoints are kept."""
    state = setup.state
    where = os.path.join(run_dir, "checkpoints", ckpt_lib.checkpoint_dir_name(state.step))
    try:  # under FSDP each rank checks its own shard: every rank must take the same decision
        ckpt_lib.check_finite_weights(state.model, where)
        bad = None
    except ckpt_lib.NonFiniteWeightsError as e:
        bad = e
    if any_rank(bad is not None, state.dist.device):
        raise bad or ckpt_lib.NonFiniteWeightsError(f"{where}: not written: another rank's weight shard holds "
                                                    "inf/NaN; the existing checkpoints are kept")
    model_state = full_model_state(state.model)  # collective when sharded (train.parallel=fsdp)
    train_state = state.state_dict()
    if not state.dist.is_main:  # only rank 0 writes the full (unsharded) state
        return None
    path = ckpt_lib.save_training_checkpoint(
        run_dir, state.step, state.model, tc.model, model_state=model_state, train_state=train_state,
        tokenizer=setup.tokenizer,
        raw_config=tc.raw, keep_last=tc.train.keep_last, keep_every=tc.train.keep_every, meta={"preset": tc.model_preset, "name": tc.name},
        log=logger.message)
    logger.message(f"[ckpt] saved {path}")
    return path


def sound_alarm(state, step: int, record: Dict[str, Any], logger: RunLogger) -> None:
    """Feed a logged record to the collapse alarm (rank 0; train.alarm): each new event is a
    WARNING line in train.log and an alarm/<metric>/<group> entry in metrics.jsonl at `step`."""
    if state.alarm is None or not state.dist.is_main:
        return
    for event in state.alarm.check(step, record):
        logger.message(event.message(), logging.WARNING)
        logger.log(step, event.record())
    for note in state.alarm.pop_notes():
        logger.message(note)


def log_routing(state, step: int, run_dir: str, logger: RunLogger) -> None:
    """Log the routing metrics accumulated since the last call (SPEC 7.3) and start anew:
    counts summed over ranks (SPEC 4.6), moe/... metrics and usage heatmaps on rank 0 (and the
    collapse alarm fed with them), the raw counts as <run_dir>/routing/counts_step<step>.npz.
    A collective under DDP."""
    routing, dist = state.routing, state.dist
    counts = routing.state_counts()
    all_reduce_sum_(list(counts.values()))  # statistics are summed over ranks (SPEC 4.6)
    if dist.is_main:
        metrics = routing.compute()
        logger.log(step, metrics)
        sound_alarm(state, step, metrics, logger)
        buf = io.BytesIO()
        np.savez(buf, **routing.counts_numpy())
        ckpt_lib.write_file_atomic(os.path.join(run_dir, "routing", f"counts_step{step:07d}.npz"), buf.getvalue())
        for g in range(routing.n_groups):
            logger.log_figure(step, f"moe/g{g}/usage_heatmap", routing.heatmap_figure(g))
    routing.reset()


def run_loop(tc: TrainConfig, run_dir: str, dist: DistInfo, setup: RunSetup,
             say: Callable[[str], None]) -> Tuple[Dict[str, Any], Optional[Callable[[], None]]]:
    """The loop of a committed run (after `validated_start` and the commit): `train`'s result and,
    after a stop signal, the replaced signal handler to call once the process group is gone (None
    otherwise). Steps from `setup.state.step` to train.stop_at (or train.steps); logs train/ every
    train.log_interval steps and at train.steps, routing metrics every train.routing_interval,
    validation every train.val_interval (and at the end when train.final_eval), checkpoints every
    train.save_interval and at the end, zero-shot scores every train.zeroshot.interval (zeroshot.py),
    a profile of steps train.profile.start..end (profile.py). A stop signal ends the run after the
    current step with a checkpoint and status "preempted"; `train` then calls the replaced signal
    handler (submitit's requeue). Raises NonFiniteLossError after train.max_nonfinite non-finite losses in a row."""
    t_cfg, o_cfg, d_cfg = tc.train, tc.optim, tc.data
    device = dist.device
    state, data = setup.state, setup.data
    model, routing = state.model, state.routing
    T = d_cfg.seq_len
    mb = micro_batch_size(tc, dist.world_size)
    fwd_model = torch.compile(model) if t_cfg.compile else model
    if dist.enabled and not is_sharded(model):  # FSDP (train.parallel=fsdp) syncs gradients itself
        fwd_model = torch.nn.parallel.DistributedDataParallel(
            fwd_model, device_ids=[device.index] if device.type == "cuda" else None)
    stop = t_cfg.stop_at or t_cfg.steps

    # --- logging, MFU --------------------------------------------------------------------
    logger = RunLogger(run_dir, enabled=dist.is_main, wandb_mode=tc.logger.wandb, project=tc.logger.project,
                       entity=tc.logger.entity, name=tc.logger.name or tc.name, group=tc.logger.group,
                       tags=tc.logger.tags, config=tc.raw, wandb_id=state.wandb_id, progress=tc.logger.progress,
                       total_steps=stop, initial_step=state.step,
                       resume_step=state.step)  # a fresh start (step 0) moves an old history aside too
    state.wandb_id = broadcast_object(logger.wandb_id)
    fpt = flops_per_token(tc.model, T)
    peak = mfu_peak(device, fpt, say)
    def validation(at_step: int) -> Dict[str, float]:
        res = validate(unwrap_model(fwd_model), data.valid, t_cfg.val_batch_size or mb, device,
                       setup.autocast_dtype, dist)
        logger.log(at_step, res, line=True)
        return res

    zs = t_cfg.zeroshot

    def zeroshot_due(at_step: int) -> bool:
        return bool(zs.interval) and at_step > 0 and at_step % zs.interval == 0

    def zeroshot(at_step: int) -> None:  # rank 0 evaluates the step's saved checkpoint; the others wait
        if dist.is_main:
            ckpt = os.path.join(run_dir, "checkpoints", ckpt_lib.checkpoint_dir_name(at_step))
            try:
                res, scores = evaluate_saved_checkpoint(ckpt, zs.tasks, zs.limit, str(device))
            except (ValueError, FileNotFoundError) as e:  # e.g. no task data: training goes on, said
                logger.message(f"[zeroshot] WARNING: train.zeroshot: step {at_step} not evaluated: {e}")
            else:
                logger.log(at_step, scores, line=True)
                logger.message(f"[zeroshot] step {at_step}: {res['data_line']}; results {res['files']['json']}")
        barrier()

    # A zero-shot point due at the resumed step and not in metrics.jsonl (the previous invocation
    # stopped between that checkpoint and its evaluation, e.g. a signal): evaluate it now.
    if zeroshot_pending(tc, run_dir, state.step, dist):
        zeroshot(state.step)
    profiler = StepProfiler(t_cfg.profile.start, t_cfg.profile.end, run_dir, device, enabled=dist.is_main,
                            log=logger.message)

    # --- the loop -------------------------------------------------------------------------
    # Every log/validation decision depends on the step and train.steps only, never on where
    # this invocation stops (train.stop_at, a signal): an interrupted run logs what an
    # uninterrupted one logs.
    model.train()
    losses: List[float] = []
    window = state.window
    val_res: Dict[str, float] = {}
    status = "finished"
    routing_missing_warned = False
    ckpt_path = None
    if state.step >= stop:
        logger.message(f"[train] nothing to do: the run is at step {state.step} "
                       f"(train.steps={t_cfg.steps}, train.stop_at={t_cfg.stop_at})")
        logger.close()
        return {"status": "finished", "step": state.step, "tokens_seen": state.tokens_seen, "losses": [],
                "validation": {}, "checkpoint": None, "run_dir": run_dir}, None
    stop_signal: Dict[str, Optional[int]] = {"sig": None}

    def on_signal(signum, frame):  # SLURM pre-emption / time limit / Ctrl-C: finish the step, save, exit
        if signum == signal.SIGINT and stop_signal["sig"] is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        stop_signal["sig"] = signum
    old_handlers = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS + (signal.SIGINT,)}
    window.start_clock()
    try:
        while state.step < stop:
            step = state.step
            lr = lr_at(step, o_cfg.lr, o_cfg.warmup, t_cfg.steps, o_cfg.min_lr_ratio, o_cfg.schedule)
            collect = routing is not None and step % t_cfg.routing_every == 0
            profiler.before_step(step + 1)
            with profiler.marker():
                window_BT1 = data.train.batch(state.sampler.next()).to(device)  # this rank's streams [B/W, T+1]
                res = train_step(state, fwd_model, window_BT1, lr, micro_batch_size=mb,
                                 autocast_dtype=setup.autocast_dtype, grad_clip=o_cfg.grad_clip,
                                 collect_routing=collect, aux_loss_scope=t_cfg.aux_loss_scope)
            profiler.after_step(step + 1)
            if res.routing_missing and not routing_missing_warned:
                routing_missing_warned = True
                warnings.warn(f"train.routing_interval: {type(model).__name__} returned no "
                              "routing records with collect_routing=True; routing metrics stay empty")
            if not res.finite:
                what = (f"non-finite loss {res.loss}" if res.skipped == "loss" else
                        f"non-finite gradients (grad norm {res.grad_norm}) with a finite loss {res.loss:.4f}")
                logger.message(f"[train] WARNING: {what} at step {res.step}; step skipped, weights and optimiser "
                               f"state unchanged ({window.nonfinite_run} skipped in a row)")
                if window.nonfinite_run >= t_cfg.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{window.nonfinite_run} non-finite losses or gradients in a row "
                        f"(train.max_nonfinite={t_cfg.max_nonfinite}) at step {res.step}: lower optim.lr, check "
                        f"the data, or use train.precision=fp32")
            losses.append(res.loss)
            step = state.step
            logger.advance()

            if step % t_cfg.log_interval == 0 or step == t_cfg.steps:
                rec = window.record()
                logger.log(step, {**rec, "train/lr": lr, "train/grad_norm": res.grad_norm,
                                  "train/mfu": mfu(rec["train/tokens_per_s"], fpt, peak),
                                  "train/tokens_seen": state.tokens_seen, "train/memory_mb": memory_mb(device)},
                           line=True)
                sound_alarm(state, step, rec, logger)
            if routing is not None and step % t_cfg.routing_interval == 0:
                log_routing(state, step, run_dir, logger)
            if step % t_cfg.val_interval == 0 and step < t_cfg.steps:
                val_res = validation(step)
            if any_rank(stop_signal["sig"] is not None, device):
                status = "preempted"
                name = signal.Signals(stop_signal["sig"]).name if stop_signal["sig"] is not None else "on another rank"
                logger.message(f"[train] signal received ({name}): saving at step {step} and exiting"
                               + ("; a second Ctrl-C stops without saving" if name == "SIGINT" else ""))
                break
            if step % t_cfg.save_interval == 0 and step < stop:
                ckpt_path = save_checkpoint(setup, tc, run_dir, logger)
            if zeroshot_due(step) and step < stop:  # on a saved checkpoint: the one moeut.evaluate would read
                if step % t_cfg.save_interval:
                    ckpt_path = save_checkpoint(setup, tc, run_dir, logger)
                zeroshot(step)
        if state.step == t_cfg.steps and t_cfg.final_eval:
            val_res = validation(state.step)
            for name in data.valid:
                say(f"validation perplexity ({name}): {val_res[f'validation/{name}/perplexity']:.2f}")
        elif state.step < t_cfg.steps and status == "finished":
            logger.message(f"[train] stopped at step {state.step} (train.stop_at) of train.steps={t_cfg.steps}; "
                           f"the same command without train.stop_at resumes it")
        ckpt_path = save_checkpoint(setup, tc, run_dir, logger)
        if status == "finished" and zeroshot_due(state.step):  # pre-empted: the resume evaluates it
            zeroshot(state.step)
    finally:
        profiler.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        logger.close()
    requeue = None
    if status == "preempted":
        # Under submitit, the handler we replaced requeues the job (respecting max_num_timeout):
        # train() calls it once the checkpoint is safe. Plain runs had SIG_DFL (not callable): none.
        prev, sig = old_handlers.get(stop_signal["sig"]), stop_signal["sig"]
        if callable(prev) and sig != signal.SIGINT:  # Ctrl-C: saved, so no KeyboardInterrupt
            requeue = functools.partial(prev, sig, None)
    return {"status": status, "step": state.step, "tokens_seen": state.tokens_seen, "losses": losses,
            "validation": val_res, "checkpoint": ckpt_path, "run_dir": run_dir}, requeue
