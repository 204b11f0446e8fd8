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
    tmp.unlink(missing_ok=True)  # a leftover (or a planted link) is removed, never written through
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_not_an_input(out: str | Path, *inputs: str | Path) -> None:
    """Refuse an output path that names one of the command's inputs (`export M --onnx M`): an
    output never replaces what it was made from. ValueError naming both."""
    out = Path(out)
    for source in inputs:
        source = Path(source)
        same = (
            out.exists() and source.exists() and os.path.samefile(out, source)
        ) or out.resolve() == source.resolve()
        if same:
            raise ValueError(
                f"{out}: is the input {source}; the output would replace it: choose another path"
            )
