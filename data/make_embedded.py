"""Rebuild the embedded corpus in data/ from the project's shared data folder (maintainers only).

    python data/make_embedded.py [--shared ../shared]

The output is deterministic (gzip mtime 0, level 9); data/README.md lists the sha256 it gives.
Selection rule, books/train: walk shared/data/text/gutenberg/train.jsonl.gz in file order, keep
the first book of each author, stop once 6,200,000 characters of text are kept. books/valid:
the first four books of shared .../gutenberg/valid.jsonl.gz (books held out of the shared train
split, so no embedded validation book is in any training split). c4_sample: the shared C4 sample
files, copied byte-for-byte.
"""
import argparse
import gzip
import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN_CHARS = 6_200_000
VALID_BOOKS = 4


def write_jsonl_gz(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as f:
        for rec in records:
            f.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))


def read_jsonl_gz(path: Path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    args = ap.parse_args()
    text = Path(args.shared) / "data" / "text"

    train, authors, chars = [], set(), 0
    for rec in read_jsonl_gz(text / "gutenberg" / "train.jsonl.gz"):
        if rec["author"] in authors:
            continue
        authors.add(rec["author"])
        train.append(rec)
        chars += len(rec["text"])
        if chars >= TRAIN_CHARS:
            break
    valid = list(read_jsonl_gz(text / "gutenberg" / "valid.jsonl.gz"))[:VALID_BOOKS]
    write_jsonl_gz(HERE / "books" / "train.jsonl.gz", train)
    write_jsonl_gz(HERE / "books" / "valid.jsonl.gz", valid)
    for name in ("train.jsonl.gz", "valid.jsonl.gz"):
        (HERE / "c4_sample").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(text / "c4" / name, HERE / "c4_sample" / name)
    for split, recs in (("train", train), ("valid", valid)):
        print(f"books/{split}: {len(recs)} books, {sum(len(r['text']) for r in recs):,} characters")
        for r in recs:
            print(f"  {r['author']} | {r['title']!r} | {len(r['text']):,}")


if __name__ == "__main__":
    main()
