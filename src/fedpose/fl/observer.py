"""Hooks into a run: progress bars, timing and benchmarks watch the run through a RunObserver
instead of reaching into the server.

Every hook is a no-op here; an observer overrides the ones it needs. The server and the
in-process transport call `phase` with the seconds of each fixed cost (client state I/O, reply
checks, aggregation, evaluation, checkpoints), `trained` with every reply that arrives, and
`round_done` after each round (or asynchronous aggregation) is logged. The run lifecycle
(engine/run.py) adds `message`, `started`, `finished` and `closed`.
"""

from __future__ import annotations

from typing import Any

from fedpose.fl.messages import TrainReply

# the phases the server and the in-process transport time (RunObserver.phase)
STATE_READ = "state read"
STATE_WRITE = "state write"
REPLY_CHECKS = "reply checks"
AGGREGATION = "aggregation"
CHECKPOINT = "checkpoint"
EVALUATION = "evaluation"


class RunObserver:
    """Watches one run. Hooks must not change the run: the numbers stay those of an unobserved
    run."""

    def message(self, text: str) -> None:
        """A line for the user: warnings, resumed at round r."""

    def started(self, server: Any) -> None:
        """The server is built (and resumed): rounds are about to start."""

    def phase(self, name: str, seconds: float) -> None:
        """One timed fixed cost of the run (STATE_READ, ..., EVALUATION)."""

    def trained(self, reply: TrainReply) -> None:
        """A client's reply arrived (reply.seconds: its local training time)."""

    def round_done(self, done: int, record: dict) -> None:
        """Round `done` (sync) or aggregation `done` (async) is logged as `record`."""

    def finished(self, server: Any) -> None:
        """The last round is done and the model is saved."""

    def closed(self) -> None:
        """The run is over, finished or failed: release what the observer holds (a live bar)."""
