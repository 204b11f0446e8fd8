"""fedpose's version and the console the command line prints with; both import no torch, so
`fedpose --help` and `fedpose --version` answer at once."""

from __future__ import annotations

import sys
from importlib import metadata

from rich.console import Console

# Outside a terminal (a log file, `tee`, CI) rich would wrap at 80 columns, cutting tables and
# their cells ("rou…"); this width lets any table fedpose prints keep its lines whole.
PLAIN_WIDTH = 1000


def fedpose_version() -> str:
    """The installed distribution's version ("unknown" when run from a bare source tree)."""
    try:
        return metadata.version("fedpose")
    except metadata.PackageNotFoundError:
        return "unknown"


def version_line() -> str:
    return f"fedpose {fedpose_version()} (Python {sys.version.split()[0]})"


def plain_console(stderr: bool = False, **kwargs: object) -> Console:
    """A rich Console: the terminal's width in a terminal, else PLAIN_WIDTH columns. Outside a
    terminal $COLUMNS is not followed: tools export it (pytest-xdist's workers, some CI runners
    set 80) for a terminal that is not there. Emoji codes stay text: a file named
    `run:a:b.json` must be named as it is, not as `run🅰b.json`."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if _is_terminal(stream) else PLAIN_WIDTH
    kwargs.setdefault("emoji", False)
    return Console(stderr=stderr, width=width, **kwargs)  # type: ignore[arg-type]


def _is_terminal(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        return False
