"""Export a MoEUT checkpoint as a Hugging Face model directory.

    python -m moeut.hf.export checkpoint=<run dir or checkpoint dir> out=<dir> [dtype=bf16|fp16|fp32]

A Hydra app over conf/hf_export.yaml (`--help` lists the options); `export()` is the library call.

Writes config.json (with auto_map), model.safetensors, the modelling code (configuration_moeut.py,
modeling_moeut.py, tokenization_moeut.py; the model code imports the installed `moeut` package),
tokenizer.model (the run's SentencePiece model) + tokenizer_config.json, and moeut_export.json
(provenance), every file with the umask's ordinary mode (0644). Special tokens: EOS and pad are
control pieces, no BOS (tokenization_moeut.py). Load it with

    AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    AutoTokenizer.from_pretrained(out, trust_remote_code=True)        # encodes as the native one, adds no BOS/EOS
    moeut.data.tokenizer.Tokenizer.load(out + "/tokenizer.model")   # or sentencepiece directly
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Optional

import hydra
import torch

from ..cli import CONF_DIR, one_line_hydra_errors

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def export(checkpoint: str, out: str, *, dtype: Optional[str] = None) -> str:
    """Write the Hugging Face model directory `out` for a MoEUT checkpoint; returns `out`.

    `checkpoint`: a run dir (its newest valid checkpoint) or a checkpoints/step_XXXXXXX dir.
    `dtype`: precision of the stored weights, "bf16" | "fp16" | "fp32" (None: fp32, as stored
    natively). The exported model gives the native model's logits (tests/test_hf_export.py).
    Raises ValueError `dtype: ...` for another dtype (before anything is written) and whatever
    moeut.checkpoint.load_model raises for a missing or invalid checkpoint."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype: use one of {sorted(DTYPES)}, got {dtype!r}")
    from ..checkpoint import load_model
    from .configuration_moeut import MoEUTHFConfig
    from .modeling_moeut import MoEUTForCausalLM

    loaded = load_model(checkpoint)
    special = {}
    if loaded.tokenizer is not None:  # the tokenizer's special tokens (tokenization_moeut.py): control pieces
        from .tokenization_moeut import MoEUTTokenizer
        sp = loaded.tokenizer.sp
        special = {"eos_token_id": sp.piece_to_id(MoEUTTokenizer.default_eos_piece(sp)),
                   "pad_token_id": sp.piece_to_id(MoEUTTokenizer.default_pad_piece(sp)), "bos_token_id": None}
    hf_cfg = MoEUTHFConfig(moeut_config=dataclasses.asdict(loaded.config), **special)
    MoEUTHFConfig.register_for_auto_class()
    MoEUTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    hf_model = MoEUTForCausalLM(hf_cfg)
    hf_model.model.load_state_dict(loaded.model.state_dict(), strict=True)
    if dtype:  # stored weights in another precision (the native checkpoint is fp32)
        hf_model = hf_model.to(DTYPES[dtype])
    os.makedirs(out, exist_ok=True)
    hf_model.save_pretrained(out)
    if loaded.tokenizer is not None:
        from .tokenization_moeut import MoEUTTokenizer
        tok_path = os.path.join(out, "tokenizer.model")
        loaded.tokenizer.save(tok_path)
        MoEUTTokenizer.register_for_auto_class("AutoTokenizer")
        MoEUTTokenizer(tok_path, model_max_length=1024).save_pretrained(out)
    with open(os.path.join(out, "moeut_export.json"), "w") as f:
        json.dump({"checkpoint": loaded.path, "step": loaded.meta.get("step"),
                   "arch": getattr(loaded.config, "arch", None),
                   "tokenizer_sha256": loaded.tokenizer.sha256 if loaded.tokenizer else None,
                   "note": "No BOS: the first token of a sequence is never predicted. Tokenize with "
                           "tokenizer.model (SentencePiece, add no special tokens)."}, f, indent=1)
    _ordinary_modes(out)
    return out


def _ordinary_modes(out: str) -> None:
    """Give every file of the export the mode a new file gets under the current umask (0644 under
    the usual 022): some writers (safetensors) create theirs 0600, unreadable to other users."""
    mask = os.umask(0)
    os.umask(mask)
    for root, _, files in os.walk(out):
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def run(cfg: Any) -> str:
    """Export as a composed conf/hf_export.yaml asks (`checkpoint`, `out`, `dtype`); returns `out`.
    Raises ValueError naming the option (missing checkpoint/out, unknown option, bad dtype) and
    FileNotFoundError `checkpoint=...` when the checkpoint path does not exist."""
    from ..cli import choice_option, tool_options

    o = tool_options(cfg, "hf_export", required=("checkpoint", "out"))
    choice_option(o, "dtype", sorted(DTYPES), allow_none=True)
    if not os.path.exists(str(o["checkpoint"])):
        raise FileNotFoundError(f"checkpoint={o['checkpoint']}: no such file or directory "
                                "(pass a run dir or a checkpoints/step_XXXXXXX dir)")
    return export(str(o["checkpoint"]), str(o["out"]), dtype=o.get("dtype"))


@one_line_hydra_errors("moeut.hf.export")
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="hf_export")
def main(cfg: Any) -> None:
    """`python -m moeut.hf.export checkpoint=<dir> out=<dir> [dtype=...]` (also the
    `moeut-hf-export` script): prints the output directory; bad input: a one-line error, exit 1."""
    from moeut.cli import setup_tool_output
    setup_tool_output("moeut.hf.export")  # one-line warnings; no progress frames in a log file
    try:
        print(run(cfg))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"moeut.hf.export: error: {e}")


if __name__ == "__main__":
    main()
