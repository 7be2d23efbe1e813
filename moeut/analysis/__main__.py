"""`python -m moeut.analysis <subcommand> [options]`: the one command of the analysis package.

Each subcommand is a module of this package with a `main()` (a Hydra app over its typed schema);
the subcommand name is removed from argv before that module's `main()` runs, so
`python -m moeut.analysis summary dir=x --help` is the summary tool's own `--help`.
"""
from __future__ import annotations

import importlib
import sys
from typing import Dict, List, Optional

# subcommand -> (module, one-line description); the module's main() does the work
SUBCOMMANDS: Dict[str, tuple] = {
    "routing": ("moeut.analysis.routing_command", "expert analysis of a checkpoint: routing_stats.npz, F1-F6, report"),
    "summary": ("moeut.analysis.summary", "a sweep's run dirs -> one table (summary.md/.csv) and the paper's plots"),
    "table": ("moeut.analysis.table", "moeut.evaluate results -> the paper's zero-shot table (md, csv, tex)"),
    "compare": ("moeut.analysis.compare", "compute-matched comparisons: iso-parameter, iso-MAC, iso-step-time"),
    "curves": ("moeut.analysis.curves", "learning curves of several runs on one figure"),
    "cpu-result": ("moeut.analysis.cpu_result", "docs/results.md's tables and figures from the cpu_result sweep"),
    "sources": ("moeut.analysis.sources", "expert specialisation by data source (NMI, usage relative to uniform)"),
    "dynamics": ("moeut.analysis.dynamics", "expert usage, router saturation and dead experts at every checkpoint"),
    "knockout": ("moeut.analysis.knockout", "validation loss change when one expert (or a group) is knocked out"),
    "depth": ("moeut.analysis.depth", "perplexity with R' repetitions and the logit lens after every layer"),
    "collapse": ("moeut.analysis.collapse", "probe the routing of a real run (gate logits, W_S, CE vs reg gradient); compare two lrs"),
    "lr-sweep": ("moeut.analysis.lr_sweep", "learning-rate stability table of sweeps/lr_stability.yaml (best lr, ratios, targets)"),
}


def usage() -> str:
    """The command's usage text: one line per subcommand."""
    width = max((len(n) for n in SUBCOMMANDS), default=0)
    lines = ["usage: python -m moeut.analysis <subcommand> [options]   (<subcommand> --help for its options)", "",
             "subcommands:"]
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    """Dispatch to the subcommand named by argv[0]. `--help` (or `-h`, `help`) prints the usage on
    stdout, exit status 0; a missing or unknown subcommand is bad input: one line on stderr naming
    every subcommand and `--help`, exit status 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage())
        raise SystemExit(0)
    choices = f"one of: {', '.join(SUBCOMMANDS)} (python -m moeut.analysis --help describes each)"
    if not argv:
        print(f"moeut.analysis: error: no subcommand given; {choices}", file=sys.stderr)
        raise SystemExit(1)
    name = argv[0]
    if name not in SUBCOMMANDS:
        print(f"moeut.analysis: error: unknown subcommand '{name}'; {choices}", file=sys.stderr)
        raise SystemExit(1)
    module = importlib.import_module(SUBCOMMANDS[name][0])
    sys.argv = [f"moeut.analysis {name}"] + argv[1:]
    module.main()


if __name__ == "__main__":
    main()
