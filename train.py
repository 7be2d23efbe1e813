"""Train a MoEUT (or baseline) language model: `python train.py experiment=<name>`.

    python train.py                                   # CPU demo: small MoEUT on the books in data/
    python train.py experiment=c4_moeut_244m data.path=/data/c4   # a paper run (C4 mirror)
    torchrun --standalone --nproc_per_node=8 train.py experiment=c4_moeut_244m
    srun python train.py experiment=...               # one task per GPU; reads SLURM_* variables
    python train.py --cfg job                         # print the resolved config

Reads top to bottom: config -> distributed -> checkpoint, tokenizer, model, data, optimiser and
run state, all validated against each other before anything is written into the run dir -> commit
(tokenizer.model, .hydra/, train.log, metrics.jsonl) -> loop (micro-batches, clipping, schedule,
logging, routing metrics, validation, checkpoints, signals) -> final validation.
Recipe: SPEC §4; data: SPEC §5; run-dir layout: moeut/checkpoint.py; run state: train_lib/state.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import math
import os
import resource
import signal
import traceback
import warnings
from typing import Any, Dict, List, Optional

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from moeut import checkpoint as ckpt_lib
from moeut.checkpoint import load_state_dict_strict, resolve_checkpoint, unwrap_model
from moeut.compute import total_params
from moeut.registry import build_model
from moeut.train_lib.config import TrainConfig, micro_batch_size, to_typed
from moeut.train_lib.data import prepare_run_data, resolve_tokenizer
from moeut.train_lib.distributed import (all_reduce_sum_, any_rank, barrier, broadcast_object, cleanup,
                                         env_rank_info, init_distributed)
from moeut.train_lib.logging import RunLogger, log_to_files, run_log_file
from moeut.train_lib.schedule import lr_at, set_lr
from moeut.train_lib.state import TrainState, seed_all
from moeut.data.dataset import StreamSampler
from moeut.data.pipeline import ensure_prepared

log = logging.getLogger("moeut.train")


class NonFiniteLossError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------
# Small helpers (kept here so the training recipe reads in one file)
# ------------------------------------------------------------------------------------------

def pick_precision(precision: str, device: torch.device):
    """(autocast dtype or None, use GradScaler). SPEC 4.3: bf16 on GPUs with compute capability
    >= 8 and no scaler; fp16 + GradScaler on older GPUs; fp32 on CPU unless asked."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
        else:
            precision = "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return dtype, precision == "fp16"


def enable_activation_checkpointing(model: torch.nn.Module) -> bool:
    """Recompute each unique layer's activations in backward. Patches the layer instances'
    forward (state-dict keys unchanged). Layers write routing records/regulariser inputs into the
    forward's state object; the recomputation appends to an already-consumed state, so nothing
    is counted twice."""
    from torch.utils.checkpoint import checkpoint
    layers = getattr(getattr(model, "transformer", None), "layers", None) or getattr(model, "layers", None)
    if layers is None:
        return False
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    return True


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_routing_stats(model_cfg):
    """RoutingStats laid out like the model's routing records (SPEC 7.3; outputs.RoutingRecord),
    or None for a model without experts. Every MoE architecture of the package is covered:

        moeut (σ-MoE, Switch or DeepSeekMoE MLPs)  G members x R repetitions, attention experts per head
        moe_transformer (Switch/DeepSeekMoE/σ-MoE baselines, every moe_every-th MLP)  G = L layers, R = 1
        sut  one shared layer applied L times: G = 1, R = L; its MoA experts as one "head"
    Raises ValueError naming train.routing_interval for an architecture with experts whose record
    layout is not known here (rather than silently logging no routing metrics)."""
    from moeut.routing import RoutingStats
    arch = getattr(model_cfg, "arch", "moeut")
    if arch == "moeut":
        return RoutingStats.from_config(model_cfg)
    if arch == "moe_transformer":
        return RoutingStats(model_cfg.n_layers, 1, model_cfg.ff_n_experts)
    if arch == "sut":
        return RoutingStats(1, model_cfg.n_layers, model_cfg.ff_n_experts, att_n_heads=1,
                            att_n_experts=model_cfg.att_n_experts)
    if not getattr(model_cfg, "ff_n_experts", None):
        return None  # dense: no routing to measure
    raise ValueError(f"train.routing_interval: no routing-metric layout for architecture {arch!r}; add it to "
                     "make_routing_stats in train.py")


def flops_per_token(model_cfg, seq_len: int) -> Optional[float]:
    """Training FLOPs per token of the *active* computation (moeut.compute, SPEC 9.3), or None
    with a warning naming train/mfu when the accounting module does not know the architecture
    (never 6 x total parameters: that counts every expert and inflates a MoE's MFU)."""
    from moeut.compute import flops_per_token as fpt
    try:
        return float(fpt(model_cfg, seq_len, "paper"))
    except (ValueError, AttributeError, TypeError) as e:  # an architecture the accounting does not know
        warnings.warn(f"train/mfu: not logged: FLOPs per token unknown for arch "
                      f"{getattr(model_cfg, 'arch', '?')!r} ({type(e).__name__}: {e})")
        return None


def hydra_run_files() -> Dict[str, str]:
    """What Hydra writes into <run_dir>/.hydra/ at job start (config.yaml, hydra.yaml,
    overrides.yaml), as text. conf/config.yaml sets hydra.output_subdir=null so Hydra writes
    nothing before validation; train() writes these once the start is validated."""
    return {".hydra/hydra.yaml": OmegaConf.to_yaml(HydraConfig.instance().cfg),  # {"hydra": ...}
            ".hydra/overrides.yaml": OmegaConf.to_yaml(HydraConfig.get().overrides.task)}


@torch.no_grad()
def evaluate(model, dataset, batch_size: int, device, autocast_dtype, dist) -> Dict[str, float]:
    """Perplexity = exp(sum of token CE / number of predicted tokens) (SPEC 5.7). Windows are
    split across ranks and the sums all-reduced."""
    was_training = model.training
    model.eval()
    idx = np.arange(len(dataset))[dist.rank::dist.world_size]
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [CE sum, tokens]
    for a in range(0, len(idx), batch_size):
        w = dataset.batch(idx[a:a + batch_size]).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(w[:, :-1]).logits
        ce = F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum")
        sums += torch.stack([ce.double(), torch.tensor(w[:, 1:].numel(), dtype=torch.float64, device=device)])
    all_reduce_sum_([sums])
    model.train(was_training)
    loss = (sums[0] / sums[1]).item()
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(sums[1].item())}


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------

def train(tc: TrainConfig, run_dir: str, run_files: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Train (or resume) into `run_dir`. `run_files` ({relative path: text}, e.g. Hydra's .hydra/
    files) are written with the tokenizer once the start is validated. Until then nothing in
    `run_dir` is created or changed, so a refused start (ValueError naming the option) leaves an
    existing run byte-for-byte as it was."""
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
        if dist.is_main and tc.print_config:
            say(OmegaConf.to_yaml(tc.raw))
        setup = _validated_start(tc, run_dir, dist, say)
    if dist.is_main:  # --- commit: the first write into the run dir ----------------------------
        files = dict(run_files or {})
        ckpt_lib.commit_run_dir(run_dir, setup["tokenizer"], files)
    barrier()
    with run_log_file(run_dir, enabled=dist.is_main, held=held):
        try:
            return _train_loop(tc, run_dir, dist, setup, say)
        except Exception:  # the console gets the traceback from the caller; train.log gets it here
            log_to_files(f"[train] stopped by an error:\n{traceback.format_exc()}", logging.ERROR)
            raise


def _validated_start(tc: TrainConfig, run_dir: str, dist, say) -> Dict[str, Any]:
    """Everything a start needs, checked against each other; reads the run dir, never writes it.
    Raises ValueError naming the option (or the checkpoint file) on any mismatch."""
    t_cfg, o_cfg, d_cfg = tc.train, tc.optim, tc.data
    device = dist.device
    # --- checkpoint to resume (read only) --------------------------------------------------
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
        diff = sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))
        config_diff = (f"train.resume: checkpoint {resume['path']} has a different model config: "
                       + ", ".join(f"model.{k}={stored.get(k)!r} (now {now.get(k)!r})" for k in diff))
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
    if t_cfg.activation_checkpointing and not enable_activation_checkpointing(model):
        warnings.warn("train.activation_checkpointing: this model has no `layers` to checkpoint; ignored")

    # --- data (token shards go to the cache, not the run dir) ------------------------------
    T, B = d_cfg.seq_len, t_cfg.batch_size
    train_tokens = d_cfg.train_tokens or (t_cfg.steps + 100) * B * T  # SPEC 5.4 train limit
    data = prepare_run_data(d_cfg, T, train_tokens, tok, dist, log=say)
    sampler = StreamSampler(len(data.train), B, d_cfg.sampler, d_cfg.shuffle_seed, dist.rank, dist.world_size)
    if sampler.steps_per_epoch < t_cfg.steps:
        say(f"[data] WARNING: {len(data.train)} windows give {sampler.steps_per_epoch} steps per epoch "
            f"< train.steps={t_cfg.steps}: data will repeat")

    # --- optimiser and run state -----------------------------------------------------------
    autocast_dtype, use_scaler = pick_precision(t_cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=o_cfg.lr, betas=tuple(o_cfg.betas), eps=o_cfg.eps,
                                  weight_decay=o_cfg.weight_decay)  # all parameters (SPEC 4.1)
    routing = make_routing_stats(tc.model)
    if routing is None:
        say(f"[train] {tc.model_preset} has no experts: no routing metrics (train.routing_interval unused)")
    state = TrainState(dist, optimizer, scaler, sampler, routing, seed=t_cfg.seed)
    if resume is not None:
        state.load_state_dict(resume["train"], source=resume["path"])
        say(f"[ckpt] resumed from {resume['path']} at step {state.step}")
    else:
        seed_all(t_cfg.seed + 1 + dist.rank)  # dropout streams differ per rank
    if state.step > t_cfg.steps:
        raise ValueError(f"train.steps: {t_cfg.steps} but the checkpoint {resume['path']} is at step {state.step}")
    return {"model": model, "n_params": n_params, "tokenizer": tok, "data": data, "state": state,
            "autocast_dtype": autocast_dtype, "resumed": resume is not None}


def _train_loop(tc: TrainConfig, run_dir: str, dist, setup: Dict[str, Any], say) -> Dict[str, Any]:
    t_cfg, o_cfg, d_cfg = tc.train, tc.optim, tc.data
    device = dist.device
    model, data, state = setup["model"], setup["data"], setup["state"]
    optimizer, scaler, sampler, routing = state.optimizer, state.scaler, state.sampler, state.routing
    autocast_dtype = setup["autocast_dtype"]
    T, B = d_cfg.seq_len, t_cfg.batch_size
    mb = micro_batch_size(tc, dist.world_size)
    n_micro = (B // dist.world_size) // mb
    fwd_model = torch.compile(model) if t_cfg.compile else model
    if dist.enabled:
        fwd_model = torch.nn.parallel.DistributedDataParallel(
            fwd_model, device_ids=[device.index] if device.type == "cuda" else None)
    stop = t_cfg.stop_at or t_cfg.steps

    # --- logging, signals -----------------------------------------------------------------
    logger = RunLogger(run_dir, enabled=dist.is_main, wandb_mode=tc.logger.wandb, project=tc.logger.project,
                       entity=tc.logger.entity, name=tc.logger.name or tc.name, group=tc.logger.group,
                       tags=tc.logger.tags, config=tc.raw, wandb_id=state.wandb_id, progress=tc.logger.progress,
                       total_steps=stop, initial_step=state.step,
                       resume_step=state.step)  # a fresh start (step 0) moves an old history aside too
    state.wandb_id = broadcast_object(logger.wandb_id)
    fpt = flops_per_token(tc.model, T)
    from moeut.compute import peak_flops
    peak = peak_flops(device)
    if peak is None and fpt is not None:
        msg = f"train/mfu: not logged: no peak FLOP/s known for {device}"
        if device.type == "cuda":
            warnings.warn(f"{msg} ({torch.cuda.get_device_name(device)}; add it to moeut.compute.peak_flops)")
        else:
            say(f"[train] {msg}")
    stop_signal = {"sig": None}

    def on_signal(signum, frame):  # SLURM pre-emption / time limit: finish the step, save, exit
        stop_signal["sig"] = signum
    handled = [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2]
    old_handlers = {s: signal.signal(s, on_signal) for s in handled}

    def save(at_step: int) -> Optional[str]:
        train_state = state.state_dict()  # collective: every rank contributes its RNG/routing state
        if not dist.is_main:  # only rank 0 writes (DDP replicas are identical)
            return None
        path = ckpt_lib.save_training_checkpoint(
            run_dir, at_step, model, tc.model, train_state=train_state, tokenizer=data.tokenizer,
            raw_config=tc.raw, keep_last=t_cfg.keep_last, meta={"preset": tc.model_preset, "name": tc.name})
        logger.message(f"[ckpt] saved {path}")
        return path

    def validate(at_step: int) -> Dict[str, float]:
        res = {}
        for name, ds in data.valid.items():
            r = evaluate(unwrap_model(fwd_model), ds, t_cfg.val_batch_size or mb, device, autocast_dtype, dist)
            res[f"validation/{name}/loss"], res[f"validation/{name}/perplexity"] = r["loss"], r["perplexity"]
        logger.log(at_step, res, line=True)
        return res

    # --- the loop -------------------------------------------------------------------------
    # Every log/validation decision depends on the step and train.steps only, never on where
    # this invocation stops (train.stop_at, a signal): an interrupted run logs what an
    # uninterrupted one logs.
    model.train()
    losses: List[float] = []
    window = state.window
    params = [p for p in model.parameters()]
    val_res: Dict[str, float] = {}
    status = "finished"
    routing_missing_warned = False
    ckpt_path = None
    if state.step >= stop:
        logger.message(f"[train] nothing to do: the run is at step {state.step} "
                       f"(train.steps={t_cfg.steps}, train.stop_at={t_cfg.stop_at})")
        logger.close()
        return {"status": "finished", "step": state.step, "tokens_seen": state.tokens_seen, "losses": [],
                "validation": {}, "checkpoint": None, "run_dir": run_dir}
    window.start_clock()
    try:
        while state.step < stop:
            step = state.step
            lr = lr_at(step, o_cfg.lr, o_cfg.warmup, t_cfg.steps, o_cfg.min_lr_ratio, o_cfg.schedule)
            set_lr(optimizer, lr)
            collect = routing is not None and step % t_cfg.routing_every == 0
            window_BT1 = data.train.batch(sampler.next()).to(device)  # this rank's streams [B/W, T+1]
            loss_sum = torch.zeros(3, dtype=torch.float64, device=device)  # loss, ce, reg (local means)
            for k, w in enumerate(window_BT1.split(mb)):
                sync = contextlib.nullcontext() if (not dist.enabled or k == n_micro - 1) else fwd_model.no_sync()
                with sync:
                    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                        out = fwd_model(w[:, :-1], collect_routing=collect)
                    ce = F.cross_entropy(out.logits.float().flatten(0, 1), w[:, 1:].flatten())
                    # Each micro-batch's share of the local batch; DDP averages over ranks (SPEC 4.3/4.6).
                    loss = (ce + out.reg_loss) / n_micro
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                loss_sum += torch.stack([loss.detach(), ce.detach() / n_micro, out.reg_loss.detach() / n_micro]).double()
                if collect:
                    if out.routing:
                        routing.update(out.routing)
                    elif not routing_missing_warned:
                        routing_missing_warned = True
                        warnings.warn(f"train.routing_interval: {type(unwrap_model(model)).__name__} returned no "
                                      "routing records with collect_routing=True; routing metrics stay empty")
            if scaler is not None:
                scaler.unscale_(optimizer)
            clip = o_cfg.grad_clip if o_cfg.grad_clip else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
            if dist.enabled:  # global mean loss for logging / the non-finite decision on every rank
                all_reduce_sum_([loss_sum])
                loss_sum /= dist.world_size
            loss_val = loss_sum[0].item()
            if not math.isfinite(loss_val):
                window.nonfinite_run += 1
                optimizer.zero_grad(set_to_none=True)
                logger.message(f"[train] WARNING: non-finite loss {loss_val} at step {step}; step skipped "
                               f"({window.nonfinite_run} in a row)")
                if window.nonfinite_run >= t_cfg.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{window.nonfinite_run} non-finite losses in a row (train.max_nonfinite={t_cfg.max_nonfinite}) "
                        f"at step {step}: lower optim.lr, check the data, or use train.precision=fp32")
            else:
                window.nonfinite_run = 0
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                window.add(loss_val, loss_sum[1].item(), loss_sum[2].item())
            losses.append(loss_val)
            state.step = step = step + 1
            state.tokens_seen += B * T
            window.tokens += B * T
            logger.advance()

            if step % t_cfg.log_interval == 0 or step == t_cfg.steps:
                rec = window.record()
                tps = rec["train/tokens_per_s"]
                logger.log(step, {**rec, "train/lr": lr, "train/grad_norm": float(grad_norm),
                                  "train/mfu": (tps * fpt / peak) if (peak and fpt) else None,
                                  "train/tokens_seen": state.tokens_seen, "train/memory_mb": memory_mb(device)},
                           line=True)
            if routing is not None and step % t_cfg.routing_interval == 0:
                counts = routing.state_counts()
                all_reduce_sum_(list(counts.values()))  # statistics are summed over ranks (SPEC 4.6)
                if dist.is_main:
                    logger.log(step, routing.compute())
                    buf = io.BytesIO()
                    np.savez(buf, **routing.counts_numpy())
                    ckpt_lib.write_file_atomic(os.path.join(run_dir, "routing", f"counts_step{step:07d}.npz"),
                                               buf.getvalue())
                    for g in range(routing.n_groups):
                        logger.log_figure(step, f"moe/g{g}/usage_heatmap", routing.heatmap_figure(g))
                routing.reset()
            if step % t_cfg.val_interval == 0 and step < t_cfg.steps:
                val_res = validate(step)
            if any_rank(stop_signal["sig"] is not None, device):
                status = "preempted"
                logger.message(f"[train] signal received: saving at step {step} and exiting")
                break
            if step % t_cfg.save_interval == 0 and step < stop:
                ckpt_path = save(step)
        if state.step == t_cfg.steps and t_cfg.final_eval:
            val_res = validate(state.step)
            for name in data.valid:
                say(f"validation perplexity ({name}): {val_res[f'validation/{name}/perplexity']:.2f}")
        elif state.step < t_cfg.steps and status == "finished":
            logger.message(f"[train] stopped at step {state.step} (train.stop_at) of train.steps={t_cfg.steps}; "
                           f"the same command without train.stop_at resumes it")
        ckpt_path = save(state.step)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        logger.close()
    barrier()
    cleanup()
    if status == "preempted":
        # Under submitit, the handler we replaced requeues the job (respecting max_num_timeout):
        # call it now that the checkpoint is safe. Plain runs had SIG_DFL (not callable): no-op.
        prev = old_handlers.get(stop_signal["sig"])
        if callable(prev):
            prev(stop_signal["sig"], None)
    return {"status": status, "step": state.step, "tokens_seen": state.tokens_seen, "losses": losses,
            "validation": val_res, "checkpoint": ckpt_path, "run_dir": run_dir}


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    logging.captureWarnings(True)  # warnings go to the console and, once the run starts, train.log
    run_dir = HydraConfig.get().runtime.output_dir
    # Hydra creates the run dir before we get here; a refused start into a NEW run dir removes the
    # empty folder again, so that a refused start leaves nothing behind (an existing run is never touched).
    created_empty = os.path.isdir(run_dir) and not os.listdir(run_dir)
    try:
        world_size = env_rank_info()[2]
        tc = to_typed(cfg, world_size)  # fails here, naming the key, on a bad value
        ensure_prepared(tc, world_size, run_dir)  # DDP: no inline tokenising
        files = {".hydra/config.yaml": OmegaConf.to_yaml(cfg), **hydra_run_files()}
        result = train(tc, run_dir, run_files=files)
    except BaseException:
        if created_empty and os.path.isdir(run_dir) and not os.listdir(run_dir):
            try:
                os.rmdir(run_dir)
            except OSError:  # another rank removed it, or wrote into it meanwhile
                pass
        raise
    ppl = result["validation"].get("validation/val/perplexity")
    return ppl  # for Hydra sweepers that minimise the return value


if __name__ == "__main__":
    main()
