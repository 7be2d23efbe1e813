"""Everything after training: run directories in, numbers, tables and figures out (SPEC §7).

One command with subcommands, `python -m moeut.analysis <subcommand> [options]` (see
`moeut/analysis/__main__.py` for the list). Importing the package imports nothing heavy: training
imports only `moeut.analysis.routing` (the routing accumulator) from here.
"""
