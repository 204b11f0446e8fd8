"""Experiment tracking: the per-round records of metrics.jsonl, also as a CSV table and as
TensorBoard scalars.

A Tracker observes the dict the server writes to metrics.jsonl, right after it is written
(`FederatedServer._log`), so every output holds the same numbers; nothing is computed here that
is not in the record. `fedpose flower-pull` replays the records it pulls through a Tracker, so a
Flower run's submitter gets the same files.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from fedpose.config import ConfigError
from fedpose.files import write_atomically
from fedpose.metrics.log import read_metrics

CSV_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
# record fields that list client ids: tracked as how many (the ids themselves are no curve)
_ID_FIELDS = ("selected", "aggregated", "dropped", "rejected")
_TEXT_FIELDS = ("method", "mode")


class TrackerError(ConfigError):
    pass


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers, flat: `train_loss`, `site_pck/0`, `pck_per_joint/3`,
    `aggregated_count`; None, text and non-finite values are left out."""
    out: dict[str, float] = {}

    def put(key: str, value) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return
        if math.isfinite(value):
            out[key] = float(value)

    for key, value in record.items():
        if key in _TEXT_FIELDS or key == "round":
            continue
        if key in _ID_FIELDS:
            out[f"{key}_count"] = float(len(value))
        elif isinstance(value, dict):
            for sub, v in value.items():
                put(f"{key}/{sub}", v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                put(f"{key}/{i}", v)
        else:
            put(key, value)
    return out


class Tracker:
    """Writes each record it is given to the run's tracking outputs.

    kinds: "csv" (run_dir/metrics.csv: one row per round, one column per scalar, rewritten
    whole each round so a column that appears later, such as an evaluation every few rounds,
    gets its header) and "tensorboard" (event files in run_dir/tensorboard/, written with
    torch.utils.tensorboard's SummaryWriter). A run that starts at round 1 replaces what an
    earlier run left there; a resumed run continues the table from metrics.jsonl.
    """

    def __init__(self, run_dir: str | Path, kinds: list[str] | tuple[str, ...]):
        self.run_dir = Path(run_dir)
        self.kinds = list(dict.fromkeys(kinds))
        self._rows: list[dict] | None = None
        self._writer = None
        if "tensorboard" in self.kinds:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:
                raise TrackerError(
                    "track: tensorboard needs the tensorboard package "
                    "(pip install 'fedpose[track]')"
                ) from None

    def log(self, record: dict) -> None:
        step = int(record["round"])
        if self._rows is None:
            self._start(step)
        values = scalars(record)
        if "csv" in self.kinds:
            self._rows = [r for r in self._rows if r["round"] < step] + [{"round": step, **values}]
            self._write_csv()
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _start(self, step: int) -> None:
        fresh = step <= 1
        tb_dir = self.run_dir / TENSORBOARD_DIR
        if fresh:
            (self.run_dir / CSV_FILE).unlink(missing_ok=True)
            if tb_dir.is_dir():
                for old in tb_dir.glob("events.out.tfevents.*"):
                    old.unlink()
        # a resumed run: the rounds before this one, as metrics.jsonl holds them
        self._rows = (
            []
            if fresh
            else [
                {"round": int(r["round"]), **scalars(r)}
                for r in read_metrics(self.run_dir)
                if int(r["round"]) < step
            ]
        )
        if "tensorboard" in self.kinds:
            from torch.utils.tensorboard import SummaryWriter

            tb_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(tb_dir))

    def _write_csv(self) -> None:
        columns = ["round"]
        for row in self._rows:
            columns += [k for k in row if k not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self._rows)
        # a reader (a spreadsheet, `fedpose watch`) never sees half a table
        write_atomically(self.run_dir / CSV_FILE, lambda tmp: tmp.write_text(buffer.getvalue()))


def replay(run_dir: str | Path, kinds: list[str], records: list[dict]) -> None:
    """Write the tracking outputs of `records` (a run's metrics.jsonl rows) into run_dir."""
    tracker = Tracker(run_dir, kinds)
    try:
        for record in records:
            tracker.log(record)
    finally:
        tracker.close()
