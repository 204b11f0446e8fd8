"""Reading the JSON-lines files a run writes (metrics.jsonl, flower_timing.jsonl): one home for
the format, so every reader treats a line still being written the same way."""

from __future__ import annotations

from pathlib import Path

from fedpose.bounded import ParseError, loads_json

METRICS_FILE = "metrics.jsonl"


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file; [] when it does not exist yet.

    A last line that does not parse is a row still being written (a run in progress, or one
    killed mid-write) and is left out; a bad line before it is corruption and raises ValueError
    naming the file and the line.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(loads_json(line, f"{path} [line {number}]"))
        except ParseError:
            if number == len(lines):
                break
            raise
    return rows


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The per-round records of a run directory, in the order they were written."""
    return read_jsonl(Path(run_dir) / METRICS_FILE)
