"""Expert-specialisation analysis of a checkpoint (SPEC §7), as one Hydra command:

    python -m moeut.analyze checkpoint=<run dir or checkpoint dir> [seq_len=T] [max_tokens=...]

`seq_len` defaults to the run's own training context length (data.seq_len of its saved config).

1. Validation pass (eval mode, no grad) with `collect_routing=True` over the run's validation text,
   tokenised with the checkpoint's own tokenizer (documents + "<STORY_SEP>", one stream,
   non-overlapping windows of T+1 tokens as in SPEC 5.5/5.7).
2. Accumulate: MLP counts per (g, r, e); sparse counts per (g, r, e, token id); attention V/O counts
   per (g, r, head, expert); the per-position Jaccard and intersection sums between repetitions;
   per-layer residual norms; the expert sets of the first `store_positions` positions.
   Stored as `<run dir>/analysis/routing_stats.npz` (+ the metadata inside it).
3. Figures F1-F6 and the training-time routing metrics from `metrics.jsonl` into
   `<run dir>/analysis/figures/` (PNG and PDF), and a one-page report (`report.md`, `report.html`).

Nothing monkey-patches the model: everything comes from the forward's RoutingRecords (SPEC 1.8).
The arrays behind each figure are computed by the NumPy functions in `moeut.analysis`.
"""
from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .analysis import stats as A
from .outputs import RoutingRecord
from .paths import clone_root, data_dir
from .routing import RoutingStats
from .rundir import RunDir, run_dir_of
from .validate import at_least, check_ranges, in_range

DEFAULT_DATA = data_dir() / "books" / "valid.jsonl.gz"  # the embedded held-out books (data/README.md)
STATS_FILE = "routing_stats.npz"
DEFAULT_SEQ_LEN = 1024  # seq_len when the run has no saved config to read data.seq_len from (the paper's T)


# ------------------------------------------------------------------------------------------
# Configuration (Hydra structured config; conf/analyze.yaml sets the defaults)
# ------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """`data` section of conf/analyze.yaml: the validation text to route (SPEC 7.1)."""
    path: Optional[str] = None  # .jsonl(.gz) / .txt / directory; None = data/books/valid.jsonl.gz in the repo
    text_field: str = "text"  # JSON field holding the document text


@dataclass
class FigureConfig:
    """`figures` section of conf/analyze.yaml: output formats, dpi and the F1-F4 options (SPEC 7.2)."""
    formats: List[str] = field(default_factory=lambda: ["png", "pdf"])
    dpi: int = field(default=120, metadata=at_least(1))
    quantile: float = field(default=0.9, metadata=in_range(0, 1))  # F1 threshold quantile (SPEC 7.2)
    f2_layers: Optional[List[int]] = field(default=None, metadata=at_least(0))  # None = every ceil(L/5)-th layer from 0 (18 layers: the paper's 0, 4, 8, 12, 16)
    f2_max_tokens: int = field(default=1000, metadata=at_least(1))
    f3_top_tokens: int = field(default=6000, metadata=at_least(1))
    f3_member: int = field(default=0, metadata=at_least(0))
    f4_members: Optional[List[int]] = field(default=None, metadata=at_least(0))  # None = every member (the paper shows g = 0)


@dataclass
class AnalyzeConfig:
    """Schema of conf/analyze.yaml (`python -m moeut.analyze`); every numeric field is range-checked
    (moeut.validate) and named in errors. See docs/analysis.md for each key."""
    checkpoint: str = "???"  # run dir (newest checkpoint) or a checkpoints/step_* dir
    out_dir: Optional[str] = None  # None = <run dir>/analysis
    tokenizer: Optional[str] = None  # None = the checkpoint's tokenizer.model
    data: DataConfig = field(default_factory=DataConfig)
    seq_len: Optional[int] = field(default=None, metadata=at_least(1))  # None = the run's data.seq_len
    batch_size: int = field(default=16, metadata=at_least(1))
    max_tokens: Optional[int] = field(default=1032192, metadata=at_least(1))  # SPEC 5.7: C4 validation size; None = all the text
    store_positions: int = field(default=16384, metadata=at_least(0))  # per-position expert sets kept for the notebooks
    device: str = "auto"  # auto / cpu / cuda / cuda:1
    dtype: str = "float32"  # float32 or bfloat16 (autocast, CUDA only)
    reuse_stats: bool = False  # redraw from an existing routing_stats.npz without running the model
    run_name: Optional[str] = None  # title prefix; None = the run dir's name
    figures: FigureConfig = field(default_factory=FigureConfig)
    report: bool = True
    execute_notebooks: bool = False  # also run analysis/*.py notebooks into <out_dir>/notebooks/


def _register_configs() -> None:
    from hydra.core.config_store import ConfigStore
    ConfigStore.instance().store(name="base_analyze", node=AnalyzeConfig)


# ------------------------------------------------------------------------------------------
# Validation data: documents -> one token stream -> windows of T+1 tokens
# ------------------------------------------------------------------------------------------


def load_texts(path: str, text_field: str = "text") -> List[str]:
    """Documents, in file order, of `path`: a file (.jsonl/.jsonl.gz/.json.gz/.jsonl.zst/.txt/.parquet)
    or a directory of such files (recursive, sorted), read by the training data reader
    (`moeut.data.sources`, SPEC 5.1) so analysis and training parse data the same way; a null
    text field reads as an empty document (dropped by `token_stream`).

    Raises FileNotFoundError when `path` does not exist, and ValueError (`DataError`) naming
    `data.path` and file:line for an unsupported file, a directory with no text files, a line
    that is not JSON or a record without `text_field`."""
    from .data.sources import DataError, FileRef, list_local_files, read_documents
    if not os.path.exists(path):
        raise FileNotFoundError(f"data.path: {path} does not exist")
    try:
        return [t for f in list_local_files(path) for t in read_documents(FileRef(f), text_field)]
    except DataError as e:
        raise DataError(f"data.path: {e}") from None


def token_stream(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """SPEC 5.3: each non-empty document + DOC_SEPARATOR encoded on its own, concatenated."""
    from .data.tokenizer import DOC_SEPARATOR
    docs = [t + DOC_SEPARATOR for t in texts if t]
    ids = [i for doc in tokenizer.encode_batch(docs) for i in doc]
    return np.asarray(ids, dtype=np.int64)


def make_windows(stream: np.ndarray, seq_len: int, max_tokens: Optional[int] = None) -> np.ndarray:
    """SPEC 5.5/5.7: window i = stream[i*T : i*T + T + 1]; n = min(len - 1, max_tokens) div T.
    Returns [n, T+1]; raises when the text is shorter than one window."""
    usable = len(stream) - 1
    if max_tokens is not None:
        usable = min(usable, int(max_tokens))
    n = usable // seq_len
    if n < 1:
        raise ValueError(f"seq_len={seq_len}: the validation text has only {len(stream)} tokens, "
                         f"fewer than one window of {seq_len + 1}; lower seq_len or give more data")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[idx]


# ------------------------------------------------------------------------------------------
# Accumulation over the validation pass
# ------------------------------------------------------------------------------------------


class _SparseCounter:
    """Counts of int64 keys, merged in bounded-memory chunks (np.unique on the concatenation)."""

    def __init__(self, flush_at: int = 1 << 22):
        self.keys = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)
        self._buf: List[Tuple[np.ndarray, np.ndarray]] = []
        self._n = 0
        self.flush_at = flush_at

    def add(self, keys: np.ndarray, counts: np.ndarray) -> None:
        """Buffer (keys [n] int64, counts [n]) pairs; coalesced once flush_at pairs are buffered."""
        self._buf.append((keys, counts))
        self._n += len(keys)
        if self._n >= self.flush_at:
            self.coalesce()

    def coalesce(self) -> None:
        """Merge the buffered pairs into the sorted unique `keys` with summed `counts`."""
        if not self._buf:
            return
        k = np.concatenate([self.keys] + [b[0] for b in self._buf])
        c = np.concatenate([self.counts] + [b[1] for b in self._buf])
        self.keys, inv = np.unique(k, return_inverse=True)
        self.counts = np.bincount(inv.reshape(-1), weights=c, minlength=len(self.keys)).astype(np.int64)
        self._buf, self._n = [], 0


class RoutingAccumulator:
    """Everything the figures need, accumulated batch by batch from RoutingRecords.

    `add(input_ids [B, T], records)`: uses each record's own (l, g, r), so "aabb" layer orders work.
    """

    def __init__(self, n_groups: int, n_repeats: int, n_experts: int, vocab_size: int,
                 n_heads: Optional[int] = None, att_n_experts: Optional[int] = None,
                 store_positions: int = 16384):
        self.G, self.R, self.NE, self.V = n_groups, n_repeats, n_experts, vocab_size
        self.L = n_groups * n_repeats
        self.stats = RoutingStats(n_groups, n_repeats, n_experts, n_heads, att_n_experts,
                                  device=torch.device("cpu"))
        self.tokens = _SparseCounter()
        self.token_freq = np.zeros(vocab_size, dtype=np.int64)
        self.jaccard_sum = np.zeros((n_groups, n_repeats, n_repeats), dtype=np.float64)
        self.inter_sum = np.zeros((n_groups, n_repeats, n_repeats), dtype=np.float64)
        self.n_positions = 0
        L = self.L
        self.in_norm_sum, self.update_norm_sum = np.zeros(L), np.zeros(L)
        self.rel_update_sum, self.abs_cos_sum = np.zeros(L), np.zeros(L)
        self.norm_count = np.zeros(L, dtype=np.int64)
        self.layer_g = np.full(L, -1, dtype=np.int64)
        self.layer_r = np.full(L, -1, dtype=np.int64)
        self.store_positions = store_positions
        self._sets: List[np.ndarray] = []  # [n, L, K] per batch, until store_positions are kept
        self._set_tokens: List[np.ndarray] = []
        self._n_stored = 0
        self.k: Optional[int] = None
        self.loss_sum, self.loss_count = 0.0, 0

    @torch.no_grad()
    def add(self, input_ids: torch.Tensor, records: Sequence[RoutingRecord]) -> None:
        """Accumulate one batch: input_ids [B, T] and the model's routing records (one per layer,
        SPEC 1.8) into the SPEC 7.1 statistics. Raises ValueError when `records` is empty (no
        collect_routing=True, or not a MoE model)."""
        if not records:
            raise ValueError("RoutingAccumulator.add: the model returned no routing records "
                             "(was collect_routing=True passed? is this a MoE model?)")
        B, T = input_ids.shape
        # Heavy work (unique keys, one-hot overlaps) runs on the records' device (the GPU in a real
        # pass); only reduced results travel to the host.
        dev = next((r.mlp_idx.device for r in records if r.mlp_idx is not None), input_ids.device)
        ids_dev = input_ids.reshape(-1).to(dev, torch.int64)  # [N], N = B*T positions
        ids = ids_dev.cpu()
        if int(ids.max()) >= self.V or int(ids.min()) < 0:
            raise ValueError(f"input ids outside 0..{self.V - 1}")
        self.stats.update(records)
        self.token_freq += np.bincount(ids.numpy(), minlength=self.V)
        by_l = sorted(records, key=lambda rec: rec.l)
        if len(by_l) != self.L or [r.l for r in by_l] != list(range(self.L)):
            raise ValueError(f"expected one routing record per absolute layer 0..{self.L - 1}, got "
                             f"layers {[r.l for r in by_l]}")
        per_member: Dict[int, Dict[int, torch.Tensor]] = {}
        keys = []
        for rec in by_l:
            self.layer_g[rec.l], self.layer_r[rec.l] = rec.g, rec.r
            if rec.mlp_idx is None:
                raise ValueError(f"routing record l={rec.l} has no mlp_idx")
            idx = rec.mlp_idx.reshape(B * T, -1).to(dev, torch.int64)  # [N, K]
            if self.k is None:
                self.k = idx.shape[1]
            per_member.setdefault(rec.g, {})[rec.r] = idx
            # flat key ((g*R + r)*N_E + e)*V + v: one sparse counter for N[g, r, e, v]
            base = (rec.g * self.R + rec.r) * self.NE
            keys.append(((base + idx) * self.V + ids_dev[:, None]).reshape(-1))
            self._add_norms(rec, B * T)
        uk, uc = torch.unique(torch.cat(keys), return_counts=True)
        self.tokens.add(uk.cpu().numpy(), uc.cpu().numpy().astype(np.int64))
        for g, reps in per_member.items():
            if len(reps) != self.R:
                raise ValueError(f"member g={g} has {len(reps)} applications, expected R={self.R}")
            s = torch.stack([reps[r] for r in range(self.R)], 1)  # [N, R, K]
            self._add_overlaps(g, s)
        self.n_positions += B * T
        if self._n_stored < self.store_positions:
            n = min(B * T, self.store_positions - self._n_stored)
            s_all = torch.stack([per_member[r.g][r.r][:n] for r in by_l], 1)  # [n, L, K]
            dt = np.int16 if self.NE < 32768 else np.int32
            self._sets.append(s_all.cpu().numpy().astype(dt))
            self._set_tokens.append(ids[:n].numpy().astype(np.int32))
            self._n_stored += n

    def _add_overlaps(self, g: int, s: torch.Tensor) -> None:
        """Intersections of the K-sets of every pair of repetitions, per position, through one-hot
        matmuls (chunked so that [chunk, R, N_E] stays small): J = |A∩B| / (2K - |A∩B|)."""
        N, R, K = s.shape
        chunk = max(1, (1 << (24 if s.is_cuda else 22)) // (R * self.NE))
        for i in range(0, N, chunk):
            part = s[i:i + chunk]  # [n, R, K]
            onehot = torch.zeros(part.shape[0], R, self.NE, device=s.device)
            onehot.scatter_(2, part, 1.0)  # [n, R, N_E]
            # 0/1 inputs and sums <= K: exact in fp32, also with TF32 matmuls on GPU
            inter = torch.bmm(onehot, onehot.transpose(1, 2)).double()  # [n, R, R]
            self.inter_sum[g] += inter.sum(0).cpu().numpy()
            self.jaccard_sum[g] += (inter / (2 * K - inter)).sum(0).cpu().numpy()

    def _add_norms(self, rec: RoutingRecord, n: int) -> None:
        if rec.in_norm is None or rec.update_norm is None:
            return
        x_in = rec.in_norm.reshape(-1).double().cpu()
        upd = rec.update_norm.reshape(-1).double().cpu()
        self.in_norm_sum[rec.l] += float(x_in.sum())
        self.update_norm_sum[rec.l] += float(upd.sum())
        self.rel_update_sum[rec.l] += float((upd / x_in.clamp_min(1e-12)).sum())
        if rec.cos_in_out is not None:
            self.abs_cos_sum[rec.l] += float(rec.cos_in_out.reshape(-1).double().abs().sum())
        self.norm_count[rec.l] += n

    def add_loss(self, ce_sum: float, n_targets: int) -> None:
        """Add a batch's summed cross-entropy (nats) over `n_targets` tokens (for the perplexity)."""
        self.loss_sum += ce_sum
        self.loss_count += n_targets

    def arrays(self) -> Dict[str, np.ndarray]:
        """Everything as NumPy arrays (the content of routing_stats.npz, minus "meta_json")."""
        self.tokens.coalesce()
        tec = A.TokenExpertCounts.from_keys(self.tokens.keys, self.tokens.counts, (self.G, self.R, self.NE, self.V))
        c = self.stats.counts_numpy()
        small = lambda x, n: x.astype(np.int16 if n < 32768 else np.int32)  # noqa: E731
        out = {
            "mlp_counts": c["mlp_counts"],
            "token_freq": self.token_freq,
            "tok_g": small(tec.g, self.G), "tok_r": small(tec.r, self.R), "tok_e": small(tec.e, self.NE),
            "tok_v": small(tec.v, self.V), "tok_count": tec.count,
            "jaccard_sum": self.jaccard_sum, "intersection_sum": self.inter_sum,
            "n_positions": np.array(self.n_positions, dtype=np.int64),
            "in_norm_sum": self.in_norm_sum, "update_norm_sum": self.update_norm_sum,
            "rel_update_sum": self.rel_update_sum, "abs_cos_sum": self.abs_cos_sum,
            "norm_count": self.norm_count, "layer_g": self.layer_g, "layer_r": self.layer_r,
            "gate_min_sum": c["gate_min_sum"], "gate_max_sum": c["gate_max_sum"], "gate_n": c["gate_n"],
            "sets": (np.concatenate(self._sets) if self._sets
                     else np.zeros((0, self.L, self.k or 0), dtype=np.int16)),
            "set_tokens": (np.concatenate(self._set_tokens) if self._set_tokens else np.zeros(0, np.int32)),
        }
        if "att_v_counts" in c:
            out["att_v_counts"] = c["att_v_counts"]
            out["att_o_counts"] = c["att_o_counts"]
        return out


def save_stats(path: str, arrays: Dict[str, np.ndarray], meta: Dict[str, Any]) -> None:
    """Compressed npz, written to a temporary name and renamed (readers never see half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, meta_json=np.array(json.dumps(meta)), **arrays)
    os.replace(tmp, path)


def _model_dims(cfg) -> Dict[str, Any]:
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
            store_positions: int = 16384, device: str = "cpu", dtype: str = "float32",
            progress: bool = True) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """Eval-mode pass over `windows` [n, T+1]; returns (arrays, partial meta)."""
    dims = _model_dims(model_cfg)
    acc = RoutingAccumulator(dims["n_groups"], dims["n_repeats"], dims["n_experts"], dims["vocab_size"],
                             dims["n_heads"], dims["att_n_experts"], store_positions)
    dev = torch.device(device)
    model = model.to(dev).eval()
    use_amp = dtype == "bfloat16"
    if use_amp and dev.type != "cuda":
        raise ValueError("dtype=bfloat16 needs a CUDA device (set device=cuda or dtype=float32)")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype: {dtype!r} is not one of float32, bfloat16")
    n = len(windows)
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, n, batch_size):
            w = torch.from_numpy(windows[i:i + batch_size]).to(dev)  # [b, T+1]
            x, y = w[:, :-1], w[:, 1:]
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
                out = model(x, collect_routing=True)
            ce = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]),
                                                   y.reshape(-1), reduction="sum")
            acc.add(x, out.routing)
            acc.add_loss(float(ce), y.numel())
            if progress:
                done = min(i + batch_size, n)
                print(f"[analyze] {done}/{n} windows, {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
    arrays = acc.arrays()
    ce = acc.loss_sum / max(acc.loss_count, 1)
    meta = dict(dims, n_windows=n, seq_len=int(windows.shape[1] - 1), n_tokens=int(acc.n_positions),
                val_ce=ce, val_ppl=math.exp(ce), summary=acc.stats.compute())
    return arrays, meta


# ------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------

# Fixed figure sizes in inches (PNG pixels = size * dpi; no tight bbox so sizes are predictable).
FIGSIZES = {
    "f1": (9.0, 4.5), "f2": (7.0, 4.5), "f3": (10.0, 4.5), "f4": (5.5, 4.5),
    "f5": (7.0, 4.0), "f6": (11.0, 6.0), "metrics_panel": (4.0, 3.0),
}


@dataclass
class FigureInfo:
    """One written figure: file stem `name`, `title`, one-sentence `caption`, `figsize` in inches, and
    the written `files` (one per format)."""
    name: str
    title: str
    caption: str  # one sentence on how to read it
    figsize: Tuple[float, float]
    files: List[str] = field(default_factory=list)


def _fig(kind: str, figsize=None):
    from matplotlib.figure import Figure
    return Figure(figsize=figsize or FIGSIZES[kind], layout="constrained")


def _layer_label(l: int) -> str:
    return f"layer {l + 1}"  # 1-based absolute layer, as the authors' plots (SPEC 7.1)


def plot_f1(stats: Dict[str, Any], g: int, run: str, quantile: float = 0.9, normalised: bool = False):
    """F1 (SPEC 7.2): expert x layer usage P[r, e] of member `g`, experts ordered by the
    `quantile` centre of mass (`normalised` ordering variant); returns the Figure."""
    meta = stats["meta"]
    c = stats["mlp_counts"][g]  # [R, N_E]
    p = A.expert_layer_usage(c)
    order, _ = A.com_order(p, quantile, normalised)
    fig = _fig("f1")
    ax = fig.add_subplot()
    im = ax.imshow(p[:, order], aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    R = meta["n_repeats"]
    layers = _layers_of_member(stats, g)
    ax.set_yticks(range(R))
    ax.set_yticklabels([_layer_label(l) for l in layers])
    ax.set_xlabel(f"expert rank (sorted by {'normalised ' if normalised else ''}thresholded centre of mass)")
    ax.set_ylabel("layer (repetition of member g)")
    ax.set_title(f"{run}: MLP expert usage by layer, g={g}" + (" (normalised order)" if normalised else ""))
    fig.colorbar(im, ax=ax, label="share of the expert's selections P[r, e]")
    return fig


def _layers_of_member(stats, g: int) -> List[int]:
    lg, lr = stats["layer_g"], stats["layer_r"]
    R = stats["meta"]["n_repeats"]
    out = []
    for r in range(R):
        hit = np.nonzero((lg == g) & (lr == r))[0]
        out.append(int(hit[0]) if len(hit) else r * stats["meta"]["n_groups"] + g)
    return out


def f2_layers(stats, layers: Optional[Sequence[int]]) -> List[int]:
    """The absolute 0-based layers F2 draws: `layers`, or by default at most 5 layers spread over
    the depth, every ceil(n_layers / 5)-th from 0: the paper's 0, 4, 8, 12, 16 for its 18 (and
    16-20) layers, every layer of a model with up to 5 (e.g. 0, 1, 2, 3 for the 4-layer default
    models). Raises ValueError naming figures.f2_layers for a layer outside 0..n_layers-1."""
    L = stats["meta"]["n_layers"]
    if layers is None:
        return list(range(0, L, max(1, math.ceil(L / 5))))
    bad = [l for l in layers if not 0 <= l < L]
    if bad:
        raise ValueError(f"figures.f2_layers: {bad} outside 0..{L - 1}")
    return list(layers)


def plot_f2(stats, run: str, layers: Optional[Sequence[int]] = None, max_tokens: int = 1000):
    """F2 (SPEC 7.2): distinct experts per token id at each of `f2_layers`, token ids sorted by
    count, the first `max_tokens`; returns the Figure."""
    tec = A.token_counts_from_stats(stats)
    fig = _fig("f2")
    ax = fig.add_subplot()
    for l in f2_layers(stats, layers):
        g, r = int(stats["layer_g"][l]), int(stats["layer_r"][l])
        curve = A.f2_curve(A.distinct_experts_per_token(tec, g, r), max_tokens)
        ax.plot(np.arange(len(curve)), curve, label=_layer_label(l).capitalize())
    ax.set_xlabel(f"token rank (ascending #experts; first {max_tokens} token ids)")
    ax.set_ylabel("# distinct experts used by the token id")
    ax.set_title(f"{run}: distinct MLP experts per token id")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def plot_f3(stats, run: str, member: int = 0, n_top: int = 6000):
    """F3 (SPEC 7.2): per-layer share [R, n_top] of each of the `n_top` most frequent tokens'
    expert set, for group member `member`; returns the Figure."""
    tec = A.token_counts_from_stats(stats)
    top = A.top_tokens(stats["token_freq"], n_top)
    img = A.layer_share_of_token_set(tec, member, top)  # [R, n]
    fig = _fig("f3")
    ax = fig.add_subplot()
    im = ax.imshow(img, aspect="auto", interpolation="nearest", cmap="magma", vmin=0, vmax=1)
    ax.set_yticks(range(img.shape[0]))
    ax.set_yticklabels([_layer_label(l) for l in _layers_of_member(stats, member)])
    ax.set_xlabel(f"token id, by descending frequency ({len(top)} most frequent)")
    ax.set_ylabel(f"layer (member g={member})")
    ax.set_title(f"{run}: share of each token's expert set used per layer, g={member}")
    fig.colorbar(im, ax=ax, label="|experts at layer| / |experts over all layers|")
    return fig


def plot_f4(stats, run: str, g: int = 0):
    """F4 (SPEC 7.2): mean per-token Jaccard overlap [R, R] of expert sets between the layers of
    member `g`; returns the Figure."""
    j = A.jaccard_from_sums(stats["jaccard_sum"][g], int(stats["n_positions"]))
    fig = _fig("f4")
    ax = fig.add_subplot()
    im = ax.imshow(j, interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    labels = [_layer_label(l) for l in _layers_of_member(stats, g)]
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels)
    ax.set_title(f"{run}: per-token expert-set Jaccard, g={g}")
    fig.colorbar(im, ax=ax, label="mean Jaccard |A∩B| / |A∪B|")
    return fig


def plot_f5(stats, run: str, which: str, metrics_rows: Optional[List[dict]] = None):
    """which = "update" (mean ||x_out - x_in||) or "in_norm" (mean ||x_in||)."""
    key, train_prefix, ylabel = {
        "update": ("update_norm_sum", "activation_norm/abs_update_layer_", "mean ‖x_out − x_in‖₂"),
        "in_norm": ("in_norm_sum", "activation_norm/in_layer_", "mean ‖x_in‖₂"),
    }[which]
    vals = A.layer_means(stats[key], stats["norm_count"])
    fig = _fig("f5")
    ax = fig.add_subplot()
    L = len(vals)
    if np.isfinite(vals).any():
        ax.plot(np.arange(1, L + 1), vals, "o-", label="validation pass (this analysis)")
    if metrics_rows:
        logged = A.final_layer_values(metrics_rows, train_prefix)
        if logged:
            ls = sorted(logged)
            ax.plot([l + 1 for l in ls], [logged[l] for l in ls], "s--", label="training log (last value)")
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{run}: {'update magnitude' if which == 'update' else 'residual norm'} per layer")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no norms recorded (model returned no in_norm/update_norm)",
                ha="center", va="center", transform=ax.transAxes)
    return fig


def plot_f6(stats, run: str, g: int, gate: str):
    """F6 (SPEC 7.2): attention expert usage per head of member `g`'s `gate` ("v" or "o"),
    counts [R, H, E_att] as per-head layer x expert maps; returns the Figure."""
    from matplotlib.ticker import MaxNLocator
    counts = stats[f"att_{gate}_counts"][g]  # [R, H, E_att]
    R, H, E = counts.shape
    fig = _fig("f6")
    gs = fig.add_gridspec(2, H)
    layers = _layers_of_member(stats, g)
    vmax = max(int(counts.max()), 1)
    im = None
    for h in range(H):
        ax = fig.add_subplot(gs[0, h])
        im = ax.imshow(counts[:, h, :], aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(f"head {h}")
        ax.set_xlabel("expert")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_yticks(range(R))
        ax.set_yticklabels([_layer_label(l) for l in layers] if h == 0 else [])
    fig.colorbar(im, ax=fig.axes[:H], label="selections (raw counts)")
    tot = A.att_sorted_totals(counts)  # [H, E]
    ax = fig.add_subplot(gs[1, :])
    width = 0.8 / H
    for h in range(H):
        ax.bar(np.arange(E) + h * width, tot[h], width=width,
               label=f"head {h} (min {tot[h].min()}, max {tot[h].max()})")
    ax.set_xlabel("expert rank within head (most used first)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("selections over all layers")
    ax.legend(fontsize="small")
    ppl = A.att_usage_rel_ppl(counts)
    fig.suptitle(f"{run}: attention {gate.upper()}-gate expert usage, g={g} (usage rel. ppl {ppl:.3f})")
    return fig


def _metric_panels(series: Dict[str, Tuple[np.ndarray, np.ndarray]]) -> Dict[str, Dict[str, Tuple]]:
    """Group keys "moe/g{g}/{name}" (and "moe/{name}") into panels by name; lines by member."""
    panels: Dict[str, Dict[str, Tuple]] = {}
    for key, sv in series.items():
        parts = key.split("/")
        if len(parts) >= 3 and parts[1].startswith("g") and parts[1][1:].isdigit():
            name, line = "/".join(parts[2:]), parts[1]
            if name.startswith("sel_overlap_l"):
                name, line = "sel_overlap", f"{parts[1]} l{name[len('sel_overlap_l'):]}"
        else:
            name, line = "/".join(parts[1:]), "all"
        panels.setdefault(name, {})[line] = sv
    return panels


def plot_training_metrics(rows: List[dict], run: str, prefix: str = "moe/"):
    """Every `prefix` key of metrics.jsonl `rows` against the step (SPEC 7.3), grouped into panels;
    returns the Figure, or None when no such key was logged."""
    series = A.metric_series(rows, prefix)
    if not series:
        return None
    panels = _metric_panels(series)
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    pw, ph = FIGSIZES["metrics_panel"]
    fig = _fig("metrics_panel", figsize=(pw * ncol, ph * nrow + 0.5))
    for i, (name, lines) in enumerate(sorted(panels.items())):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        for line, (steps, vals) in sorted(lines.items()):
            ax.plot(steps, vals, label=line)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize="x-small")
    fig.suptitle(f"{run}: training-time routing metrics ({prefix}* in metrics.jsonl)")
    return fig


CAPTIONS = {
    "f1": "Each column is one expert's selections spread over the layers where member g is applied "
          "(columns sum to 1); experts are sorted by the authors' thresholded centre of mass, so a "
          "diagonal band means experts specialise to layers, while bright full columns are experts "
          "shared by many layers.",
    "f1n": "The same matrix sorted by the true centre of mass of each expert's above-threshold mass "
           "(our normalised variant); a cleaner diagonal means stronger layer specialisation.",
    "f2": "For each shown layer, token ids (those seen in the data, first 1000 in ascending order) "
          "against the number of distinct experts they selected there; higher curves mean the "
          "expert choice depends on context rather than on the token alone.",
    "f3": "For the most frequent tokens (columns, most frequent first), the fraction of the token's "
          "whole expert set (over all repetitions of the member) that each layer uses; values near "
          "1 mean the layer uses most of the token's experts, low values mean layer-specific subsets.",
    "f4": "Mean per-token Jaccard overlap between the expert sets chosen at two repetitions of the "
          "same member; the diagonal is 1, and bright off-diagonal cells mean a token reuses the same "
          "experts in those layers.",
    "f5u": "Mean norm of the residual update each layer writes (‖x_out − x_in‖); growth towards the "
           "output means later layers make larger changes.",
    "f5n": "Mean norm of the residual stream entering each layer (‖x_in‖); with peri-LN it grows "
           "with depth because the residual itself is never normalised.",
    "f6": "Top: selections of each attention expert per layer and head (raw counts); bottom: each "
          "head's experts sorted by total use, with min and max in the legend; a flat bar profile "
          "means balanced expert use.",
    "metrics": "Routing metrics logged during training against the step: usage relative perplexity "
               "(1 = uniform), dead-expert fraction, universal score (how similar the layers' expert "
               "usage is) and the overlap with the previous application of the same member.",
}


def draw_all(stats: Dict[str, Any], fig_dir: str, *, run: str, fcfg: FigureConfig,
             metrics_rows: Optional[List[dict]] = None) -> List[FigureInfo]:
    """Draw every figure into `fig_dir` (PNG + PDF); returns what was written, in report order."""
    os.makedirs(fig_dir, exist_ok=True)
    meta = stats["meta"]
    G = meta["n_groups"]
    infos: List[FigureInfo] = []

    def save(fig, name, title, caption):
        if fig is None:
            return
        info = FigureInfo(name, title, caption, tuple(float(x) for x in fig.get_size_inches()))
        for fmt in fcfg.formats:
            path = os.path.join(fig_dir, f"{name}.{fmt}")
            fig.savefig(path, dpi=fcfg.dpi, format=fmt)
            info.files.append(os.path.relpath(path, os.path.dirname(fig_dir)))
        infos.append(info)

    for g in range(G):
        save(plot_f1(stats, g, run, fcfg.quantile, False), f"f1_expert_layer_g{g}",
             f"F1: MLP expert usage by layer (g={g})", CAPTIONS["f1"])
        save(plot_f1(stats, g, run, fcfg.quantile, True), f"f1_expert_layer_g{g}_normalised",
             f"F1 (normalised ordering, g={g})", CAPTIONS["f1n"])
    save(plot_f2(stats, run, fcfg.f2_layers, fcfg.f2_max_tokens), "f2_expert_count_per_token_per_layer",
         "F2: distinct experts per token id", CAPTIONS["f2"])
    if not 0 <= fcfg.f3_member < G:
        raise ValueError(f"figures.f3_member: {fcfg.f3_member} outside 0..{G - 1}")
    save(plot_f3(stats, run, fcfg.f3_member, fcfg.f3_top_tokens), "f3_experts_per_token_per_layer",
         "F3: per-layer share of a token's expert set", CAPTIONS["f3"])
    for g in (fcfg.f4_members if fcfg.f4_members is not None else range(G)):
        if not 0 <= g < G:
            raise ValueError(f"figures.f4_members: {g} outside 0..{G - 1}")
        save(plot_f4(stats, run, g), f"f4_layer_similarity_g{g}", f"F4: expert-set overlap between layers (g={g})",
             CAPTIONS["f4"])
    save(plot_f5(stats, run, "update", metrics_rows), "f5_update_magnitude", "F5: update magnitude", CAPTIONS["f5u"])
    save(plot_f5(stats, run, "in_norm", metrics_rows), "f5_in_norm", "F5: residual norm", CAPTIONS["f5n"])
    if "att_v_counts" in stats:
        for g in range(G):
            for gate in ("v", "o"):
                save(plot_f6(stats, run, g, gate), f"f6_att_{gate}_g{g}",
                     f"F6: attention {gate.upper()} expert usage (g={g})", CAPTIONS["f6"])
    if metrics_rows:
        save(plot_training_metrics(metrics_rows, run), "training_routing_metrics",
             "Training-time routing metrics", CAPTIONS["metrics"])
    with open(os.path.join(fig_dir, "index.json"), "w") as f:
        json.dump({"dpi": fcfg.dpi, "figures": [dataclasses.asdict(i) for i in infos]}, f, indent=1)
    return infos


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------


def training_validation(metrics_rows: Optional[Sequence[dict]], run_dir: str,
                        ckpt_dir: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The run's own last validation during training, for the report to set beside the analysis's:
    {"step", "perplexity" (`validation/val/perplexity` of metrics.jsonl), "tokens" (the predicted
    tokens it averaged over, `validation/val/tokens`; None in older logs), "valid_tokens",
    "valid_path", "seq_len" (`data.*` of the run's saved config; None when absent)}; None when
    metrics.jsonl logged no validation."""
    last = None
    for row in metrics_rows or []:
        v = row.get("validation/val/perplexity")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            n = row.get("validation/val/tokens")
            last = (row.get("step"), float(v), int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) else None)
    if last is None:
        return None
    conf = RunDir(run_dir).config(ckpt_dir) or {}
    data = conf.get("data") if isinstance(conf.get("data"), dict) else {}
    return {"step": last[0], "perplexity": last[1], "tokens": last[2], "valid_tokens": data.get("valid_tokens"),
            "valid_path": data.get("valid_path") or data.get("path"), "seq_len": data.get("seq_len")}


def _summary_rows(meta: Dict[str, Any], training: Optional[Dict[str, Any]] = None) -> List[Tuple[str, str]]:
    n_tok = meta.get("n_tokens")
    rows = [("checkpoint", str(meta.get("checkpoint"))), ("step", str(meta.get("step"))),
            ("validation data", str(meta.get("data_path"))),
            ("tokens analysed", f"{n_tok:,} predicted tokens ({meta.get('n_windows')} windows of {meta.get('seq_len')})"
             if isinstance(n_tok, int) else str(n_tok)),
            ("validation perplexity", f"{meta['val_ppl']:.2f} over the {n_tok:,} tokens above" if
             meta.get("val_ppl") is not None and isinstance(n_tok, int) else "n/a")]
    if training is not None:
        budget, T, counted = training.get("valid_tokens"), training.get("seq_len"), training.get("tokens")
        if counted is not None:  # logged by training: exact
            same = counted == n_tok
            size = f"{counted:,} predicted tokens (data.valid_tokens={budget})"
        else:  # older logs: training predicts the tokens of its valid_tokens // T windows of T (SPEC 5.7)
            same = isinstance(budget, int) and isinstance(T, int) and T > 0 and budget // T * T == n_tok
            size = f"data.valid_tokens={budget:,}" if isinstance(budget, int) else "data.valid_tokens=null (the whole split)"
        vpath = training.get("valid_path")
        same_file = bool(vpath) and os.path.abspath(str(vpath)) == os.path.abspath(str(meta.get("data_path")))
        same_T = not isinstance(T, int) or T == meta.get("seq_len")
        diffs = ([] if same_file else ["another file"]) + ([] if same else ["another number of tokens"]) + \
            ([] if same_T else [f"another window length ({T})"])
        note = ("the same file and as many tokens as here" if not diffs else
                f"{' and '.join(diffs)} than here, so the two perplexities differ; data.path={vpath} "
                f"max_tokens={budget if isinstance(budget, int) else 'null'}{'' if same_T else f' seq_len={T}'} "
                f"measures the same windows")
        rows.append(("training's validation perplexity",
                     f"{training['perplexity']:.2f} at step {training.get('step')} (metrics.jsonl "
                     f"validation/val/perplexity) over the run's {size} of {training.get('valid_path')}: {note}"))
    rows.append(("G, R, N_E, K", f"{meta['n_groups']}, {meta['n_repeats']}, {meta['n_experts']}, {meta['k']}"))
    for k, v in sorted((meta.get("summary") or {}).items()):
        rows.append((k, f"{v:.4f}"))
    return rows


def write_report(out_dir: str, infos: List[FigureInfo], meta: Dict[str, Any], run: str,
                 training: Optional[Dict[str, Any]] = None) -> Tuple[str, str]:
    """report.md and report.html in `out_dir`, embedding the PNGs with one sentence under each.
    The summary gives the validation perplexity with its token count and, when `training`
    (`training_validation`) is given, the run's own last validation perplexity with its token
    budget and whether the two measured the same number of tokens."""
    rows = _summary_rows(meta, training)
    md = [f"# Expert-specialisation analysis: {run}", "",
          "Generated by `python -m moeut.analyze` (SPEC §7). Layers are 1-based absolute layers.", "",
          "| quantity | value |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in rows]
    md.append("")
    for i in infos:
        png = next((f for f in i.files if f.endswith(".png")), i.files[0])
        md += [f"## {i.title}", "", f"![{i.title}]({png})", "", i.caption, ""]
    md_path = os.path.join(out_dir, "report.md")
    with open(md_path, "w") as f:
        f.write("\n".join(md))
    e = html.escape
    body = [f"<h1>Expert-specialisation analysis: {e(run)}</h1>",
            "<p>Generated by <code>python -m moeut.analyze</code> (SPEC §7). Layers are 1-based absolute layers.</p>",
            "<table border='1' cellpadding='3'>"] + \
           [f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in rows] + ["</table>"]
    for i in infos:
        png = next((f for f in i.files if f.endswith(".png")), i.files[0])
        body += [f"<h2>{e(i.title)}</h2>", f"<img src='{e(png)}' style='max-width:100%'>", f"<p>{e(i.caption)}</p>"]
    html_path = os.path.join(out_dir, "report.html")
    with open(html_path, "w") as f:
        f.write("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + e(run) +
                "</title></head><body style='font-family:sans-serif;max-width:1000px'>" + "\n".join(body) +
                "</body></html>")
    return md_path, html_path


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------


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


def check_inputs(cfg: AnalyzeConfig) -> AnalysisInputs:
    """Every check of the options and inputs of `run_analysis`, before any work or write: option
    ranges (named), the checkpoint (loaded), the tokenizer, the validation text and that it holds
    one window of seq_len + 1 tokens. Raises ValueError / FileNotFoundError (or the package's
    named subclasses: CheckpointError, CorruptRunFile) naming the option, file or line."""
    from .checkpoint import load_model, resolve_checkpoint
    if not cfg.checkpoint or cfg.checkpoint == "???":
        raise ValueError("checkpoint: give a run dir or checkpoint dir (checkpoint=<path>)")
    check_ranges(cfg)  # every numeric option against its declared range, named (moeut.validate)
    if not os.path.exists(cfg.checkpoint):
        raise FileNotFoundError(f"checkpoint={cfg.checkpoint}: no such file or directory")
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
    inp = AnalysisInputs(ckpt=ckpt, run_dir=run_dir, out_dir=out_dir, stats_path=os.path.join(out_dir, STATS_FILE),
                         run=cfg.run_name or os.path.basename(run_dir))
    if cfg.reuse_stats and os.path.isfile(inp.stats_path):
        return inp
    if loaded is None:  # reuse_stats=true but no statistics yet
        loaded = load_model(cfg.checkpoint)
        inp.ckpt = loaded.path
    tok = loaded.tokenizer
    if cfg.tokenizer:
        from .data.tokenizer import Tokenizer
        tok = Tokenizer.load(cfg.tokenizer)
    if tok is None:
        raise ValueError(f"checkpoint {inp.ckpt} has no tokenizer.model; pass tokenizer=<path to .model>")
    if tok.vocab_size != loaded.config.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} pieces, model vocab_size is {loaded.config.vocab_size}")
    _model_dims(loaded.config)  # a model without experts (dense) is refused here, before any work
    inp.loaded, inp.tokenizer = loaded, tok
    inp.seq_len = resolve_seq_len(cfg.seq_len, run_dir, inp.ckpt)
    inp.data_path = os.path.abspath(cfg.data.path) if cfg.data.path else str(DEFAULT_DATA)
    stream = token_stream(tok, load_texts(inp.data_path, cfg.data.text_field))
    inp.windows = make_windows(stream, inp.seq_len, cfg.max_tokens)
    return inp


def run_analysis(cfg: AnalyzeConfig, inputs: Optional[AnalysisInputs] = None) -> Dict[str, Any]:
    """The whole suite; returns {"out_dir", "stats", "figures", "report_md", "report_html"}.
    `inputs` is `check_inputs(cfg)` (computed here when not given); its errors come before any
    file is written."""
    inp = inputs if inputs is not None else check_inputs(cfg)
    ckpt, run_dir, out_dir, stats_path, run = inp.ckpt, inp.run_dir, inp.out_dir, inp.stats_path, inp.run
    os.makedirs(out_dir, exist_ok=True)

    if inp.windows is None:  # check_inputs found the statistics to reuse
        print(f"[analyze] reusing {stats_path}", file=sys.stderr)
    else:
        if cfg.reuse_stats:
            print(f"[analyze] reuse_stats=true but {stats_path} does not exist: computing it", file=sys.stderr)
        loaded, tok, data_path = inp.loaded, inp.tokenizer, inp.data_path
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        arrays, meta = collect(loaded.model, loaded.config, inp.windows, batch_size=cfg.batch_size,
                               store_positions=cfg.store_positions, device=device, dtype=cfg.dtype)
        meta.update(checkpoint=ckpt, run_dir=run_dir, run_name=run, step=loaded.meta.get("step"),
                    data_path=data_path, tokenizer_sha256=tok.sha256,
                    model_config=dataclasses.asdict(loaded.config),
                    run_config=find_run_config(run_dir, ckpt))
        save_stats(stats_path, arrays, meta)
        try:
            from omegaconf import OmegaConf
            used = dataclasses.replace(cfg, seq_len=inp.seq_len)  # the T actually analysed
            OmegaConf.save(OmegaConf.structured(used), os.path.join(out_dir, "analyze_config.yaml"))
        except Exception as err:  # the analysis itself is done; the record of its config is a nicety
            print(f"[analyze] could not save analyze_config.yaml: {err}", file=sys.stderr)
    stats = A.load_stats(stats_path)
    rd = RunDir(run_dir)  # metrics.jsonl under moeut.rundir's corrupt-line policy
    rows = rd.metrics() if rd.has_metrics() else None
    infos = draw_all(stats, os.path.join(out_dir, "figures"), run=run, fcfg=cfg.figures, metrics_rows=rows)
    result = {"out_dir": out_dir, "stats": stats_path, "figures": infos}
    if cfg.report:
        result["report_md"], result["report_html"] = write_report(
            out_dir, infos, stats["meta"], run, training_validation(rows, run_dir, ckpt))
    if cfg.execute_notebooks:
        result["notebooks"] = execute_notebooks(run_dir, os.path.join(out_dir, "notebooks"))
    print(f"[analyze] wrote {len(infos)} figures and the report to {out_dir}", file=sys.stderr)
    return result


def is_notebook_source(path: str) -> bool:
    """A jupytext percent-format notebook source: a `# ---` YAML header holding a `jupytext:`
    section (what `jupytext --sync` writes). Plain scripts next to the notebooks
    (analysis/compare.py, analysis/plot_curves.py) have none."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(2000)
    except OSError:
        return False
    if not head.startswith("# ---\n"):
        return False
    header = head.split("\n# ---\n", 1)[0]
    return "\n# jupyter:" in header and "\n#   jupytext:" in header


def notebook_sources(folder: Optional[str] = None) -> List[str]:
    """The notebooks among `folder`/*.py (default: the repository's analysis/), sorted."""
    clone = clone_root()
    if not folder and clone is None:
        raise FileNotFoundError("execute_notebooks: the notebooks ship with the repository (analysis/), not with "
                                "an installed wheel; run from a clone")
    folder = Path(folder) if folder else clone / "analysis"
    if not folder.is_dir():
        raise FileNotFoundError(f"execute_notebooks: notebook folder {folder} does not exist (the notebooks ship "
                                f"with the repository, not with an installed wheel)")
    found = sorted(str(p) for p in folder.glob("*.py") if is_notebook_source(str(p)))
    if not found:
        raise FileNotFoundError(f"execute_notebooks: no jupytext notebook sources in {folder}")
    return found


def execute_notebooks(run_dir: str, out_dir: str, sources: Optional[Sequence[str]] = None,
                      timeout: int = 600) -> List[str]:
    """Execute the jupytext notebooks (`notebook_sources()`: analysis/*.py with a jupytext header,
    never the plain scripts there) headless with nbclient against `run_dir` (passed as
    MOEUT_RUN_DIR); executed copies are written to `out_dir` as .ipynb. Raises ValueError for a
    given source that is not a notebook, and nbclient's CellExecutionError for a failing cell."""
    import jupytext
    import nbclient
    srcs = list(sources) if sources else notebook_sources()
    not_nb = [s for s in srcs if not is_notebook_source(s)]
    if not_nb:
        raise ValueError(f"execute_notebooks: not jupytext notebook sources: {not_nb}")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    old = os.environ.get("MOEUT_RUN_DIR")
    os.environ["MOEUT_RUN_DIR"] = os.path.abspath(run_dir)
    try:
        for src in srcs:
            nb = jupytext.read(src)
            nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                    resources={"metadata": {"path": str(Path(src).parent)}}).execute()
            dst = os.path.join(out_dir, Path(src).stem + ".ipynb")
            jupytext.write(nb, dst)
            written.append(dst)
    finally:
        if old is None:
            os.environ.pop("MOEUT_RUN_DIR", None)
        else:
            os.environ["MOEUT_RUN_DIR"] = old
    return written


def main() -> None:
    """`python -m moeut.analyze checkpoint=<run dir> [key=value ...]` (conf/analyze.yaml): run_analysis.
    Bad configuration or input (an option out of range, a missing checkpoint or data file, a
    damaged run-dir file named file:line: `check_inputs`) is one line `moeut.analyze: error: ...`
    and exit status 1 (moeut.cli); an error during the analysis itself keeps its traceback."""
    import hydra
    from omegaconf import OmegaConf

    from .cli import CONF_DIR, bad_input_exits, one_line_hydra_errors

    _register_configs()

    @one_line_hydra_errors("moeut.analyze")
    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="analyze")
    def _main(cfg) -> None:
        with bad_input_exits("moeut.analyze"):
            if OmegaConf.is_missing(cfg, "checkpoint"):
                raise ValueError("checkpoint: required: give a run dir or checkpoint dir (checkpoint=<path>)")
            acfg = OmegaConf.to_object(cfg)
            inputs = check_inputs(acfg)
        run_analysis(acfg, inputs)

    _main()


if __name__ == "__main__":
    main()
