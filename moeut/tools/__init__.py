"""Tools that build whole models to look at the kernels a run compiles (the top layer, beside
train_lib and analysis; `moeut.kernels` holds the kernels only).

    moeut.tools.footprint   `python -m moeut.tools.footprint`: every Triton kernel variant x config
                            a run compiles; AOT compile timing
    moeut.tools.warmup      `python -m moeut.tools.warmup`: pre-warm the Triton caches for a model

Importing this package imports no submodule.
"""
