"""`python -m moeut.analysis routing checkpoint=<run dir> [key=value ...]`: the expert analysis
of one checkpoint (SPEC §7), typed by `RoutingOptions`.

1. `check_inputs`: every option and input checked (checkpoint loaded, tokenizer, validation
   windows made by `moeut.data`) before anything is written.
2. `collect`: one eval-mode pass with `collect_routing=True`, accumulated by the one routing
   accumulator, stored as `<out_dir>/routing_stats.npz` (+ `analyze_config.yaml`).
3. `draw_all` and `write_report`: F1-F6 and the training-metric figure into `<out_dir>/figures/`,
   and report.md / report.html; with execute_notebooks=true the notebooks of analysis/.

Nothing monkey-patches the model: everything comes from the forward's RoutingRecords (SPEC 1.8).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from ..cli import REQUIRED, check_device_available, check_options, check_out_dir, option, typed_tool
from ..rundir import RunDir, run_dir_of
from . import stats as A
from .collect import (DEFAULT_DATA, STATS_FILE, collect, find_run_config, model_dims, resolve_seq_len, save_stats,
                      validation_windows)

APP = "moeut.analysis routing"


@dataclass
class DataOptions:
    """`data.*` options: the validation text to route (SPEC 7.1)."""
    path: Optional[str] = option(None, help="validation text: a .jsonl(.gz)/.txt/... file or a directory "
                                            "(read like training data); null = data/books/valid.jsonl.gz")
    text_field: str = option("text", help="JSON field holding the document text")


@dataclass
class FigureOptions:
    """`figures.*` options: output formats, resolution and the F1-F4 choices (SPEC 7.2)."""
    formats: List[str] = option(default_factory=lambda: ["png", "pdf"], help="figure file formats",
                                choices=("png", "pdf", "svg"))
    dpi: int = option(120, help="resolution of the written figures, dots per inch", lo=1)
    quantile: float = option(0.9, help="F1 threshold quantile of the centre-of-mass ordering", lo=0, hi=1)
    f2_layers: Optional[List[int]] = option(None, help="0-based layers F2 draws; null = every ceil(L/5)-th "
                                                       "layer from 0 (the paper's 0,4,8,12,16 for 18 layers)", lo=0)
    f2_max_tokens: int = option(1000, help="token ids F2 draws (ascending #experts)", lo=1)
    f3_top_tokens: int = option(6000, help="most frequent tokens F3 draws", lo=1)
    f3_member: int = option(0, help="group member g of F3", lo=0)
    f4_members: Optional[List[int]] = option(None, help="group members F4 draws; null = every member", lo=0)


@dataclass
class RoutingOptions:
    """Options of `python -m moeut.analysis routing` (every range and choice is checked and named)."""
    checkpoint: str = option(REQUIRED, help="run dir (its newest readable checkpoint) or a checkpoints/step_* dir")
    out_dir: Optional[str] = option(None, help="output folder; null = <run dir>/analysis")
    tokenizer: Optional[str] = option(None, help="SentencePiece .model; null = the checkpoint's tokenizer.model")
    data: DataOptions = field(default_factory=DataOptions)
    seq_len: Optional[int] = option(None, help="window length T; null = the run's training data.seq_len", lo=1)
    batch_size: int = option(16, help="windows per forward pass", lo=1)
    max_tokens: Optional[int] = option(1032192, help="predicted tokens analysed (SPEC 5.7: the C4 validation "
                                                     "size); null = all the text", lo=1)
    store_positions: int = option(16384, help="per-position expert sets kept for the notebooks", lo=0)
    device: str = option("auto", help="auto | cpu | cuda | cuda:N (auto = cuda when available)")
    precision: str = option("fp32", help="forward precision (bf16/fp16: autocast, CUDA only)",
                            choices=("fp32", "bf16", "fp16"))
    reuse_stats: bool = option(False, help="redraw from an existing routing_stats.npz without running the model")
    run_name: Optional[str] = option(None, help="title prefix; null = the run dir's name")
    figures: FigureOptions = field(default_factory=FigureOptions)
    report: bool = option(True, help="write report.md and report.html")
    execute_notebooks: bool = option(False, help="also run the analysis/*.py notebooks into <out_dir>/notebooks/")


@dataclass
class AnalysisInputs:
    """What `check_inputs` established before anything is written: the checkpoint and run dir,
    output paths, and (unless the saved statistics are reused) the loaded model, the tokenizer,
    the validation data path, the resolved seq_len T and the token windows [n, T+1]."""
    ckpt: str
    run_dir: str
    out_dir: str
    stats_path: str
    run: str
    loaded: Any = None
    tokenizer: Any = None
    data_path: Optional[str] = None
    seq_len: Optional[int] = None
    windows: Optional[np.ndarray] = None


def resolve_device(device: str) -> str:
    """`auto` -> cuda when available, else cpu; cpu, cuda and cuda:N as given. Raises ValueError
    naming `device` for any other spelling or a GPU this machine lacks (moeut.cli.check_device_available)."""
    check_device_available(device, "device")
    if device == "auto":
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_inputs(cfg: RoutingOptions) -> AnalysisInputs:
    """Every check of the options and inputs of `run_analysis`, before any work or write: option
    ranges and choices (named), the device (a GPU when it names cuda), out_dir can be a directory,
    the notebooks exist (execute_notebooks=true), the checkpoint (loaded), the tokenizer, the validation text and
    that it holds one window of seq_len + 1 tokens. Raises ValueError / FileNotFoundError (or the
    package's named subclasses: CheckpointError, CorruptRunFile, DataError) naming the option,
    file or line."""
    from ..checkpoint import load_model, resolve_checkpoint
    if not cfg.checkpoint or cfg.checkpoint == REQUIRED:
        raise ValueError("checkpoint: required: give a run dir or checkpoint dir (checkpoint=<path>)")
    check_options(cfg)
    resolve_device(cfg.device)
    if not os.path.exists(cfg.checkpoint):
        raise FileNotFoundError(f"checkpoint={cfg.checkpoint}: no such file or directory")
    check_out_dir(cfg.out_dir, "out_dir")
    if cfg.execute_notebooks:  # from an installed wheel: refused here, before anything is drawn
        from .notebooks import notebook_sources
        notebook_sources()
    if not cfg.figures.formats:
        raise ValueError("figures.formats: empty, so no figure (and no report) would be written; "
                         "e.g. figures.formats=[png]")
    # A run dir means its newest readable checkpoint; unreadable ones are skipped with a warning
    # naming the file (moeut.checkpoint.open_checkpoint). Redrawing needs only the run dir.
    loaded = None
    if cfg.reuse_stats:
        ckpt = resolve_checkpoint(cfg.checkpoint)
    else:
        loaded = load_model(cfg.checkpoint)
        ckpt = loaded.path
    run_dir = run_dir_of(ckpt)
    out_dir = os.path.abspath(cfg.out_dir) if cfg.out_dir else os.path.join(run_dir, "analysis")
    check_out_dir(out_dir, "out_dir")  # the default <run dir>/analysis too
    inp = AnalysisInputs(ckpt=ckpt, run_dir=run_dir, out_dir=out_dir, stats_path=os.path.join(out_dir, STATS_FILE),
                         run=cfg.run_name or os.path.basename(run_dir))
    if cfg.reuse_stats and os.path.isfile(inp.stats_path):
        return inp
    if loaded is None:  # reuse_stats=true but no statistics yet
        loaded = load_model(cfg.checkpoint)
        inp.ckpt = loaded.path
    tok = loaded.tokenizer
    if cfg.tokenizer:
        from ..data.tokenizer import Tokenizer
        tok = Tokenizer.load(cfg.tokenizer)
    if tok is None:
        raise ValueError(f"checkpoint {inp.ckpt} has no tokenizer.model; pass tokenizer=<path to .model>")
    if tok.vocab_size != loaded.config.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} pieces, model vocab_size is {loaded.config.vocab_size}")
    model_dims(loaded.config)  # a model without experts (dense) is refused here, before any work
    inp.loaded, inp.tokenizer = loaded, tok
    inp.seq_len = resolve_seq_len(cfg.seq_len, run_dir, inp.ckpt)
    inp.data_path = os.path.abspath(cfg.data.path) if cfg.data.path else str(DEFAULT_DATA)
    inp.windows = validation_windows(tok, inp.data_path, seq_len=inp.seq_len, max_tokens=cfg.max_tokens,
                                     text_field=cfg.data.text_field)
    return inp


def run_analysis(cfg: RoutingOptions, inputs: Optional[AnalysisInputs] = None) -> Dict[str, Any]:
    """The whole suite; returns {"out_dir", "stats", "figures", "report_md", "report_html"}
    (+ "notebooks"). `inputs` is `check_inputs(cfg)` (computed here when not given); its errors
    come before any file is written."""
    from .figures import draw_all
    from .report import training_validation, write_report
    inp = inputs if inputs is not None else check_inputs(cfg)
    ckpt, run_dir, out_dir, stats_path, run = inp.ckpt, inp.run_dir, inp.out_dir, inp.stats_path, inp.run
    os.makedirs(out_dir, exist_ok=True)

    if inp.windows is None:  # check_inputs found the statistics to reuse
        print(f"[analysis] reusing {stats_path}", file=sys.stderr)
    else:
        if cfg.reuse_stats:
            print(f"[analysis] reuse_stats=true but {stats_path} does not exist: computing it", file=sys.stderr)
        loaded, tok = inp.loaded, inp.tokenizer
        arrays, meta = collect(loaded.model, loaded.config, inp.windows, batch_size=cfg.batch_size,
                               store_positions=cfg.store_positions, device=resolve_device(cfg.device),
                               precision=cfg.precision)
        meta.update(checkpoint=ckpt, run_dir=run_dir, run_name=run, step=loaded.meta.get("step"),
                    data_path=inp.data_path, tokenizer_sha256=tok.sha256,
                    model_config=dataclasses.asdict(loaded.config),
                    run_config=find_run_config(run_dir, ckpt))
        save_stats(stats_path, arrays, meta)
        try:
            from omegaconf import OmegaConf
            used = dataclasses.replace(cfg, seq_len=inp.seq_len)  # the T actually analysed
            OmegaConf.save(OmegaConf.structured(used), os.path.join(out_dir, "analyze_config.yaml"))
        except Exception as err:  # the analysis itself is done; the record of its config is a nicety
            print(f"[analysis] could not save analyze_config.yaml: {err}", file=sys.stderr)
    stats = A.load_stats(stats_path)
    rd = RunDir(run_dir)  # metrics.jsonl under moeut.rundir's corrupt-line policy
    rows = rd.metrics() if rd.has_metrics() else None
    infos = draw_all(stats, os.path.join(out_dir, "figures"), run=run, fcfg=cfg.figures, metrics_rows=rows)
    result: Dict[str, Any] = {"out_dir": out_dir, "stats": stats_path, "figures": infos}
    if cfg.report:
        result["report_md"], result["report_html"] = write_report(
            out_dir, infos, stats["meta"], run, training_validation(rows, run_dir, ckpt))
    if cfg.execute_notebooks:
        from .notebooks import execute_notebooks
        result["notebooks"] = execute_notebooks(run_dir, os.path.join(out_dir, "notebooks"))
    print(f"[analysis] wrote {len(infos)} figures and the report to {out_dir}", file=sys.stderr)
    return result


def _work(cfg: RoutingOptions) -> Dict[str, Any]:
    from ..cli import bad_input_exits
    with bad_input_exits(APP):
        inputs = check_inputs(cfg)
    return run_analysis(cfg, inputs)


main = typed_tool(
    APP, RoutingOptions,
    summary="Expert-specialisation analysis of a MoE checkpoint (SPEC 7): a validation pass with routing "
            "records, routing_stats.npz, figures F1-F6, the training-metric figure and report.md/report.html.",
    usage="python -m moeut.analysis routing checkpoint=<run dir or checkpoint dir> [key=value ...]",
    notes="Writes into <run dir>/analysis/ (or out_dir=). docs/analysis.md describes every output.",
)(_work)
