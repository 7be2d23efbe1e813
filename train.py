"""Train a MoEUT (or baseline) language model: `python train.py experiment=<name>`.

    python train.py                                   # CPU demo: small MoEUT on the books in data/
    python train.py experiment=c4_moeut_244m data.path=/data/c4   # a paper run (C4 mirror)
    torchrun --standalone --nproc_per_node=8 train.py experiment=c4_moeut_244m
    srun python train.py experiment=...               # one task per GPU; reads SLURM_* variables
    python train.py --cfg job                         # print the resolved config
    python train.py --help                            # the config groups and options

The clone's script for `moeut.train.main`, the entry point an installed package runs as
`moeut-train` (or `python -m moeut.train`); see that module. Nothing imports this file.
"""
from moeut.train import main

if __name__ == "__main__":
    main()
