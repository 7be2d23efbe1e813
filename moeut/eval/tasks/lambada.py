"""LAMBADA (OpenAI GPT-2 release `lambada_test.jsonl`, 5153 passages), scored as the paper's code
does (SPEC 6.2).

One teacher-forced forward over the whole passage. The gold word is `text.split(" ")[-1]`
(punctuation included). With w = its length in *characters*, the argmax predictions at positions
in_len-1-w .. in_len-2 (i.e. the predictions of the last w tokens: a character count used as a
deliberately wide token window) are detokenised, `.split(" ")[-1]` is taken and compared exactly
with the gold word.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

from ..scoring import ScoreRequest
from .base import EvalOptions, Task, TaskFormatError, check_limit, expect_str, read_jsonl
from .hub import lambada_items, load_records


class Lambada(Task):
    """LAMBADA (OpenAI release), last-word prediction scored as the paper's code does (SPEC 6.2)."""

    name = "lambada"
    column = "LAMBADA"

    def load_local(self, opts: EvalOptions) -> List[Dict[str, Any]]:
        """`{"id": line, "text"}` items of `lambada_test.jsonl`; TaskFormatError naming file:line for
        a text that is not a passage of several words."""
        path = opts.path_for(self.name, opts.root / "lambada" / "lambada_test.jsonl")
        items = []
        for lineno, rec in read_jsonl(path, ["text"], check_limit(opts.limit)):
            text = expect_str(rec, "text", path, lineno)
            if not text.strip() or " " not in text.strip():
                raise TaskFormatError(f"{path}:{lineno}: 'text' must hold a passage of several words")
            items.append({"id": lineno, "text": text})
        return items

    def load_hub(self, opts: EvalOptions) -> List[Dict[str, Any]]:
        """Items from the hub copy (`hub.HF_SOURCES["lambada"]`), the first `limit` records."""
        return lambada_items(load_records(self.name, "default", check_limit(opts.limit)))

    def evaluate(self, items, scorer, tokenizer, opts: EvalOptions) -> Dict[str, Any]:
        """One teacher-forced forward per passage (SPEC 6.2 "LAMBADA scoring"). Returns accuracy
        (exact last-word match over the character-length window), last_token_accuracy,
        target_perplexity, lm_loss (nats per predicted token), n_items [, items]. ValueError for a
        passage of fewer than 2 tokens."""
        requests, targets = [], []
        for it in items:
            ids = tokenizer.encode(it["text"])
            if len(ids) < 2:
                raise ValueError(f"lambada item {it['id']}: fewer than 2 tokens")
            requests.append(ScoreRequest(ids=ids, score_from=1, item=it["id"], want_argmax=True))
            targets.append(tokenizer.encode(" " + it["text"].split(" ")[-1]))
        results = scorer.score(requests, desc="lambada")
        n_ok = n_last_ok = 0
        word_ce_means: List[float] = []
        total_ce, total_tokens = 0.0, 0
        per_item = []
        for it, req, res, word_ids in zip(items, requests, results, targets):
            word = it["text"].split(" ")[-1]
            in_len = len(req.ids)
            w = len(word)
            # argmax[p] predicts token p+1; positions in_len-1-w .. in_len-2 (clipped at 0).
            window = res.argmax[max(0, in_len - 1 - w):in_len - 1]
            predicted = tokenizer.decode(window).split(" ")[-1]
            ok = predicted == word
            last_ok = bool(word_ids) and res.argmax[in_len - 2] == word_ids[-1]
            n_ok += ok
            n_last_ok += last_ok
            # Target-word CE over the last m positions of the passage, m = #tokens of " "+word
            # tokenised alone. [verify] The paper's code takes the target tokens this way; where
            # the passage's own tokenisation splits the word differently the window can differ.
            m = max(1, min(len(word_ids), res.n_scored))
            word_ce_means.append(-sum(res.token_logprobs[-m:]) / m)
            total_ce += -res.logprob
            total_tokens += res.n_scored
            if opts.keep_items:
                per_item.append({"id": it["id"], "gold": word, "predicted": predicted, "correct": ok})
        n = len(items)
        out: Dict[str, Any] = {
            "accuracy": n_ok / n if n else float("nan"),
            "last_token_accuracy": n_last_ok / n if n else float("nan"),
            # exp of the mean over items of each item's mean target-token CE
            "target_perplexity": math.exp(sum(word_ce_means) / n) if n else float("nan"),
            # full-passage LM loss: mean CE per predicted token, pooled over items
            "lm_loss": total_ce / total_tokens if total_tokens else float("nan"),
            "n_items": n,
        }
        if opts.keep_items:
            out["items"] = per_item
        return out
