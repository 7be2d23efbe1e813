"""`python -m moeut.analysis` without a subcommand, or with an unknown one, is bad input: one line on
stderr that names every subcommand and `--help`, exit status 1, nothing on stdout; `--help` prints
the usage (every subcommand) on stdout with exit status 0."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moeut.analysis.__main__ import SUBCOMMANDS, main

REPO = Path(__file__).resolve().parents[3]
# written out by hand: a subcommand added to or dropped from the table must show up here too
NAMES = ["routing", "summary", "table", "compare", "curves", "cpu-result", "sources", "dynamics", "knockout",
         "depth", "collapse", "lr-sweep"]


def test_the_table_is_the_hand_written_list():
    assert list(SUBCOMMANDS) == NAMES


@pytest.mark.parametrize("argv, start", [([], "moeut.analysis: error: no subcommand given; one of: "),
                                         (["analyze"], "moeut.analysis: error: unknown subcommand 'analyze'; one of: ")])
def test_missing_or_unknown_subcommand_is_one_line_naming_all(capsys, argv, start):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == start + ", ".join(NAMES) + " (python -m moeut.analysis --help describes each)\n"


@pytest.mark.parametrize("flag", ["--help", "-h", "help"])
def test_help_lists_every_subcommand_on_stdout(capsys, flag):
    with pytest.raises(SystemExit) as e:
        main([flag])
    assert e.value.code == 0
    out, err = capsys.readouterr()
    assert err == ""
    listed = [line.split()[0] for line in out.split("subcommands:\n", 1)[1].splitlines()]
    assert listed == NAMES


def test_the_command_itself():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "moeut.analysis"], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "one of: routing, summary," in res.stderr and "--help" in res.stderr
