"""Training library: Hydra schemas, LR schedule, full training-state checkpoints, distributed
setup (torchrun / SLURM) and logging (metrics.jsonl, wandb, progress). train.py ties them up."""
