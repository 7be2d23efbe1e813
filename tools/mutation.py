#!/usr/bin/env python
"""Curated mutation testing: plant one listed bug at a time in a temp copy and run the tests that must catch it.

The mutants live in ``tools/mutants.toml`` (one ``[[mutant]]`` table each: ``id``, ``file``, ``original`` (text
that must occur exactly once in the file), ``replacement``, ``tests`` (pytest node ids or files, relative to the
repository root), optional ``equivalent = "why no output can change"``). For each mutant the driver writes the
mutated file into a copy of the checkout (never the working tree), runs
``python -m pytest -x -q -p no:cacheprovider <tests>`` there with a timeout, and records the outcome:

- ``killed``: the selection failed (a test caught the bug);
- ``timeout``: the selection ran past ``--timeout`` (counted as killed: the bug changed behaviour);
- ``survived``: the whole selection passed with the bug in place;
- ``error``: pytest found no such test or collected none (exit 4 or 5), or the mutant does not apply;
- ``equivalent``: listed with a reason and not run (``--include-equivalent`` runs them too);
- ``skipped``: not run because ``--time-budget`` ran out.

Before any mutant runs, the union of the selected tests runs once unmutated (``--no-baseline`` skips it): a
failing baseline would make every "killed" meaningless, so it stops the run with exit 1.

Usage (see docs/testing.md)::

    python tools/mutation.py --check                 # every mutant applies exactly once (seconds)
    python tools/mutation.py                         # the full pass, report in .mutation-report/
    python tools/mutation.py --only sched-warmup-off # one mutant
    python tools/mutation.py --sample 5 --seed 3 --time-budget 300   # the CI sample
    python tools/mutation.py --without tests/test_new.py            # the kill rate without a test file

Exit status: 0 when every run mutant was killed (or timed out); 1 when one survived, errored, a mutant does not
apply, or the baseline failed; 2 on bad command-line input.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MUTANTS = REPO / "tools" / "mutants.toml"
KILLED_LIKE = ("killed", "timeout")


@dataclass
class Mutant:
    """One planted bug: ``original`` (occurring exactly once in ``file``) becomes ``replacement``."""

    id: str
    file: str
    original: str
    replacement: str
    tests: list[str]
    equivalent: str = ""
    status: str = "not run"
    seconds: float = 0.0
    detail: str = ""
    problems: list[str] = field(default_factory=list)


def load_mutants(path: Path) -> list[Mutant]:
    """Read the mutant list from a TOML file; raises ``ValueError`` naming the entry on a malformed one."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    out, seen = [], set()
    for i, entry in enumerate(data.get("mutant", []), 1):
        where = f"{path}: mutant #{i} ({entry.get('id', '?')})"
        for key in ("id", "file", "original", "replacement", "tests"):
            if key not in entry:
                raise ValueError(f"{where}: missing key {key!r}")
        unknown = set(entry) - {"id", "file", "original", "replacement", "tests", "equivalent"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}")
        if entry["id"] in seen:
            raise ValueError(f"{where}: duplicate id")
        seen.add(entry["id"])
        tests = entry["tests"]
        if isinstance(tests, str) or not tests or not all(isinstance(t, str) for t in tests):
            raise ValueError(f"{where}: 'tests' must be a non-empty list of strings")
        out.append(Mutant(entry["id"], entry["file"], entry["original"], entry["replacement"], list(tests),
                          entry.get("equivalent", "")))
    if not out:
        raise ValueError(f"{path}: no [[mutant]] entries")
    return out


def check_mutant(m: Mutant, root: Path) -> list[str]:
    """Problems that stop ``m`` applying in the checkout at ``root`` (empty when it applies exactly once)."""
    problems = []
    src = root / m.file
    if not src.is_file():
        return [f"file {m.file} does not exist"]
    n = src.read_text().count(m.original)
    if n != 1:
        problems.append(f"original text occurs {n} times in {m.file} (must be exactly once)")
    if m.original == m.replacement:
        problems.append("replacement equals original")
    for t in m.tests:
        if not (root / t.split("::")[0]).exists():
            problems.append(f"test path {t.split('::')[0]} does not exist")
    return problems


def copy_checkout(root: Path, dest: Path) -> Path:
    """Copy the files git knows about (tracked and untracked-not-ignored) to ``dest/repo``; returns that path."""
    listing = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root,
                             capture_output=True, check=True).stdout.decode().split("\0")
    repo = dest / "repo"
    for rel in filter(None, listing):
        src = root / rel
        if not src.is_file():  # deleted but still tracked
            continue
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, repo / rel)
    shared = root.parent / "shared"
    if shared.exists():  # the tests' optional data beside the checkout (tests/conftest.py)
        (dest / "shared").symlink_to(shared.resolve())
    return repo


def pytest_env(repo: Path) -> dict[str, str]:
    """The child's environment: the copy first on the path, no bytecode (a stale .pyc would hide a mutant)."""
    env = dict(os.environ)
    env.update(PYTHONPATH=str(repo), PYTHONDONTWRITEBYTECODE="1", MPLBACKEND="Agg", WANDB_MODE="disabled")
    for key, value in (("OMP_NUM_THREADS", "1"), ("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"),
                       ("TOKENIZERS_PARALLELISM", "false")):
        env.setdefault(key, value)
    return env


def run_pytest(repo: Path, tests: list[str], timeout: float) -> tuple[int | None, str]:
    """Run the test selection in ``repo``; returns (exit status or None on timeout, last lines of output)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        p = subprocess.run(cmd, cwd=repo, env=pytest_env(repo), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timeout after {timeout:.0f} s"
    tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-6:])
    return p.returncode, tail


def run_mutant(m: Mutant, repo: Path, timeout: float) -> None:
    """Apply ``m`` in the copy at ``repo``, run its tests, restore the file, and record the outcome on ``m``."""
    m.problems = check_mutant(m, repo)
    if m.problems:
        m.status, m.detail = "error", "; ".join(m.problems)
        return
    path = repo / m.file
    original_text = path.read_text()
    path.write_text(original_text.replace(m.original, m.replacement, 1))
    t0 = time.monotonic()
    try:
        rc, tail = run_pytest(repo, m.tests, timeout)
    finally:
        path.write_text(original_text)
    m.seconds = time.monotonic() - t0
    if rc is None:
        m.status = "timeout"
    elif rc == 0:
        m.status = "survived"
    elif rc in (4, 5):
        m.status = "error"  # a usage error or no test collected: the selection is wrong, not the mutant caught
    else:
        m.status = "killed"
    m.detail = tail.splitlines()[-1] if tail else ""


def summary(mutants: list[Mutant]) -> dict:
    """Counts per outcome and the kill rate over the mutants that ran and are not listed as equivalent."""
    counts: dict[str, int] = {}
    for m in mutants:
        counts[m.status] = counts.get(m.status, 0) + 1
    ran = [m for m in mutants if m.status in ("killed", "timeout", "survived", "error") and not m.equivalent]
    killed = sum(m.status in KILLED_LIKE for m in ran)
    return {"counts": counts, "ran": len(ran), "killed": killed,
            "kill_rate": (killed / len(ran)) if ran else None,
            "equivalent": sum(bool(m.equivalent) for m in mutants), "total": len(mutants)}


def git_commit(root: Path) -> str:
    """The checkout's HEAD (with ``+dirty`` when the working tree differs), or ``unknown``."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=root, capture_output=True,
                               text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_report(mutants: list[Mutant], out: Path, root: Path, argv: list[str], commit: str | None = None) -> dict:
    """Write ``report.json`` and ``report.md`` into ``out``; ``commit``: the code tested (default: the
    checkout's HEAD now). Returns the summary dict."""
    out.mkdir(parents=True, exist_ok=True)
    s = summary(mutants)
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit or git_commit(root),
            "command": " ".join(["python tools/mutation.py", *argv])}
    rows = [{"id": m.id, "file": m.file, "status": m.status, "seconds": round(m.seconds, 1),
             "equivalent": m.equivalent, "detail": m.detail, "tests": m.tests} for m in mutants]
    (out / "report.json").write_text(json.dumps({**meta, **s, "mutants": rows}, indent=1) + "\n")
    rate = "n/a" if s["kill_rate"] is None else f"{100 * s['kill_rate']:.1f} %"
    lines = [f"# Mutation report ({meta['date']}, commit {meta['commit']})", "", f"Command: `{meta['command']}`", "",
             f"Kill rate: **{rate}** ({s['killed']} of {s['ran']} non-equivalent mutants run; "
             f"{s['equivalent']} listed as equivalent; {s['total']} in the list)", "",
             "| outcome | count |", "|---|---|", *[f"| {k} | {v} |" for k, v in sorted(s["counts"].items())], "",
             "| id | file | outcome | s | note |", "|---|---|---|---|---|"]
    for m in mutants:
        note = m.equivalent or m.detail
        lines.append(f"| {m.id} | {m.file} | {m.status} | {m.seconds:.0f} | {note.replace('|', '/')[:160]} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return s


def merge_reports(mutants: list[Mutant], reports: list[Path], out: Path, root: Path, argv: list[str]) -> int:
    """Combine partial runs' report.json files into one report over ``mutants``; returns the exit status."""
    by_id = {m.id: m for m in mutants}
    for path in reports:
        try:
            rows = json.loads(Path(path).read_text())["mutants"]
        except (OSError, ValueError, KeyError) as e:
            print(f"mutation.py: error: --merge: {path}: {e}", file=sys.stderr)
            return 1
        for row in rows:
            m = by_id.get(row["id"])
            if m is not None and row["status"] not in ("not run", "skipped"):
                m.status, m.seconds, m.detail = row["status"], row.get("seconds", 0.0), row.get("detail", "")
    for m in mutants:
        if m.equivalent and m.status == "not run":
            m.status = "equivalent"
    s = write_report(mutants, out, root, argv)
    rate = "n/a" if s["kill_rate"] is None else f"{100 * s['kill_rate']:.1f} %"
    print(f"mutation.py: merged {len(reports)} report(s): killed {s['killed']} of {s['ran']} run ({rate}); "
          f"outcomes {s['counts']}; report in {out}/report.md")
    bad = [m for m in mutants if m.status in ("survived", "error", "not run") and not m.equivalent]
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the selected mutants and write the report; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="mutation.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mutants", type=Path, default=DEFAULT_MUTANTS, help="mutant list (TOML)")
    ap.add_argument("--root", type=Path, default=REPO, help="checkout to mutate a copy of (default: this one)")
    ap.add_argument("--check", action="store_true", help="only check that every mutant applies exactly once")
    ap.add_argument("--only", action="append", default=[], metavar="ID", help="run this mutant (repeatable)")
    ap.add_argument("--file", action="append", default=[], metavar="PATH", help="run the mutants of this file")
    ap.add_argument("--sample", type=int, metavar="N", help="run N mutants drawn at random (with --seed)")
    ap.add_argument("--seed", type=int, default=0, help="seed of --sample's draw")
    ap.add_argument("--time-budget", type=float, metavar="SECONDS", help="stop starting mutants after this")
    ap.add_argument("--timeout", type=float, default=600.0, help="per-mutant test timeout, seconds")
    ap.add_argument("--include-equivalent", action="store_true", help="also run mutants listed as equivalent")
    ap.add_argument("--without", action="append", default=[], metavar="TEST",
                    help="drop this test file or node id from every selection (repeatable): the kill rate "
                         "without it, e.g. before a new test file")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selected tests")
    ap.add_argument("--out", type=Path, default=None, help="report folder (default: <root>/.mutation-report)")
    ap.add_argument("--list", action="store_true", help="print the mutant ids and exit")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="REPORT_JSON",
                    help="write one report from the report.json files of partial runs (a later file wins per "
                         "mutant) over the current list, without running anything")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    try:
        mutants = load_mutants(args.mutants)
    except (OSError, ValueError, tomllib.TOMLDecodeError) as e:
        print(f"mutation.py: error: {e}", file=sys.stderr)
        return 1
    if args.list:
        for m in mutants:
            print(f"{m.id}\t{m.file}" + ("\t(equivalent)" if m.equivalent else ""))
        return 0
    if args.merge:
        return merge_reports(mutants, args.merge, args.out or (root / ".mutation-report"), root, argv)
    if args.check:
        bad = [(m, p) for m in mutants for p in check_mutant(m, root)]
        for m, p in bad:
            print(f"mutation.py: error: {args.mutants.name}: mutant {m.id}: {p}", file=sys.stderr)
        n_eq = sum(bool(m.equivalent) for m in mutants)
        print(f"mutation.py: {len(mutants)} mutants ({n_eq} listed as equivalent), "
              f"{len({m.id for m, _ in bad})} do not apply")
        return 1 if bad else 0
    if args.without:
        drop = set(args.without)
        for m in mutants:
            m.tests = [t for t in m.tests if t not in drop and t.split("::")[0] not in drop]
        for m in [m for m in mutants if not m.tests]:
            print(f"mutation.py: mutant {m.id} has no test left after --without: not run", file=sys.stderr)
        mutants = [m for m in mutants if m.tests]
    ids = {m.id for m in mutants}
    unknown = [i for i in args.only if i not in ids]
    if unknown:
        print(f"mutation.py: error: --only: unknown mutant id(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    chosen = [m for m in mutants if (not args.only or m.id in args.only) and (not args.file or m.file in args.file)]
    if not args.only and not args.include_equivalent:
        for m in chosen:
            if m.equivalent:
                m.status = "equivalent"
        runnable = [m for m in chosen if not m.equivalent]
    else:
        runnable = chosen
    if args.sample is not None:
        runnable = random.Random(args.seed).sample(runnable, min(args.sample, len(runnable)))
        chosen = runnable
    if not chosen:
        print("mutation.py: error: no mutant selected (--only / --file)", file=sys.stderr)
        return 2
    start = time.monotonic()
    # a SIGTERM (a CI timeout) unwinds normally: the running pytest is killed and the temp copy removed
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _run(args, argv, root, chosen, runnable, start)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args, argv: list[str], root: Path, chosen: list[Mutant], runnable: list[Mutant], start: float) -> int:
    """Copy the checkout, run the baseline and each mutant of ``runnable``, write the report; the exit status."""
    out = args.out or (root / ".mutation-report")
    commit = git_commit(root)  # the code copied, whatever changes in the checkout during the run
    with tempfile.TemporaryDirectory(prefix="moeut-mutation-") as tmp:
        repo = copy_checkout(root, Path(tmp))
        if not args.no_baseline and runnable:
            union = list(dict.fromkeys(t for m in runnable for t in m.tests))
            print(f"mutation.py: baseline: {len(union)} test selections, unmutated", flush=True)
            rc, tail = run_pytest(repo, union, args.timeout * 2)
            if rc != 0:
                print(f"mutation.py: error: the unmutated baseline failed (exit {rc}):\n{tail}", file=sys.stderr)
                return 1
        for i, m in enumerate(runnable, 1):
            if args.time_budget is not None and time.monotonic() - start > args.time_budget:
                m.status = "skipped"
                continue
            run_mutant(m, repo, args.timeout)
            print(f"mutation.py: [{i}/{len(runnable)}] {m.id}: {m.status} ({m.seconds:.0f} s)", flush=True)
            write_report(chosen, out, root, argv, commit)  # kept current: an interrupted run leaves a partial report
    s = write_report(chosen, out, root, argv, commit)
    rate = "n/a" if s["kill_rate"] is None else f"{100 * s['kill_rate']:.1f} %"
    print(f"mutation.py: killed {s['killed']} of {s['ran']} run ({rate}); outcomes {s['counts']}; "
          f"report in {out}/report.md")
    bad = [m for m in runnable if m.status in ("survived", "error")]
    for m in bad:
        print(f"mutation.py: {m.status}: {m.id} ({m.file}): {m.detail}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
