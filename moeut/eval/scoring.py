"""Paper-parity zero-shot scorer (SPEC 6.1): batched teacher-forced log-probabilities.

Rules implemented here, for every task:
- No BOS is ever prepended, so the first token of a sequence is never scored: one forward over n
  tokens gives n - 1 next-token log-probabilities.
- Every option is its own full sequence (no prefix sharing). Sequences are sorted by length,
  longest first, and right-padded to the longest of their batch (rounded up to a multiple of
  `pad_multiple`; the paper's code used 128, which on BLiMP's 10-20-token sentences is ~10x the
  work for the same scores). Right padding is safe because the model is causal: a padded position
  can never influence an earlier one, and padded positions are never read back. A score does not
  depend on the padding or on its batch-mates (tests/unit/eval/test_eval_scoring.py); the model is called
  in one place, `Scorer._forward`, which also receives the real length of every row.
- All scored positions of a batch are gathered at once (one device-to-host copy per batch, not
  one per sequence).
- Log-probabilities are computed in float64 (x[t] - logsumexp(x) of the upcast logits of the
  scored positions only, in chunks of bounded size, so memory stays O(chunk x V)).
- The model runs in eval mode under torch.no_grad(); bf16 autocast on CUDA.

The engine only needs `model(input_ids[B, T], attention_mask=[B, T]) -> object with .logits
[B, T, V]` (1 = real token, 0 = padding; moeut.outputs "Padding contract") (LMOutput, or a
Hugging Face CausalLMOutput), so it works for MoEUT, the baselines and the HF export alike.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Hashable, List, Optional, Sequence

import torch
import torch.nn.functional as F

PROGRESS_EVERY_S = 30.0  # progress line interval when stderr is not a terminal

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency
    tqdm = None


@dataclass
class ScoreRequest:
    """One sequence to score. Tokens at positions score_from..n-1 are scored (score_from >= 1)."""

    ids: List[int]
    score_from: int
    item: Hashable = None  # the caller's key (not used for batching: scores do not depend on batch-mates)
    want_argmax: bool = False  # also return the argmax prediction at every position 0..n-2


@dataclass
class ScoreResult:
    """The score of one `ScoreRequest` (SPEC 6.1): log-probabilities in nats, float64."""

    logprob: float  # float64 sum of log P(tok_p | tok_<p) over the scored positions
    n_scored: int  # number of scored tokens (n - score_from)
    greedy: bool  # every scored token is the model's argmax at its position
    token_logprobs: List[float] = field(default_factory=list)  # per scored token, float64
    argmax: Optional[List[int]] = None  # argmax next-token prediction at positions 0..n-2


def make_request(context_ids: Sequence[int], continuation_ids: Sequence[int], item: Hashable = None,
                 want_argmax: bool = False) -> ScoreRequest:
    """Context and continuation are tokenised separately by the caller and concatenated here
    (SPEC 6.1). The continuation starts at c = len(context); with an empty context the first
    continuation token is unscored, because there is no BOS to condition it on."""
    ids = [int(i) for i in context_ids] + [int(i) for i in continuation_ids]
    return ScoreRequest(ids=ids, score_from=max(len(context_ids), 1), item=item, want_argmax=want_argmax)


def resolve_device(device: Optional[str] = None) -> torch.device:
    """None / "auto" = cuda when torch sees a GPU, else cpu. A named CUDA device on a machine
    without one is a ValueError naming the option (not torch's "not compiled with CUDA")."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} asked for but torch sees no CUDA GPU; use device=auto or device=cpu")
    return dev


def resolve_autocast_dtype(dtype: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for `dtype` = auto | fp32 | bf16 | fp16 (the one spelling of precision,
    moeut.cli.PRECISIONS): None / 'auto' = bf16 on CUDA (the paper evaluates under bf16
    autocast), none on CPU; fp32 = none. Raises ValueError naming `dtype` for any other value."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else None
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype: must be one of auto | fp32 | bf16 | fp16, got {dtype!r}")
    return table[dtype]


def _logits_of(out: Any) -> torch.Tensor:
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise TypeError("the model must return an object with .logits of shape [B, T, V] "
                        f"(got {type(out).__name__})")
    return logits


class Scorer:
    """Batched log-likelihood engine over any causal LM following the package's model interface."""

    def __init__(self, model: torch.nn.Module, *, device: Optional[str] = None, batch_size: int = 16,
                 pad_multiple: int = 1, dtype: Optional[str] = "auto", max_length: Optional[int] = None,
                 pad_id: int = 0, progress: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        if pad_multiple < 1:
            raise ValueError(f"pad_multiple: must be >= 1, got {pad_multiple}")
        self.device = resolve_device(device)
        self.model = model.to(self.device)  # score() switches to eval mode and restores the mode after
        self.batch_size = batch_size
        self.pad_multiple = pad_multiple
        self.autocast_dtype = resolve_autocast_dtype(dtype, self.device)
        self.max_length = max_length
        self.pad_id = pad_id
        self.progress = progress

    # ---------------------------------------------------------------------------------------
    def _truncate(self, r: ScoreRequest) -> ScoreRequest:
        """Left-truncate an over-long sequence, keeping every scored token and one token of
        context before it (as lm-eval does). Only used when max_length is set."""
        if self.max_length is None or len(r.ids) <= self.max_length:
            return r
        n_scored = len(r.ids) - r.score_from
        if n_scored + 1 > self.max_length:
            raise ValueError(f"a continuation of {n_scored} tokens does not fit in max_length="
                             f"{self.max_length}")
        if r.want_argmax:
            raise ValueError(f"a sequence of {len(r.ids)} tokens exceeds max_length={self.max_length} "
                             "and asks for per-position argmax (LAMBADA): raise max_length")
        cut = len(r.ids) - self.max_length
        return ScoreRequest(ids=r.ids[cut:], score_from=r.score_from - cut, item=r.item)

    def _batches(self, requests: List[ScoreRequest]) -> List[List[int]]:
        """Indices of requests grouped into batches: all requests sorted by length, longest first
        (ties by index), `batch_size` per batch. Sorting single sequences rather than whole items
        keeps the padding per batch minimal; a score does not depend on its batch-mates, so the
        paper's item grouping is not needed for parity (tests/unit/eval/test_eval_scoring.py checks it)."""
        order = sorted(range(len(requests)), key=lambda i: (-len(requests[i].ids), i))
        return [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]

    @torch.no_grad()
    def score(self, requests: Sequence[ScoreRequest], desc: str = "scoring") -> List[ScoreResult]:
        """One `ScoreResult` per request, in request order (SPEC 6.1: no BOS, float64 log-probs,
        padding-independent). `desc` labels the progress bar. Raises ValueError for a score_from
        outside 1..len(ids), or for a request longer than max_length that asks for argmax."""
        requests = [self._truncate(r) for r in requests]
        for k, r in enumerate(requests):
            if r.score_from < 1 or r.score_from > len(r.ids):
                raise ValueError(f"request {k}: score_from={r.score_from} outside 1..{len(r.ids)} "
                                 "(the first token is never scored)")
        results: List[Optional[ScoreResult]] = [None] * len(requests)
        batches = self._batches(list(requests))
        it = batches
        # a bar only on a terminal; in a log file (not a TTY) a plain line every PROGRESS_EVERY_S
        # seconds instead of tqdm's `\r` frames
        bar = self.progress and tqdm is not None and sys.stderr.isatty()
        if bar:
            it = tqdm(batches, desc=desc, unit="batch", leave=False)
        lines, t_last = self.progress and not bar, time.time()
        was_training = self.model.training
        self.model.eval()
        try:
            for k, batch in enumerate(it):
                self._score_batch([requests[i] for i in batch], batch, results)
                if lines and time.time() - t_last >= PROGRESS_EVERY_S:
                    t_last = time.time()
                    print(f"[eval] {desc}: {k + 1}/{len(batches)} batches", file=sys.stderr, flush=True)
        finally:
            self.model.train(was_training)
        return results  # type: ignore[return-value]

    def _forward(self, ids_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        """The one place the model is called: logits [B, T, V] of right-padded ids [B, T];
        lengths_B [B] = real tokens per row (positions >= length are padding)."""
        ctx = (torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
               if self.autocast_dtype is not None else contextlib.nullcontext())
        # 1 = real token (HF attention_mask): padding takes no expert capacity and enters no routing
        # statistics (moeut.outputs "Padding contract"); an all-ones mask runs the unpadded path.
        mask_BT = (torch.arange(ids_BT.shape[1], device=ids_BT.device)[None, :] < lengths_B[:, None]).long()
        with ctx:
            out = self.model(ids_BT, attention_mask=mask_BT)
        return _logits_of(out)

    # Scored rows upcast to float64 at once. On CPU a chunk that fits in the cache (2^19 float64
    # = 4 MiB) is ~4x faster than one big [rows, V] buffer; on a GPU larger chunks mean fewer
    # kernel launches (2^26 = 512 MiB). Either way memory is bounded whatever B, T or V.
    _CHUNK_ELEMENTS = {"cpu": 1 << 19}
    _CHUNK_ELEMENTS_OTHER = 1 << 26

    def _score_batch(self, reqs: List[ScoreRequest], idx: List[int], results: List) -> None:
        """One forward for the batch, then every scored position of every row in one gather
        (no per-sequence device round trips): logits at position p predict token p + 1, so
        rows c-1..n-2 of a sequence predict its scored tokens c..n-1."""
        B = len(reqs)
        n_max = max(len(r.ids) for r in reqs)
        t_pad = int(math.ceil(n_max / self.pad_multiple) * self.pad_multiple)
        ids_BT = torch.full((B, t_pad), self.pad_id, dtype=torch.long)
        score_BT = torch.zeros((B, t_pad), dtype=torch.bool)  # position p predicts a scored token
        for b, r in enumerate(reqs):
            ids_BT[b, :len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)
            score_BT[b, r.score_from - 1:len(r.ids) - 1] = True
        lengths_B = torch.tensor([len(r.ids) for r in reqs], dtype=torch.long)
        ids_BT = ids_BT.to(self.device)
        logits_BTV = self._forward(ids_BT, lengths_B.to(self.device))

        pos_b, pos_t = score_BT.nonzero(as_tuple=True)  # row-major: per sequence, in order
        pos_b, pos_t = pos_b.to(self.device), pos_t.to(self.device)
        targets_N = ids_BT[pos_b, pos_t + 1]
        V = logits_BTV.shape[-1]
        chunk = max(1, self._CHUNK_ELEMENTS.get(self.device.type, self._CHUNK_ELEMENTS_OTHER) // V)
        tok_lp, hit = [], []
        for s in range(0, pos_b.numel(), chunk):
            rows_NV = logits_BTV[pos_b[s:s + chunk], pos_t[s:s + chunk]]
            tgt_N = targets_N[s:s + chunk]
            rows64_NV = rows_NV.double()
            # log_softmax(x)[t] = x[t] - logsumexp(x), in float64 (SPEC 6.1)
            tok_lp.append(rows64_NV.gather(-1, tgt_N[:, None])[:, 0] - torch.logsumexp(rows64_NV, dim=-1))
            hit.append(rows_NV.argmax(-1) == tgt_N)  # the upcast is exact: same argmax
        tok_lp_N = torch.cat(tok_lp).cpu().tolist() if tok_lp else []
        hit_N = torch.cat(hit).cpu().tolist() if hit else []
        argmax_BT = None
        if any(r.want_argmax for r in reqs):
            argmax_BT = logits_BTV.argmax(-1).cpu()  # an upcast would not change the argmax
        k = 0
        for b, r in enumerate(reqs):
            n, c = len(r.ids), r.score_from
            lp = tok_lp_N[k:k + n - c]
            greedy = all(hit_N[k:k + n - c])
            k += n - c
            argmax = argmax_BT[b, :n - 1].tolist() if r.want_argmax else None
            results[idx[b]] = ScoreResult(logprob=math.fsum(lp), n_scored=n - c, greedy=greedy,
                                          token_logprobs=lp, argmax=argmax)


# -------------------------------------------------------------------------------------------
# Multiple choice (SPEC 6.1)
# -------------------------------------------------------------------------------------------

@dataclass
class MCItem:
    """One multiple-choice item (SPEC 6.1): `context` (may be "") and the `options` are tokenised
    separately; `gold` indexes `options`; `group` is the accuracy group (paradigm, CBT type, ...)."""

    context: str  # may be "" (BLiMP: whole sentences, no context)
    options: List[str]
    gold: int
    group: str = "all"
    id: Any = None


def option_scores(results: Sequence[ScoreResult], normalize: bool) -> List[float]:
    """Sum of continuation log-probs, divided by the number of continuation *tokens* if
    normalising. An option with no scored token scores 0 (it cannot be normalised)."""
    out = []
    for r in results:
        if normalize:
            out.append(r.logprob / r.n_scored if r.n_scored > 0 else 0.0)
        else:
            out.append(r.logprob)
    return out


def is_correct(scores: Sequence[float], gold: int) -> bool:
    """Strictly greater than every distractor: ties count as wrong (SPEC 6.1)."""
    return all(scores[gold] > s for j, s in enumerate(scores) if j != gold)


def evaluate_multiple_choice(items: Sequence[MCItem], scorer: Scorer, tokenizer, *, normalize: bool,
                             desc: str = "multiple choice", keep_items: bool = False) -> Dict[str, Any]:
    """Score every option of every item; accuracy per group, group_average and seq_average."""
    requests: List[ScoreRequest] = []
    spans = []
    for k, it in enumerate(items):
        if not 0 <= it.gold < len(it.options):
            raise ValueError(f"item {it.id!r}: gold index {it.gold} outside 0..{len(it.options) - 1}")
        ctx_ids = tokenizer.encode(it.context) if it.context else []
        start = len(requests)
        for opt in it.options:
            requests.append(make_request(ctx_ids, tokenizer.encode(opt), item=k))
        spans.append((start, len(requests)))
    results = scorer.score(requests, desc=desc)
    groups: Dict[str, Dict[str, int]] = {}
    per_item = []
    for it, (s, e) in zip(items, spans):
        scores = option_scores(results[s:e], normalize)
        ok = is_correct(scores, it.gold)
        g = groups.setdefault(it.group, {"n_ok": 0, "n_total": 0})
        g["n_ok"] += int(ok)
        g["n_total"] += 1
        if keep_items:
            per_item.append({"id": it.id, "group": it.group, "gold": it.gold, "scores": scores,
                             "correct": ok})
    return summarize_groups(groups, per_item if keep_items else None)


def summarize_groups(groups: Dict[str, Dict[str, int]], per_item=None) -> Dict[str, Any]:
    """SPEC 6.1 aggregates of {group: {"n_ok", "n_total"}}: adds each group's `accuracy` (in place)
    and returns {group_average (mean of group accuracies), seq_average (pooled), n_items, groups
    [, items]}; NaN where there is nothing to average."""
    for g in groups.values():
        g["accuracy"] = g["n_ok"] / g["n_total"] if g["n_total"] else float("nan")
    n_ok = sum(g["n_ok"] for g in groups.values())
    n_total = sum(g["n_total"] for g in groups.values())
    out: Dict[str, Any] = {
        "group_average": (sum(g["accuracy"] for g in groups.values()) / len(groups)) if groups else float("nan"),
        "seq_average": n_ok / n_total if n_total else float("nan"),
        "n_items": n_total,
        "groups": groups,
    }
    if per_item is not None:
        out["items"] = per_item
    return out
