"""MoEUT: Mixture-of-Experts Universal Transformers (Csordás et al., NeurIPS 2024)."""
from .outputs import LMOutput, RoutingRecord

__version__ = "0.1.0"


def __getattr__(name):  # lazy: importing the package does not build kernels or models
    if name == "MoEUTConfig":
        from . import model_config
        return model_config.MoEUTConfig
    if name == "DenseConfig":  # lives with its model (moeut.baselines.dense)
        from .baselines import dense
        return dense.DenseConfig
    if name in ("MoEUTLM", "KVCache"):
        from . import model
        return getattr(model, name)
    if name in ("from_official", "to_official"):
        from . import official
        return getattr(official, name)
    if name in ("PRESETS", "get_preset", "build_model"):  # the registry imports the model code
        from . import registry
        return getattr(registry, name)
    if name in ("load_model", "save_checkpoint"):
        from . import checkpoint
        return getattr(checkpoint, name)
    raise AttributeError(f"module 'moeut' has no attribute {name!r}")
