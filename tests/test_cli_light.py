"""The command line's light start: `--help` and `--version` without torch, choices in the help,
and plain output at full width outside a terminal."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fedpose.cli import METHOD_CHOICES, main
from fedpose.fl.strategies import STRATEGY_NAMES
from fedpose.version import PLAIN_WIDTH, fedpose_version, plain_console

# the probe runs in a fresh interpreter (this test process has long imported torch), every
# command line in one, so that one interpreter start is paid
PROBE = """
import contextlib, io, sys
from fedpose.cli import main
for argv in {argvs!r}:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
print("TORCH" if "torch" in sys.modules else "NO-TORCH")
"""


def test_help_and_version_do_not_import_torch():
    argvs = [["--help"], ["--version"], ["compare", "--help"], ["data", "inspect", "--help"]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(argvs=argvs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    ).stdout
    assert out.strip().splitlines()[-1] == "NO-TORCH", out


def test_version_names_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"fedpose {fedpose_version()} ")


def test_compare_help_lists_every_registered_method(capsys):
    # the CLI keeps a torch-free copy of the strategy registry's names: it must not drift
    assert METHOD_CHOICES == STRATEGY_NAMES
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    # argparse wraps help text at the terminal's width: compare without line breaks
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")
    for name in STRATEGY_NAMES:
        assert name in text


def test_console_is_wide_outside_a_terminal(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")  # exported by pytest-xdist and some CI runners
    console = plain_console()  # stdout is captured here, so not a terminal
    assert console.width == PLAIN_WIDTH
    line = "x" * 300
    console.print(line)
    assert line in capsys.readouterr().out.splitlines()
