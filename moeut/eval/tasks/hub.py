"""Task inputs from the Hugging Face hub (`source=hf`, or `source=auto` when local files are
missing). Each converter turns the hub's record layout into the same items the file loaders
produce, so scoring is identical. The converters are tested on records written in the hub layout;
the downloads themselves cannot be tested offline. Dataset ids are the current hub copies of the
tasks' original releases [verify: contents against the original files before quoting numbers].

This module imports no task module (only `base` and `scoring`): each task's `load_hub` (in its
own module) calls `load_records` and its converter here (CBT's and HellaSwag's converters live in
their task modules, beside the item builders they share with the file loaders).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

from ..scoring import MCItem
from .base import TaskDataMissing, TaskFormatError, hub_offline  # noqa: F401  (hub_offline re-exported)

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


def load_records(task: str, config: Optional[str], limit: Optional[int]) -> List[Dict[str, Any]]:
    """The first `limit` records (all if None) of `task`'s hub dataset (`HF_SOURCES[task]`: id,
    split, revision) in configuration `config`, as dicts. Raises TaskDataMissing when the hub is
    offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) or `datasets` is not installed."""
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


def need_fields(rec: Dict[str, Any], keys: Iterable[str], where: str) -> None:
    """TaskFormatError naming `where` (e.g. "piqa hub record 3") if `rec` lacks any of `keys`."""
    missing = [k for k in keys if k not in rec]
    if missing:
        raise TaskFormatError(f"{where}: missing field(s) {missing}")


def lambada_items(records) -> List[Dict[str, Any]]:
    """LAMBADA hub records ({text}) -> the `{"id": 1-based index, "text"}` items of `Lambada`."""
    out = []
    for i, r in enumerate(records):
        need_fields(r, ["text"], f"lambada hub record {i}")
        out.append({"id": i + 1, "text": r["text"]})
    return out


def blimp_items(records, paradigm: str) -> List[MCItem]:
    """BLiMP hub records of one paradigm ({sentence_good, sentence_bad}) -> 2-way MCItems with no
    context, gold 0 (the good sentence), group = paradigm (SPEC 6.2)."""
    out = []
    for i, r in enumerate(records):
        need_fields(r, ["sentence_good", "sentence_bad"], f"blimp/{paradigm} hub record {i}")
        out.append(MCItem("", [r["sentence_good"], r["sentence_bad"]], 0, paradigm, f"{paradigm}:{i + 1}"))
    return out


def piqa_items(records) -> List[MCItem]:
    """PIQA hub records ({goal, sol1, sol2, label}) -> the same 2-way MCItems as `PIQA.load_local`
    (SPEC 6.2: "Question: " + goal.strip() + "\\nAnswer:", options " " + sol)."""
    out = []
    for i, r in enumerate(records):
        need_fields(r, ["goal", "sol1", "sol2", "label"], f"piqa hub record {i}")
        out.append(MCItem("Question: " + r["goal"].strip() + "\nAnswer:", [" " + r["sol1"], " " + r["sol2"]],
                          int(r["label"]), "piqa", i + 1))
    return out


def arc_items(records, subset: str) -> List[MCItem]:
    """Hub layout: question (str), choices {text: [...], label: [...]}, answerKey; 4-option only."""
    out = []
    for i, r in enumerate(records):
        where = f"{subset} hub record {i}"
        need_fields(r, ["question", "choices", "answerKey"], where)
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
        need_fields(r, [field], f"{where} hub record {i} (set perplexity.field)")
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
