"""Live round progress of runs that go on in worker processes (engine/parallel.py).

A worker's own output goes to its log file; what the parent can see is the run's metrics.jsonl,
which gains one line per completed round. `RoundProgress` reads the last line of each running
run's file and shows it: one rich progress bar per run in a terminal, and outside one (a log,
`tee`, CI) a plain line each time a run completes a round, so a long comparison is never silent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

METRICS_FILE = "metrics.jsonl"
POLL_SECONDS = 1.0  # the files are read at most this often


def last_round(run_dir: Path) -> int:
    """The round of the last complete line of a run's metrics.jsonl; 0 when there is none (a
    line being written, or a damaged one, is passed over)."""
    try:
        lines = (run_dir / METRICS_FILE).read_bytes().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("round"), int):
            return row["round"]
    return 0


@dataclass
class _Run:
    run_dir: Path
    rounds: int
    shown: int = -1
    task: int | None = None


class RoundProgress:
    """Rounds completed per run. Use as a context manager; `poll(names)` with the names of the
    runs now going on, `finished(name, text)` when one ends."""

    def __init__(self, console: Console, runs: dict[str, tuple[Path, int]]) -> None:
        self.console = console
        self.runs = {name: _Run(Path(d), rounds) for name, (d, rounds) in runs.items()}
        self.live = console.is_terminal
        self._last_poll = 0.0
        self._progress: Progress | None = None
        if self.live:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("rounds"),
                TimeElapsedColumn(),
                console=console,
            )

    def __enter__(self) -> RoundProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def poll(self, names: Iterable[str], force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_poll < POLL_SECONDS:
            return
        self._last_poll = now
        for name in names:
            self._show(name, last_round(self.runs[name].run_dir))

    def finished(self, name: str, text: str) -> None:
        run = self.runs[name]
        self._show(name, last_round(run.run_dir))
        if self._progress is not None and run.task is not None:
            self._progress.update(run.task, description=f"{name} {text}")
        self.console.print(f"{name}: {text}", markup=False, highlight=False)

    def _show(self, name: str, done: int) -> None:
        run = self.runs[name]
        if done == run.shown:
            return
        run.shown = done
        if self._progress is None:
            self.console.print(f"{name}: round {done}/{run.rounds}", markup=False, highlight=False)
            return
        if run.task is None:
            run.task = self._progress.add_task(name, total=run.rounds)
        self._progress.update(run.task, completed=done)
