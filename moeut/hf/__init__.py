"""Hugging Face export of MoEUT checkpoints: `python -m moeut.hf.export checkpoint=... out=...`."""
from .configuration_moeut import MoEUTHFConfig
from .modeling_moeut import MoEUTForCausalLM
from .tokenization_moeut import MoEUTTokenizer

__all__ = ["MoEUTHFConfig", "MoEUTForCausalLM", "MoEUTTokenizer"]
