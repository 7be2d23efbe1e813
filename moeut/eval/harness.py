"""lm-evaluation-harness adapter: `lm_eval --model moeut --model_args checkpoint=<run dir>`.

This is the secondary evaluation path (SPEC 6.5); the paper-parity numbers come from
`python -m moeut.evaluate`. What the adapter does, and where it differs from lm-eval's defaults:

- Context and continuation are tokenised separately and concatenated (SPEC 6.1). lm-eval's
  `TemplateLM` encodes them jointly and splits, which can move the boundary token.
- No BOS/prefix token: with an empty context the first continuation token is not scored
  (lm-eval's default would prepend a prefix token and score every token).
- Scores come from the same engine as the paper scorer (float64, right padding, eval mode,
  bf16 autocast on CUDA), so an lm-eval `acc` choice equals our unnormalised choice item by item,
  except for ties, which lm-eval gives to the first option while the paper counts them as wrong.
- `loglikelihood_rolling` scores every token but the first, in windows of `max_length` tokens,
  each window with as much preceding context as fits.
- `generate_until` is greedy (KV-cached `model.generate` when the model has one).

Registration happens on import of this module. lm-eval's CLI does not import it, hence the
wrapper `python -m moeut.eval.harness_cli ...` (same arguments as `lm_eval`).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import lm_eval.models  # noqa: F401  (fills the registry first: get_model only lazy-loads built-ins
import torch             # when the registry is empty, so registering "moeut" alone would hide "hf")
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .scoring import ScoreRequest, Scorer, make_request

log = logging.getLogger(__name__)


def _to_int(value, default: int) -> int:
    if value is None or value == "" or (isinstance(value, str) and value.startswith("auto")):
        return default
    return int(value)


@register_model("moeut")
class MoEUTHarnessLM(LM):
    """lm-eval `LM` "moeut" over a MoEUT/baseline checkpoint or an in-process model (SPEC 6.5).

    `checkpoint`: a run or checkpoint directory (`moeut.checkpoint.load_model`), or pass `model=`
    and `tokenizer=` (or `tokenizer_path=`). batch_size, max_length (tokens per scored window),
    pad_multiple, max_gen_toks and progress accept lm-eval's string values ("auto" = default);
    unknown model_args are logged and ignored. Raises ValueError when there is no checkpoint/model,
    no tokenizer, or the tokenizer's vocabulary size differs from the model's.
    """

    def __init__(self, checkpoint: Optional[str] = None, *, model: Optional[torch.nn.Module] = None,
                 tokenizer=None, tokenizer_path: Optional[str] = None, device: Optional[str] = "auto",
                 batch_size: Any = 16, dtype: str = "auto", max_length: Any = 1024,
                 pad_multiple: Any = 1, max_gen_toks: Any = 256, progress: Any = False, **unused):
        super().__init__()
        if unused:
            log.warning("moeut adapter: ignoring unknown model_args %s", sorted(unused))
        if model is None:
            if not checkpoint:
                raise ValueError("moeut adapter: pass model_args checkpoint=<run dir or checkpoint dir> "
                                 "(or model= and tokenizer= in-process)")
            from ..checkpoint import load_model
            loaded = load_model(checkpoint)
            model, tokenizer = loaded.model, tokenizer or loaded.tokenizer
        if tokenizer is None and tokenizer_path:
            from ..data.tokenizer import Tokenizer
            tokenizer = Tokenizer.load(tokenizer_path)
        if tokenizer is None:
            raise ValueError("moeut adapter: no tokenizer (checkpoint has no tokenizer.model; pass tokenizer_path=)")
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is not None and vocab != tokenizer.vocab_size:
            raise ValueError(f"moeut adapter: tokenizer has {tokenizer.vocab_size} pieces but the model's "
                             f"vocab_size is {vocab}")
        self.tokenizer = tokenizer
        self._max_length = _to_int(max_length, 1024)
        self.max_gen_toks = _to_int(max_gen_toks, 256)
        self.scorer = Scorer(model, device=device, batch_size=_to_int(batch_size, 16),
                             pad_multiple=_to_int(pad_multiple, 1), dtype=dtype, max_length=self._max_length,
                             progress=str(progress).lower() in ("1", "true", "yes"))
        self.model = self.scorer.model
        self._device = self.scorer.device

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[Dict[str, Any]] = None):
        """As LM.create_from_arg_string, but a key given in --model_args (e.g. device=cpu) wins over
        the CLI's own value instead of raising "multiple values for keyword argument"."""
        from lm_eval import utils
        return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: Dict[str, Any], additional_config: Optional[Dict[str, Any]] = None):
        """The adapter from parsed model_args; keys of `additional_config` (lm-eval's batch_size,
        device, ...) fill only what the model_args do not set and are not None."""
        args = dict(arg_dict or {})
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @property
    def max_length(self) -> int:
        """Longest sequence (tokens) given to the model; longer requests keep their last tokens."""
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        """`sentencepiece-<sha256[:16]>` of the tokenizer model (lm-eval's cache key)."""
        return f"sentencepiece-{self.tokenizer.sha256[:16]}"

    # ----------------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        """(log P(continuation | context) in nats, is_greedy) per lm-eval Instance (args = context,
        continuation), tokenised separately, no BOS (SPEC 6.1/6.5). Nothing to score (empty
        continuation, or a one-token sentence without context) gives (0.0, True)."""
        reqs: List[ScoreRequest] = []
        empty = []
        for k, inst in enumerate(requests):
            context, continuation = inst.args[0], inst.args[1]
            ctx_ids = self.tokenizer.encode(context) if context else []
            cont_ids = self.tokenizer.encode(continuation) if continuation else []
            r = make_request(ctx_ids, cont_ids, item=context)
            if len(r.ids) - r.score_from <= 0:
                empty.append(k)  # nothing to score (empty continuation, or a 1-token sentence)
                reqs.append(None)
            else:
                reqs.append(r)
        todo = [r for r in reqs if r is not None]
        scored = iter(self.scorer.score(todo, desc="loglikelihood"))
        out = []
        for inst, r in zip(requests, reqs):
            if r is None:
                res = (0.0, True)
            else:
                s = next(scored)
                res = (s.logprob, s.greedy)
            self.cache_hook.add_partial("loglikelihood", inst.args, res)
            out.append(res)
        return out

    def rolling_requests(self, text: str) -> List[ScoreRequest]:
        """Windows of at most max_length tokens covering targets 1..n-1 (the first token is never
        scored), each with the longest preceding context that fits."""
        ids = self.tokenizer.encode(text)
        L = self.max_length
        reqs, a = [], 1
        while a < len(ids):
            b = min(len(ids), a + L - 1)
            start = max(0, b - L)
            reqs.append(ScoreRequest(ids=ids[start:b], score_from=a - start))
            a = b
        return reqs

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Total log-probability (nats) of each Instance's text, every token but the first, scored
        in `rolling_requests` windows."""
        all_reqs, owner = [], []
        for k, inst in enumerate(requests):
            for r in self.rolling_requests(inst.args[0]):
                all_reqs.append(r)
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, s in zip(owner, self.scorer.score(all_reqs, desc="loglikelihood_rolling")):
            totals[k] += s.logprob
        for inst, t in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", inst.args, t)
        return totals

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def greedy_continue(self, ids: List[int], max_new: int, until: Sequence[str]) -> str:
        """Greedy continuation text of the token ids `ids` (their last max_length - max_new kept):
        at most `max_new` tokens, cut before the first stop string of `until`. Uses the model's
        KV-cached `generate` when it has one, else a full forward per token."""
        model, dev = self.model, self.scorer.device
        keep = max(1, self.max_length - max_new)
        ids = ids[-keep:] if len(ids) > keep else ids
        x = torch.tensor([ids], dtype=torch.long, device=dev)
        if hasattr(model, "generate"):
            out = model.generate(x, max_new, greedy=True)
            new = out[0, len(ids):].tolist()
        else:  # any model following the interface: recompute the full forward per token
            new = []
            for _ in range(max_new):
                logits = model(x).logits[0, -1]
                nxt = int(logits.float().argmax())
                new.append(nxt)
                x = torch.cat([x, torch.tensor([[nxt]], device=dev)], dim=1)
                text = self.tokenizer.decode(new)
                if any(u and u in text for u in until):
                    break
        text = self.tokenizer.decode(new)
        for u in until:
            if u and u in text:
                text = text.split(u, 1)[0]
        return text

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Greedy generation per Instance (args = context, gen_kwargs with until / max_gen_toks);
        sampling arguments are logged and ignored. ValueError for an empty context (no BOS)."""
        out = []
        for inst in requests:
            context, gen_kwargs = inst.args[0], dict(inst.args[1] or {})
            until = gen_kwargs.pop("until", None) or []
            if isinstance(until, str):
                until = [until]
            max_new = _to_int(gen_kwargs.pop("max_gen_toks", None), self.max_gen_toks)
            if gen_kwargs.get("do_sample") or (gen_kwargs.get("temperature") or 0) > 0:
                log.warning("moeut adapter: generate_until is greedy; ignoring sampling args %s", gen_kwargs)
            ids = self.tokenizer.encode(context) if context else []
            if not ids:
                raise ValueError("moeut adapter: generate_until with an empty context (no BOS to start from)")
            text = self.greedy_continue(ids, max_new, until)
            self.cache_hook.add_partial("generate_until", inst.args, text)
            out.append(text)
        return out
