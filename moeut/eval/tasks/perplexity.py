"""Perplexity and bits per byte of any text (task `perplexity`): a user's .txt / .jsonl / .gz file
or a Hugging Face hub dataset, scored with the same engine as the zero-shot tasks.

    python -m moeut.evaluate checkpoint=runs/x tasks=[perplexity] perplexity.path=book.txt
    python -m moeut.evaluate checkpoint=runs/x tasks=[perplexity] perplexity.path=val.jsonl.gz \\
        perplexity.context_length=1024 perplexity.stride=512

Documents. A .txt file (or .txt.gz / .txt.bz2) is one document; a .jsonl file (or .jsonl.gz) holds
one document per line, the string in `perplexity.field` ("text"); a hub dataset one per row.
`limit` counts documents. Each document is its own token stream: windows never cross documents,
and, as everywhere in this package, there is no BOS, so the first token of a document is never
scored (SPEC 6.1).

Windows (`perplexity.context_length` L, `perplexity.stride` s, 1 <= s <= L - 1). Window k ends at
e_k = min(L + k s, n) and holds tokens [max(0, e_k - L), e_k); it scores the tokens
[e_{k-1}, e_k) that no earlier window scored (e_{-1} = 1). So every token but the first is
scored exactly once, each with at least L - s tokens of context (fewer only near the start) and
the last window is extended to the left to a full L tokens. This is the Hugging Face perplexity
guide's striding ("Perplexity of fixed-length models"), except that the guide's last window is
shorter and its stride = L loses the first token of every window. The default s = L - 1 gives
non-overlapping targets: consecutive windows share exactly one token, the context of the next
window's first target.

Metrics. `n_tokens` scored tokens, `nll` their summed negative log-likelihood in nats (float64),
`perplexity` = exp(nll / n_tokens), and `bits_per_byte` = nll / (ln 2 * n_bytes), where `n_bytes`
is the UTF-8 bytes of the text the scored tokens cover: each document's bytes minus those of its
first (unscored) token as decoded. Bits per byte does not depend on the tokenizer, so it compares
models with different vocabularies on the same text; perplexity does not.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..scoring import ScoreRequest
from .base import (FULL, EvalOptions, Task, TaskDataMissing, TaskFormatError, check_limit, expect_str,
                   iter_text_lines, read_jsonl)

DEFAULT_CONTEXT = 1024  # the paper's context length, when neither the option nor the run says


def strided_windows(n_tokens: int, context_length: int, stride: Optional[int] = None) -> List[Tuple[int, int, int]]:
    """(begin, end, score_from) per window over a document of n_tokens tokens: the window holds
    tokens [begin, end) and scores [score_from, end) (absolute positions), see the module doc.

    Raises ValueError naming `perplexity.context_length` / `perplexity.stride` when out of range."""
    L = context_length
    if not isinstance(L, int) or L < 2:
        raise ValueError(f"perplexity.context_length: must be an integer >= 2, got {L!r}")
    s = L - 1 if stride is None else stride
    if not isinstance(s, int) or not 1 <= s <= L - 1:
        raise ValueError(f"perplexity.stride: must be an integer in 1..context_length-1 = 1..{L - 1} "
                         f"(without a BOS a window's first token cannot be scored), got {stride!r}")
    out = []
    prev_end, end = 1, min(L, n_tokens)
    while prev_end < n_tokens:
        out.append((max(0, end - L), end, prev_end))
        prev_end, end = end, min(end + s, n_tokens)
    return out


def _docs_from_file(path: Path, field: str, limit: Optional[int]) -> List[str]:
    name = path.name.lower()
    for ext in (".gz", ".bz2"):
        if name.endswith(ext):
            name = name[:-len(ext)]
    if name.endswith(".jsonl") or name.endswith(".json"):
        docs = []
        # read_jsonl parses and names file:line; the field is checked here for the perplexity.field hint
        for lineno, rec in read_jsonl(path, [], limit):
            if field not in rec:
                raise TaskFormatError(f"{path}:{lineno}: expected a JSON object with a {field!r} field "
                                      "(set perplexity.field)")
            docs.append(expect_str(rec, field, path, lineno))
        return docs
    # plain text: the whole file is one document (line endings kept)
    return ["\n".join(line for _, line in iter_text_lines(path))]


class Perplexity(Task):
    """Strided-window perplexity and bits per byte of a text file or a hub text dataset (see the
    module docstring; options in `EvalOptions.perplexity`). Not a column of the paper's table."""

    name = "perplexity"
    column = None  # its own table columns ("text PPL", "bits/byte"), not in the paper's average

    def load(self, opts: EvalOptions) -> List[str]:
        """Documents (str) from perplexity.hub (its `field` column of `split`) or perplexity.path
        (.txt = one document, .jsonl[.gz/.bz2] = its `field` per line), at most `limit`. Raises
        TaskDataMissing (no source set, file absent, hub offline, no text) / TaskFormatError (a bad
        line, or not UTF-8, named file:line); every message names `perplexity.path` or
        `perplexity.hub`."""
        p = opts.perplexity
        limit = check_limit(opts.limit)
        if p.get("hub"):
            from .hub import load_text_from_hub
            docs = load_text_from_hub(p["hub"], p.get("hub_config"), p.get("split") or "test",
                                      p.get("field") or "text", limit)
            where = f"perplexity.hub={p['hub']}"
        else:
            path = p.get("path") or opts.paths.get(self.name)
            if not path:
                raise TaskDataMissing("no text to score: set perplexity.path=<.txt/.jsonl/.gz file> "
                                      "or perplexity.hub=<hub dataset id>")
            path = Path(path)
            where = f"perplexity.path={path}"
            if not path.is_file():
                raise TaskDataMissing(f"{where}: file not found")
            try:
                docs = _docs_from_file(path, p.get("field") or "text", limit)
            except TaskFormatError as e:
                raise TaskFormatError(f"perplexity.path: {e}") from None
        if not any(d.strip() for d in docs):
            raise TaskDataMissing(f"{where}: no text in it (empty or blank)")
        return docs

    def load_items(self, opts: EvalOptions) -> Tuple[List[str], Dict[str, str]]:
        """(`load`'s documents, {"data": FULL, "data_from": the file or hub id}): the user's text,
        never a carried subset."""
        p = opts.perplexity
        return self.load(opts), {"data": FULL, "data_from": str(p.get("hub") or p.get("path")
                                                                 or opts.paths.get(self.name))}

    def evaluate(self, items: List[str], scorer, tokenizer, opts: EvalOptions) -> Dict[str, Any]:
        """Score every document in `strided_windows`: perplexity = exp(NLL / scored tokens),
        bits_per_byte = NLL / (ln 2 * UTF-8 bytes the scored tokens cover), plus the counts.
        Documents under 2 tokens are counted, not scored; ValueError if none has 2 tokens."""
        p = opts.perplexity
        L = p.get("context_length") or DEFAULT_CONTEXT
        stride = p.get("stride")
        requests: List[ScoreRequest] = []
        n_bytes = 0
        n_docs = n_short = 0
        for k, text in enumerate(items):
            ids = tokenizer.encode(text)
            if len(ids) < 2:
                n_short += 1  # nothing to score without a BOS; counted below
                continue
            n_docs += 1
            # bytes the scored tokens cover: the document minus its first (unscored) token
            n_bytes += max(0, len(text.encode("utf-8")) - len(tokenizer.decode(ids[:1]).encode("utf-8")))
            for begin, end, score_from in strided_windows(len(ids), L, stride):
                requests.append(ScoreRequest(ids=ids[begin:end], score_from=score_from - begin, item=k))
        if not requests:
            raise ValueError(f"perplexity: none of the {len(items)} document(s) has 2 or more tokens")
        results = scorer.score(requests, desc="perplexity")
        nll = -math.fsum(r.logprob for r in results)
        n_tokens = sum(r.n_scored for r in results)
        return {
            "perplexity": math.exp(nll / n_tokens),
            "bits_per_byte": nll / (math.log(2) * n_bytes) if n_bytes else float("nan"),
            "nll": nll,
            "n_tokens": n_tokens,
            "n_bytes": n_bytes,
            "n_documents": n_docs,
            "n_documents_too_short": n_short,
            "n_windows": len(requests),
            "context_length": L,
            "stride": L - 1 if stride is None else stride,
            "text": str(p.get("hub") or p.get("path") or opts.paths.get(self.name)),
        }
