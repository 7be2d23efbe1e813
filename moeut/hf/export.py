"""Export a MoEUT checkpoint as a Hugging Face model directory.

    python -m moeut.hf.export checkpoint=<run dir or checkpoint dir> out=<dir>

Writes config.json (with auto_map), model.safetensors, the modelling code (configuration_moeut.py,
modeling_moeut.py, tokenization_moeut.py; the model code imports the installed `moeut` package),
tokenizer.model (the run's SentencePiece model) + tokenizer_config.json, and moeut_export.json
(provenance). Load it with

    AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    AutoTokenizer.from_pretrained(out, trust_remote_code=True)        # adds no BOS/EOS
    moeut.data.tokenizer.Tokenizer.load(out + "/tokenizer.model")   # or sentencepiece directly
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Dict, List, Optional

import torch


def export(checkpoint: str, out: str, *, dtype: Optional[str] = None) -> str:
    from ..checkpoint import load_model
    from .configuration_moeut import MoEUTHFConfig
    from .modeling_moeut import MoEUTForCausalLM

    loaded = load_model(checkpoint)
    pad_id = None
    if loaded.tokenizer is not None:  # generate pads finished rows with it; never produced by encoding
        from .tokenization_moeut import MoEUTTokenizer
        sp = loaded.tokenizer.sp
        pad_id = sp.piece_to_id(MoEUTTokenizer.default_pad_piece(sp))
    hf_cfg = MoEUTHFConfig(moeut_config=dataclasses.asdict(loaded.config), pad_token_id=pad_id)
    MoEUTHFConfig.register_for_auto_class()
    MoEUTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    hf_model = MoEUTForCausalLM(hf_cfg)
    hf_model.model.load_state_dict(loaded.model.state_dict(), strict=True)
    if dtype:  # stored weights in another precision (the native checkpoint is fp32)
        table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        if dtype not in table:
            raise ValueError(f"dtype: use one of {sorted(table)}, got {dtype!r}")
        hf_model = hf_model.to(table[dtype])
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
    return out


def _parse(argv: List[str]) -> Dict[str, str]:
    args = {}
    for a in argv:
        if "=" not in a:
            raise SystemExit(f"expected key=value arguments (checkpoint=..., out=..., dtype=...), got {a!r}")
        k, v = a.split("=", 1)
        args[k.lstrip("+")] = v
    unknown = sorted(set(args) - {"checkpoint", "out", "dtype"})
    if unknown or "checkpoint" not in args or "out" not in args:
        raise SystemExit(f"usage: python -m moeut.hf.export checkpoint=<dir> out=<dir> [dtype=bf16|fp16|fp32]"
                         + (f" (unknown: {unknown})" if unknown else ""))
    return args


def main(argv: Optional[List[str]] = None) -> None:
    a = _parse(sys.argv[1:] if argv is None else argv)
    print(export(a["checkpoint"], a["out"], dtype=a.get("dtype")))


if __name__ == "__main__":
    main()
