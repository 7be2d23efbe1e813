"""Bring the authors' released weights in, and send ours out (issue: official weights).

Our parameter names equal the official *slim* implementation's (RobertCsordas/moeut 87f0497,
`moeut.MoEUTLM`), so the slim mapping is the identity plus validation. The *training code*
(moeut_training_code, the format of the released checkpoints) uses other names (SPEC 1.10);
`from_official` accepts both and reports missing or unexpected keys by name.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Tuple

import torch

from .model_config import MoEUTConfig
from .model import MoEUTLM

# Official constructor argument -> our MoEUTConfig field.
_ARG_MAP = {
    "d_model": "d_model", "n_layers": "n_layers", "group_size": "group_size", "n_heads": "n_heads",
    "att_n_experts": "att_n_experts", "d_head": "d_head", "ff_n_experts": "ff_n_experts",
    "ff_expert_size": "ff_expert_size", "ff_k": "ff_k", "att_k": "att_k", "entropy_reg": "entropy_reg",
    "att_entropy_reg": "att_entropy_reg", "vocab_size": "vocab_size", "dropout": "dropout",
    "rope_base": "rope_base", "rotate_fraction": "rotate_fraction",
    "ffn_d_expert": "ff_expert_size",  # alias used by some official call sites
}
# Expert-dropout arguments exist separately for MLP and attention in the official code; we have one.
_DROPOUT_ARGS = ("ff_expert_dropout", "att_expert_dropout")
# Metadata that golden files / checkpoints carry beside the architecture; ignored.
_METADATA = {"n_rotate", "n_rotate_reference_unrounded", "rope_note", "batch_size", "seq_len", "seed",
             "state_dict_dtype", "weights_note"}

# Training-code name -> slim (= our) name, per unique layer g (SPEC 1.10, golden README).
_TRAINING_RULES = [
    (r"unique_layers\.(\d+)\.self_attn\.projections\.q$", r"transformer.layers.\1.attention.q.weight"),
    (r"unique_layers\.(\d+)\.self_attn\.projections\.k$", r"transformer.layers.\1.attention.k.weight"),
    (r"unique_layers\.(\d+)\.self_attn\.projections\.v$", r"transformer.layers.\1.attention.v"),
    (r"unique_layers\.(\d+)\.self_attn\.projections\.o$", r"transformer.layers.\1.attention.o"),
    (r"unique_layers\.(\d+)\.self_attn\.selections\.v$", r"transformer.layers.\1.attention.sel_v"),
    (r"unique_layers\.(\d+)\.self_attn\.selections\.o$", r"transformer.layers.\1.attention.sel_o"),
    (r"unique_layers\.(\d+)\.self_attn\.norm\.(weight|bias)$", r"transformer.layers.\1.ln1.\2"),
    (r"unique_layers\.(\d+)\.pkm\.(keys|values|expert_sel)$", r"transformer.layers.\1.ffn.\2"),
    (r"unique_layers\.(\d+)\.pkm\.norm\.(weight|bias)$", r"transformer.layers.\1.ln2.\2"),
    (r"output\.(weight|bias)$", r"lm_head.\1"),
]
# Usage counters of the training code with no effect on outputs.
_TRAINING_IGNORED = re.compile(r"unique_layers\.\d+\.pkm\.(iter|kv_sel_counts_100)$")


def config_from_official(config: Mapping[str, Any], **overrides) -> MoEUTConfig:
    """Our MoEUTConfig from the official constructor arguments (`MoEUTLM(d_model=..., ...)`, SPEC
    1.10), `overrides` applied last. Known metadata keys (seed, n_rotate, notes, ...) are ignored,
    but a stated n_rotate must equal ours. Raises ValueError naming an unknown argument, two
    contradicting aliases, differing MLP/attention expert dropouts, or an n_rotate mismatch."""
    kwargs: Dict[str, Any] = {}
    unknown = []
    for key, value in config.items():
        if key in _ARG_MAP:
            ours = _ARG_MAP[key]
            if ours in kwargs and kwargs[ours] != value:
                raise ValueError(f"official config: {key}={value} contradicts {ours}={kwargs[ours]}")
            kwargs[ours] = value
        elif key in _DROPOUT_ARGS:
            if value and kwargs.get("expert_dropout", value) != value:
                raise ValueError(f"official config: {key}={value} differs from the other expert dropout; "
                                 "this implementation has one expert_dropout")
            kwargs["expert_dropout"] = float(value)
        elif key not in _METADATA:
            unknown.append(key)
    if unknown:
        raise ValueError(f"official config: unknown arguments {sorted(unknown)}")
    kwargs.update(overrides)
    cfg = MoEUTConfig(**kwargs)
    if "n_rotate" in config and int(config["n_rotate"]) != cfg.n_rotate:
        raise ValueError(f"official config: n_rotate={config['n_rotate']} but this model rotates "
                         f"{cfg.n_rotate} channels (d_head={cfg.d_head}, rounded down to even)")
    return cfg


def convert_training_keys(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Training-code names -> slim names; slim names pass through unchanged."""
    out: Dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if _TRAINING_IGNORED.match(name):
            continue
        new = name
        for pat, rep in _TRAINING_RULES:
            if re.match(pat, name):
                new = re.sub(pat, rep, name)
                break
        if new in out:
            raise ValueError(f"state dict: both {name!r} and another key map to {new!r}")
        out[new] = t
    return out


def from_official(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], *,
                  source: str = "official state dict", **overrides) -> MoEUTLM:
    """Build our model (fp32) from an official config dict (constructor argument names) and a slim
    or training-code state dict; `source` (e.g. the file read) is named in errors and in the
    warning when tensors stored in another dtype are cast to fp32 (moeut.checkpoint.
    load_state_dict_strict). Raises ValueError naming missing/unexpected/mismatched keys."""
    cfg = config_from_official(config, **overrides)
    sd = convert_training_keys(state_dict)
    emb = sd.get("embedding.weight")
    if emb is not None and emb.shape[0] != cfg.vocab_size:
        raise ValueError(f"official weights: embedding has {emb.shape[0]} rows but config vocab_size is "
                         f"{cfg.vocab_size}")
    with torch.device("meta"):
        model = MoEUTLM(cfg)
    from .checkpoint import load_state_dict_strict
    load_state_dict_strict(model, dict(sd), source=source)
    return model


def to_official(model: MoEUTLM) -> Dict[str, torch.Tensor]:
    """Our state dict under the official slim names (identical by construction; copied)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
