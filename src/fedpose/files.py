"""Writing a file so that no reader ever sees half of it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """write(tmp) beside `path`, then rename tmp to path. A crash mid-write leaves the old file (or
    none), and two processes writing the same file at once (each with its own temporary) never let
    a reader see a partial one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
