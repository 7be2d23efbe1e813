"""Export a MoEUT checkpoint as a Hugging Face model directory.

    python -m moeut.hf.export checkpoint=<run dir or checkpoint dir> out=<dir> [dtype=bf16|fp16|fp32]

A typed tool (moeut.cli.typed_tool: options in `HFExportOptions`, `--help` generated from it);
`export()` is the library call.

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
from dataclasses import dataclass
from typing import Optional

import torch

from ..checkpoint import check_checkpoint_path
from ..cli import PRECISIONS, REQUIRED, check_out_dir, option, typed_tool

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def export(checkpoint: str, out: str, *, dtype: Optional[str] = None) -> str:
    """Write the Hugging Face model directory `out` for a MoEUT checkpoint; returns `out`.

    `checkpoint`: a run dir (its newest valid checkpoint) or a checkpoints/step_XXXXXXX dir.
    `dtype`: precision of the stored weights, "bf16" | "fp16" | "fp32" (None: fp32, as stored
    natively). The exported model gives the native model's logits (tests/unit/eval/test_hf_export.py).
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


@dataclass
class HFExportOptions:
    """The options of `python -m moeut.hf.export` (`--help` is generated from them)."""
    checkpoint: str = option(REQUIRED, help="run dir (its newest valid checkpoint) or a checkpoints/step_XXXXXXX dir")
    out: str = option(REQUIRED, help="directory to write (created if absent; files of an earlier export are replaced)")
    dtype: Optional[str] = option(None, help="stored weight precision; null = fp32, as the native checkpoint",
                                  choices=[None, *PRECISIONS])


def check_checkpoint(opts: HFExportOptions) -> None:
    """The checks before any work: raises FileNotFoundError `checkpoint=...` when the checkpoint
    path does not exist, ValueError `checkpoint: <path> is a file, not a run or checkpoint
    directory` for a file outside a checkpoint, ValueError `out: <path> is a file, not a directory`."""
    if not os.path.exists(opts.checkpoint):
        raise FileNotFoundError(f"checkpoint={opts.checkpoint}: no such file or directory "
                                "(pass a run dir or a checkpoints/step_XXXXXXX dir)")
    check_checkpoint_path(opts.checkpoint, "checkpoint")
    check_out_dir(opts.out, "out")


def run(opts: HFExportOptions) -> str:
    """Export as `opts` asks (checkpoint, out, dtype); returns `out`. Raises FileNotFoundError
    `checkpoint=...` when the checkpoint path does not exist (before anything is written)."""
    check_checkpoint(opts)
    return export(opts.checkpoint, opts.out, dtype=opts.dtype)


def _main(opts: HFExportOptions) -> None:
    """Export and print the output directory; a missing checkpoint is one line, exit 1."""
    from ..cli import bad_input_exits
    with bad_input_exits("moeut.hf.export"):
        check_checkpoint(opts)
    print(run(opts))


main = typed_tool(
    "moeut.hf.export", HFExportOptions,
    summary="Export a MoEUT checkpoint as a Hugging Face model directory: config.json (with auto_map),\n"
            "model.safetensors, the modelling code, tokenizer.model + tokenizer_config.json and\n"
            "moeut_export.json (provenance). Prints the output directory. See docs/evaluation.md.",
    usage="python -m moeut.hf.export checkpoint=<dir> out=<dir> [dtype=bf16|fp16|fp32]   (also moeut-hf-export)",
    notes="Load the export with\n"
          "  AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)\n"
          "  AutoTokenizer.from_pretrained(out, trust_remote_code=True)",
)(_main)


if __name__ == "__main__":
    main()
