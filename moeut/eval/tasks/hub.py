"""Task inputs from the Hugging Face hub (`source=hf`, or `source=auto` when local files are
missing). Each converter turns the hub's record layout into the same items the file loaders
produce, so scoring is identical. The converters are tested on records written in the hub layout;
the downloads themselves cannot be tested offline. Dataset ids are the current hub copies of the
tasks' original releases [verify: contents against the original files before quoting numbers].
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Optional

from ..scoring import MCItem
from .base import EvalOptions, TaskDataMissing, TaskFormatError, check_limit

# task -> (dataset id, configs, split, revision)
HF_SOURCES: Dict[str, tuple] = {
    "lambada": ("EleutherAI/lambada_openai", ["default"], "test", None),
    "blimp": ("nyu-mll/blimp", None, "train", None),  # configs = the 67 paradigms
    "cbt": ("cam-cst/cbt", ["CN", "NE", "P", "V"], "test", "7503a0643517afe02a86e4750d375a9686008efa"),
    "hellaswag": ("Rowan/hellaswag", [None], "validation", None),
    "piqa": ("baber/piqa", [None], "validation", None),
    "arc_easy": ("allenai/ai2_arc", ["ARC-Easy"], "test", None),
    "arc_challenge": ("allenai/ai2_arc", ["ARC-Challenge"], "test", None),
}


def hub_offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes")
               for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def load_records(task: str, config: Optional[str], limit: Optional[int]) -> List[Dict[str, Any]]:
    if hub_offline():
        raise TaskDataMissing(f"{task}: hub source requested but the hub is offline (HF_DATASETS_OFFLINE or HF_HUB_OFFLINE is set)")
    try:
        import datasets
    except ImportError as e:
        raise TaskDataMissing(f"{task}: source=hf needs the `datasets` package ({e})") from None
    repo, _, split, revision = HF_SOURCES[task]
    ds = datasets.load_dataset(repo, config, split=split, revision=revision)
    n = len(ds) if limit is None else min(limit, len(ds))
    return [ds[i] for i in range(n)]


def _need(rec: Dict[str, Any], keys: Iterable[str], where: str) -> None:
    missing = [k for k in keys if k not in rec]
    if missing:
        raise TaskFormatError(f"{where}: missing field(s) {missing}")


def lambada_items(records) -> List[Dict[str, Any]]:
    out = []
    for i, r in enumerate(records):
        _need(r, ["text"], f"lambada hub record {i}")
        out.append({"id": i + 1, "text": r["text"]})
    return out


def blimp_items(records, paradigm: str) -> List[MCItem]:
    out = []
    for i, r in enumerate(records):
        _need(r, ["sentence_good", "sentence_bad"], f"blimp/{paradigm} hub record {i}")
        out.append(MCItem("", [r["sentence_good"], r["sentence_bad"]], 0, paradigm, f"{paradigm}:{i + 1}"))
    return out


def cbt_items(records, cbt_type: str) -> List[MCItem]:
    """Hub layout: sentences (20 story lines), question (with XXXXX), answer, options (10)."""
    from .cbt import make_cbt_item
    out = []
    for i, r in enumerate(records):
        where = f"cbt/{cbt_type} hub record {i}"
        _need(r, ["sentences", "question", "answer", "options"], where)
        cands = [c for c in r["options"] if c != ""]
        if r["answer"] not in cands:
            raise TaskFormatError(f"{where}: answer {r['answer']!r} is not among the options")
        if len(cands) != 10 or "XXXXX" not in r["question"]:
            continue
        out.append(make_cbt_item(list(r["sentences"]), r["question"], r["answer"], cands, cbt_type,
                                 f"{cbt_type}:{i + 1}"))
    return out


def hellaswag_items(records, strip_brackets: bool) -> List[MCItem]:
    from .hellaswag import preprocess
    out = []
    for i, r in enumerate(records):
        where = f"hellaswag hub record {i}"
        _need(r, ["activity_label", "ctx_a", "ctx_b", "endings", "label"], where)
        if len(r["endings"]) != 4 or str(r["label"]) not in ("0", "1", "2", "3"):
            raise TaskFormatError(f"{where}: needs 4 endings and a label 0-3")
        ctx = preprocess(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize(), strip_brackets)
        out.append(MCItem(ctx, [" " + preprocess(e, strip_brackets) for e in r["endings"]], int(r["label"]),
                          "hellaswag", r.get("ind", i)))
    return out


def piqa_items(records) -> List[MCItem]:
    out = []
    for i, r in enumerate(records):
        _need(r, ["goal", "sol1", "sol2", "label"], f"piqa hub record {i}")
        out.append(MCItem("Question: " + r["goal"].strip() + "\nAnswer:", [" " + r["sol1"], " " + r["sol2"]],
                          int(r["label"]), "piqa", i + 1))
    return out


def arc_items(records, subset: str) -> List[MCItem]:
    """Hub layout: question (str), choices {text: [...], label: [...]}, answerKey; 4-option only."""
    out = []
    for i, r in enumerate(records):
        where = f"{subset} hub record {i}"
        _need(r, ["question", "choices", "answerKey"], where)
        texts, labels = list(r["choices"]["text"]), [str(x) for x in r["choices"]["label"]]
        if str(r["answerKey"]) not in labels:
            raise TaskFormatError(f"{where}: answerKey {r['answerKey']!r} not in {labels}")
        if len(texts) != 4:
            continue
        out.append(MCItem("Question: " + r["question"] + "\nAnswer:", [" " + t for t in texts],
                          labels.index(str(r["answerKey"])), subset, r.get("id", i)))
    return out


def text_docs(records, field: str, where: str) -> List[str]:
    """Documents (strings) of a hub text dataset, e.g. wikitext's `text` rows."""
    out = []
    for i, r in enumerate(records):
        _need(r, [field], f"{where} hub record {i} (set perplexity.field)")
        if not isinstance(r[field], str):
            raise TaskFormatError(f"{where} hub record {i}: field {field!r} must be a string")
        out.append(r[field])
    return out


def load_text_from_hub(repo: str, config: Optional[str], split: str, field: str,
                       limit: Optional[int]) -> List[str]:
    """Task `perplexity` with perplexity.hub=<dataset id>: its `field` column, `limit` rows."""
    if hub_offline():
        raise TaskDataMissing(f"perplexity.hub={repo}: the hub is offline (HF_DATASETS_OFFLINE or HF_HUB_OFFLINE is set)")
    try:
        import datasets
    except ImportError as e:
        raise TaskDataMissing(f"perplexity.hub={repo}: needs the `datasets` package ({e})") from None
    ds = datasets.load_dataset(repo, config, split=split)
    n = len(ds) if limit is None else min(limit, len(ds))
    return text_docs((ds[i] for i in range(n)), field, f"perplexity.hub={repo}")


def load_from_hub(task: str, opts: EvalOptions):
    limit = check_limit(opts.limit)
    if task == "lambada":
        return lambada_items(load_records(task, "default", limit))
    if task == "blimp":
        from .blimp import PARADIGMS
        return [it for p in PARADIGMS for it in blimp_items(load_records(task, p, limit), p)]
    if task == "cbt":
        # limit applies after the 10-option filter in the file loader; close enough here
        return [it for t in ("CN", "NE", "P", "V") for it in cbt_items(load_records(task, t, limit), t)]
    if task == "hellaswag":
        return hellaswag_items(load_records(task, None, limit), opts.hellaswag_strip_brackets)
    if task == "piqa":
        return piqa_items(load_records(task, None, limit))
    if task in ("arc_easy", "arc_challenge"):
        subset = HF_SOURCES[task][1][0]
        return arc_items(load_records(task, subset, None), subset)[:limit]
    raise ValueError(f"no hub source for task {task!r}")
