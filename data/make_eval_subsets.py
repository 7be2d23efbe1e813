"""Rebuild the carried zero-shot subsets in data/eval/ from the full sets (maintainers only).

    python data/make_eval_subsets.py [--shared ../shared]

Selection rule (deterministic, no randomness): the FIRST items of each full file, in file order,
copied byte for byte as whole lines, so the carried files are in the same formats the loaders read
and every carried item equals the item at the same position of the full file:

- lambada/lambada_test.jsonl: its first 300 lines (300 passages);
- blimp/<paradigm>.jsonl: the first 10 lines of each of the 67 paradigm files (670 pairs);
- piqa/valid.jsonl and piqa/valid-labels.lst: the first 300 lines of each (items and their labels);
- arc/ARC-Easy-Test.jsonl: its first 300 lines (300 questions, 3- and 5-option ones included: the
  loader drops those as it does on the full file);
- hellaswag/hellaswag_val_full.txt: the first 300 items (1800 lines, 6 per item) of the derived
  `hellaswag_val_full.txt.bz2`, decompressed (the only HellaSwag copy in shared/data).

CBT has no copy anywhere in shared/data, so none is carried. data/eval/README.md lists the sha256
each carried file gets; tests/unit/eval/test_eval_subsets.py checks them and the selection rule.
"""
import argparse
import bz2
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "eval"
N_ITEMS = 300          # lambada, piqa, arc_easy, hellaswag
N_PER_PARADIGM = 10    # blimp
HELLASWAG_LINES_PER_ITEM = 6

# carried file (relative to data/eval) -> (full file relative to shared/data/eval, number of lines)
PLAIN = {
    "lambada/lambada_test.jsonl": ("lambada/lambada_test.jsonl", N_ITEMS),
    "piqa/valid.jsonl": ("piqa/valid.jsonl", N_ITEMS),
    "piqa/valid-labels.lst": ("piqa/valid-labels.lst", N_ITEMS),
    "arc/ARC-Easy-Test.jsonl": ("arc/ARC-Easy-Test.jsonl", N_ITEMS),
}
HELLASWAG = ("hellaswag/hellaswag_val_full.txt", "hellaswag/hellaswag_val_full.txt.bz2",
             N_ITEMS * HELLASWAG_LINES_PER_ITEM)


def first_lines(data: bytes, n: int) -> bytes:
    """The first `n` lines of `data` (newlines kept); ValueError if it has fewer."""
    lines = data.splitlines(keepends=True)
    if len(lines) < n:
        raise ValueError(f"only {len(lines)} lines, {n} wanted")
    return b"".join(lines[:n])


def subsets(full_root: Path):
    """(carried path relative to data/eval, bytes) of every carried file, built from `full_root`
    (a shared/data/eval folder)."""
    from moeut.eval.tasks.blimp import PARADIGMS

    for rel, (src, n) in PLAIN.items():
        yield rel, first_lines((full_root / src).read_bytes(), n)
    rel, src, n = HELLASWAG
    yield rel, first_lines(bz2.decompress((full_root / src).read_bytes()), n)
    for p in PARADIGMS:
        yield f"blimp/{p}.jsonl", first_lines((full_root / "blimp" / f"{p}.jsonl").read_bytes(), N_PER_PARADIGM)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    args = ap.parse_args()
    import hashlib
    total = 0
    for rel, data in subsets(Path(args.shared) / "data" / "eval"):
        path = OUT / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        total += len(data)
        if not rel.startswith("blimp/"):
            print(f"{rel}: {len(data):,} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    print(f"total {total:,} bytes")


if __name__ == "__main__":
    import sys
    sys.path.insert(0, str(HERE.parent))  # moeut.eval.tasks.blimp.PARADIGMS from this checkout
    main()
