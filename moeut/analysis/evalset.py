"""What the expert analyses (sources, dynamics, knockout, depth) share: the named evaluation texts,
the checkpoint and its windows, the options every one of them takes, and the per-layer-application
labels (docs/analysis.md "Beyond the paper").

A *source* is a named evaluation text: `name:path` with path a .txt / .jsonl(.gz) file or a folder of
them, read by the training data reader (SPEC 5.1). Without `sources`, the carried held-out books
(data/books/valid.jsonl.gz) and the carried C4 sample (data/c4_sample/valid.jsonl.gz) when present.
Each source is tokenised with the checkpoint's tokenizer into non-overlapping windows of T+1 tokens
(SPEC 5.5/5.7), at most `max_tokens` tokens per source, so every source weighs the same.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..cli import check_device_available, check_out_dir, option
from ..paths import data_dir

from .collect import resolve_seq_len, validation_windows



def default_sources() -> List[str]:
    """`name:path` of the carried evaluation texts that exist: books (held-out Project Gutenberg
    books) and c4 (the C4 validation sample), from moeut.paths.data_dir()."""
    out = []
    for name, rel in (("books", "books/valid.jsonl.gz"), ("c4", "c4_sample/valid.jsonl.gz")):
        p = data_dir() / rel
        if p.is_file():
            out.append(f"{name}:{p}")
    return out


def parse_sources(specs: List[str], option_name: str = "sources") -> List[Tuple[str, str]]:
    """[(name, path)] of `name:path` entries (a bare path is named by its file name up to the first dot). Raises
    ValueError naming `option_name` for an empty list, a repeated name or a path that does not exist."""
    out: List[Tuple[str, str]] = []
    for spec in specs:
        name, sep, path = str(spec).partition(":")
        if not sep:
            path = name
            name = os.path.basename(os.path.normpath(path)).split(".")[0]
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise ValueError(f"{option_name}: {spec!r} is not name:path")
        if any(n == name for n, _ in out):
            raise ValueError(f"{option_name}: the name {name!r} is given twice")
        if not os.path.exists(path):
            raise ValueError(f"{option_name}: {name}:{path}: no such file or directory")
        out.append((name, os.path.abspath(path)))
    if not out:
        raise ValueError(f"{option_name}: no evaluation text: pass {option_name}=[name:path,...] (the carried "
                         f"data/books and data/c4_sample are missing)")
    return out


@dataclass
class EvalOptions:
    """The options every expert analysis takes (nested as the tool's top-level fields)."""

    checkpoint: str = option("???", help="run dir (newest checkpoint) or a checkpoints/step_* dir")
    sources: List[str] = option(default_factory=list, help="named evaluation texts name:path (.txt/.jsonl(.gz) "
                                "file or folder); [] = the carried books and C4 sample")
    seq_len: Optional[int] = option(None, help="window length T; null = the run's training data.seq_len", lo=1)
    max_tokens: int = option(8192, help="tokens per source (whole windows of T)", lo=1)
    batch_size: int = option(8, help="windows per forward", lo=1)
    device: str = option("auto", help="auto | cpu | cuda | cuda:N")
    out_dir: Optional[str] = option(None, help="output folder; null = <run dir>/analysis")
    formats: List[str] = option(default_factory=lambda: ["png"], help="figure formats", choices=["png", "pdf", "svg"])


def resolve_device(device: str) -> torch.device:
    """torch.device of `device` (auto = cuda when available, else cpu). Raises ValueError naming
    `device` for another spelling or a CUDA device this machine lacks."""
    check_device_available(device, "device")  # the one check of every tool (moeut.cli)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class EvalSet:
    """A loaded checkpoint and its evaluation windows: `loaded` (moeut.checkpoint.LoadedModel),
    `run_dir`, `out_dir`, `run` (name), `seq_len` T, `windows` name -> [n, T+1] int64 per source,
    `device`."""

    loaded: Any
    run_dir: str
    out_dir: str
    run: str
    seq_len: int
    windows: Dict[str, np.ndarray]
    device: torch.device

    @property
    def model(self) -> torch.nn.Module:
        """The model, in eval mode on `device`."""
        return self.loaded.model

    @property
    def names(self) -> List[str]:
        """Source names, in the order given."""
        return list(self.windows)


def check_moeut(cfg: Any) -> None:
    """Raises ValueError when the model is not a MoEUT with σ-MoE MLP experts and SwitchHead
    attention experts (the analyses read `group_size`, `n_repeats`, `ff_n_experts`, ...)."""
    if type(cfg).__name__ != "MoEUTConfig":
        raise ValueError(f"checkpoint: a {type(cfg).__name__} model; the expert analyses need a MoEUT model")
    if cfg.mlp_type != "sigma_moe":
        raise ValueError(f"checkpoint: mlp_type={cfg.mlp_type}; the expert analyses need sigma_moe MLP experts")


def open_evalset(opts: EvalOptions, checkpoint: Optional[str] = None) -> EvalSet:
    """Load the checkpoint (`opts.checkpoint`, or `checkpoint`) and tokenise every source into
    windows. Every check comes first, before any write: raises ValueError / FileNotFoundError /
    moeut.checkpoint.CheckpointError naming the option or file."""
    from ..checkpoint import load_model
    from ..rundir import run_dir_of

    dev = resolve_device(opts.device)
    check_out_dir(opts.out_dir, "out_dir")
    if not opts.formats:
        raise ValueError("formats: empty, so no figure would be written; e.g. formats=[png]")
    srcs = parse_sources(opts.sources or default_sources())
    loaded = load_model(checkpoint or opts.checkpoint)
    check_moeut(loaded.config)
    if loaded.tokenizer is None:
        raise ValueError(f"checkpoint: {loaded.path} has no tokenizer.model")
    run_dir = run_dir_of(loaded.path)
    check_out_dir(opts.out_dir or os.path.join(run_dir, "analysis"), "out_dir")  # the default too
    T = resolve_seq_len(opts.seq_len, run_dir, loaded.path)
    windows: Dict[str, np.ndarray] = {}
    for name, path in srcs:
        try:  # the windows training validates on, made by moeut.data (moeut.analysis.collect)
            windows[name] = validation_windows(loaded.tokenizer, path, seq_len=T, max_tokens=opts.max_tokens)
        except ValueError as e:
            raise ValueError(f"sources: {name}:{path}: {e}; or raise max_tokens={opts.max_tokens}") from None
    n = {k: len(v) for k, v in windows.items()}
    if len(set(n.values())) > 1:
        warnings.warn(f"sources: the sources give different numbers of windows of {T} tokens ({n}); each source's "
                      f"statistics are normalised by its own token count", stacklevel=2)
    loaded.model.to(dev).eval()
    out_dir = os.path.abspath(opts.out_dir) if opts.out_dir else os.path.join(run_dir, "analysis")
    return EvalSet(loaded=loaded, run_dir=run_dir, out_dir=out_dir, run=os.path.basename(os.path.normpath(run_dir)),
                   seq_len=T, windows=windows, device=dev)


def batches(windows: np.ndarray, batch_size: int, device: torch.device):
    """Yield (x [b, T], y [b, T]) int64 tensors on `device`: inputs and next-token targets of
    consecutive `batch_size` windows [n, T+1]."""
    for i in range(0, len(windows), batch_size):
        w = torch.from_numpy(np.ascontiguousarray(windows[i:i + batch_size])).to(device)
        yield w[:, :-1], w[:, 1:]


def layer_labels(model: torch.nn.Module) -> List[Tuple[int, int, int]]:
    """(l, g, r) of every layer application, in execution order (the model's `execution_order`)."""
    return list(model.execution_order())


def label(g: int, r: int) -> str:
    """Axis label of a layer application: unique layer g at repetition r, "g0 r1"."""
    return f"g{g} r{r}"


def save_json(path: str, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` (folder created; temporary name, then renamed)."""
    import json
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    os.replace(tmp, path)


def save_npz(path: str, **arrays: np.ndarray) -> None:
    """Write `arrays` to the compressed npz `path` (folder created; temporary name, then renamed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def save_csv(path: str, header: List[str], rows: List[List[Any]]) -> None:
    """Write a CSV table (header row, then `rows`) to `path` (folder created)."""
    import csv
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def options_record(opts: Any) -> Dict[str, Any]:
    """The tool's options as a plain dict (written next to its numbers)."""
    return dataclasses.asdict(opts)
