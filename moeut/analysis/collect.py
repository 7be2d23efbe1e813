"""Collection of the offline routing statistics (SPEC 7.1): validation windows made by the data
pipeline (`moeut.data`), one eval-mode pass with `collect_routing=True`, accumulated by the one
routing accumulator (`moeut.analysis.routing.RoutingStats`) and stored as routing_stats.npz.

The API other analyses build on:

    windows = validation_windows(tokenizer, path, seq_len=T, max_tokens=n)   # [n_windows, T+1] int64
    arrays, meta = collect(model, model_cfg, windows, batch_size=16)         # routing_stats.npz content
    save_stats(path, arrays, meta); stats = moeut.analysis.stats.load_stats(path)
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import time
import warnings
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from ..paths import data_dir
from ..rundir import RunDir
from .routing import RoutingStats

DEFAULT_DATA = data_dir() / "books" / "valid.jsonl.gz"  # the embedded held-out books (data/README.md)
STATS_FILE = "routing_stats.npz"
DEFAULT_SEQ_LEN = 1024  # seq_len when the run has no saved config to read data.seq_len from (the paper's T)
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # precision -> autocast dtype


def validation_windows(tokenizer, path: str, *, seq_len: int, max_tokens: Optional[int] = None,
                       text_field: str = "text") -> np.ndarray:
    """The windows training validates on (SPEC 5.3, 5.5, 5.7), made by the data pipeline: the
    documents of `path` (a file or a directory of .jsonl(.gz)/.txt/.parquet/... files, read by
    `moeut.data.sources`) each encoded with DOC_SEPARATOR into a token cache in a temporary
    folder (`moeut.data.prepare_tokens`, removed afterwards), and its first `max_tokens` tokens
    (None = all) as non-overlapping windows of seq_len + 1 (`moeut.data.dataset.WindowDataset`).
    Returns int64 [n, seq_len + 1]. Raises FileNotFoundError for a missing `path`, DataError
    (ValueError) naming `data.path` and file:line for unreadable data, and ValueError naming
    `seq_len` when the text holds less than one window. Tokens left over after the last whole
    window are reported by a UserWarning naming data.path and seq_len."""
    from ..data.dataset import TokenStream, WindowDataset
    from ..data.prepare import prepare_tokens
    from ..data.sources import DataError, local_corpus
    if not os.path.exists(path):
        raise FileNotFoundError(f"data.path: {path} does not exist")
    path = os.path.abspath(path)
    budget = None if max_tokens is None else int(max_tokens) + 1  # + the last window's extra target
    try:
        corpus = local_corpus(path, "validation", text_field, valid_path=path, name="analysis")
        with tempfile.TemporaryDirectory(prefix="moeut-analysis-tokens-") as tmp:
            manifest = prepare_tokens(corpus, tokenizer, tmp, budget, num_workers=0, progress=False,
                                      log=lambda *a, **k: None)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ds = WindowDataset(TokenStream(manifest), seq_len, limit_tokens=max_tokens, warn_short=False)
                out = (ds.batch(range(len(ds))).numpy() if len(ds) else np.zeros((0, seq_len + 1), np.int64))
            n_tokens = len(ds.stream)
    except DataError as e:
        raise DataError(f"data.path: {e}") from None
    if len(out) < 1:
        raise ValueError(f"seq_len={seq_len}: the validation text has only {n_tokens} tokens, "
                         f"fewer than one window of {seq_len + 1}; lower seq_len or give more data")
    for w in caught:  # the data module names its cache folder and data.seq_len; say it in this tool's terms
        msg = str(w.message).replace(manifest.path, f"data.path={path}").replace("data.seq_len", "seq_len")
        warnings.warn(msg, w.category, stacklevel=2)
    return out


def model_dims(cfg) -> Dict[str, Any]:
    """The routing layout of a MoE model config: n_groups G, n_repeats R, n_layers, n_experts
    N_E, k, vocab_size, n_heads / att_n_experts / att_k (None without attention experts) and
    layer_order. Raises ValueError naming the missing field for a model without experts (dense)."""
    for name in ("group_size", "n_layers", "ff_n_experts", "ff_k", "vocab_size"):
        if not hasattr(cfg, name):
            raise ValueError(f"model config ({type(cfg).__name__}) has no field {name!r}: the expert "
                             f"analysis needs a MoE model (MoEUT / sigma-MoE)")
    att = getattr(cfg, "att_n_experts", None)
    return dict(n_groups=cfg.group_size, n_repeats=cfg.n_layers // cfg.group_size,
                n_layers=cfg.n_layers, n_experts=cfg.ff_n_experts, k=cfg.ff_k,
                vocab_size=cfg.vocab_size, n_heads=cfg.n_heads if att else None,
                att_n_experts=att, att_k=getattr(cfg, "att_k", None),
                layer_order=getattr(cfg, "layer_order", "abab"))


def collect(model: torch.nn.Module, model_cfg, windows: np.ndarray, *, batch_size: int,
            store_positions: int = 16384, device: str = "cpu", precision: str = "fp32",
            progress: bool = True) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """Eval-mode pass over `windows` [n, T+1] in batches of `batch_size` on `device` at
    `precision` (fp32, or bf16/fp16 autocast on CUDA); returns (arrays: `RoutingStats.arrays()`,
    partial meta: model_dims, n_windows, seq_len, n_tokens, val_ce (nats), val_ppl and the
    training-metric `summary`). Raises ValueError naming `precision` for an unknown one or
    autocast on a CPU."""
    if precision not in AUTOCAST:
        raise ValueError(f"precision: must be one of {' | '.join(AUTOCAST)}, got {precision!r}")
    dims = model_dims(model_cfg)
    acc = RoutingStats(dims["n_groups"], dims["n_repeats"], dims["n_experts"], dims["n_heads"],
                       dims["att_n_experts"], device=torch.device("cpu"), vocab_size=dims["vocab_size"],
                       store_positions=store_positions)
    dev = torch.device(device)
    amp = AUTOCAST[precision]
    if amp is not None and dev.type != "cuda":
        raise ValueError(f"precision={precision} needs a CUDA device (set device=cuda or precision=fp32)")
    model = model.to(dev).eval()
    n = len(windows)
    t0 = last = time.time()
    with torch.no_grad():
        for i in range(0, n, batch_size):
            w = torch.from_numpy(windows[i:i + batch_size]).to(dev)  # [b, T+1]
            x, y = w[:, :-1], w[:, 1:]
            with torch.autocast(dev.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                out = model(x, collect_routing=True)
            ce = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]),
                                                   y.reshape(-1), reduction="sum")
            acc.add(x, out.routing)
            acc.add_loss(float(ce), y.numel())
            done = min(i + batch_size, n)
            if progress and (done == n or time.time() - last >= 10):  # a line every 10 s and at the end
                last = time.time()
                print(f"[analysis] {done}/{n} windows, {last - t0:.1f}s", file=sys.stderr, flush=True)
    arrays = acc.arrays()
    ce = acc.loss_sum / max(acc.loss_count, 1)
    meta = dict(dims, n_windows=n, seq_len=int(windows.shape[1] - 1), n_tokens=int(acc.n_positions),
                val_ce=ce, val_ppl=math.exp(ce), summary=acc.compute())
    return arrays, meta


def save_stats(path: str, arrays: Dict[str, np.ndarray], meta: Dict[str, Any]) -> None:
    """Write routing_stats.npz: `arrays` plus `meta` as JSON ("meta_json"), compressed, to a
    temporary name and renamed (readers never see half a file)."""
    import json
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, meta_json=np.array(json.dumps(meta)), **arrays)
    os.replace(tmp, path)


def find_run_config(run_dir: str, ckpt_dir: Optional[str] = None) -> Optional[str]:
    """Path of the run's training config (`moeut.rundir.RunDir.config_path`): the checkpoint's
    resolved config.yaml, else <run>/.hydra/config.yaml; None when neither exists."""
    p = RunDir(run_dir).config_path(ckpt_dir)
    return str(p) if p is not None else None


def run_seq_len(run_dir: str, ckpt_dir: Optional[str] = None) -> Optional[int]:
    """`data.seq_len` of the run's saved training config (`RunDir.config`: the checkpoint's
    config.yaml, else .hydra/config.yaml): the context length T the model was trained at. None
    when the run has no config or it holds no positive integer there. Raises CorruptRunFile for a
    config that does not parse."""
    conf = RunDir(run_dir).config(ckpt_dir) or {}
    data = conf.get("data") if isinstance(conf.get("data"), dict) else {}
    v = data.get("seq_len")
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else None


def resolve_seq_len(seq_len: Optional[int], run_dir: str, ckpt_dir: Optional[str] = None) -> int:
    """The analysis context length T (SPEC 7.1): `seq_len` when given, else the run's training
    data.seq_len (`run_seq_len`), so perplexity and routing are measured at the length the model
    was trained at; when the run has none, DEFAULT_SEQ_LEN (1024) with a UserWarning naming
    `seq_len`."""
    if seq_len is not None:
        return int(seq_len)
    trained = run_seq_len(run_dir, ckpt_dir)
    if trained is None:
        warnings.warn(f"seq_len: null, but the run {run_dir} has no saved training config with data.seq_len; "
                      f"analysing at seq_len={DEFAULT_SEQ_LEN} (pass seq_len=<T> to choose)", stacklevel=2)
        return DEFAULT_SEQ_LEN
    return trained
