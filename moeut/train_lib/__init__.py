"""Training library (SPEC §4-5): train.py is only the Hydra entry point over these modules.

    config.py       Hydra structured-config schemas (`register_configs`), `to_typed` + checks -> TrainConfig
    start.py        `validated_start`: resume, model, tokenizer, data, optimiser, run state; writes nothing
    state.py        `TrainState`: model, optimiser, scaler, step, data position, RNG, metric accumulators
    step.py         `train_step`: one optimiser step (micro-batches, clipping, non-finite skip)
    evaluate.py     `evaluate` / `validate`: validation perplexity
    loop.py         `train`: commit the run dir, the loop (log / validation / checkpoint cadence, signals)
    precision.py    train.precision -> autocast dtype and GradScaler
    metrics.py      FLOPs per token and MFU, peak memory, routing-metric layout per architecture
    schedule.py     the LR schedule (closed form of the step)
    optim.py        the AdamW optimiser and its optional parameter groups (optim.groups: router, norm, embedding)
    alarm.py        the collapse alarm (train.alarm): warns once when routing metrics or CE look collapsed
    logging.py      writing a run dir's metrics.jsonl, train.log, wandb, progress
    distributed.py  torchrun / SLURM process groups and collectives
    data.py         tokenizer and token windows of a run

Full training-state checkpoints (model, optimizer, run state) are written and read by
`moeut/checkpoint.py`, the one module for checkpoint file I/O.

Import from the modules (`from moeut.train_lib.loop import train`); this package file imports
nothing, so using one piece (e.g. the schedule) does not load the others.
"""
