"""Reading the JSON-lines files a run writes (metrics.jsonl, flower_timing.jsonl): one home for
the format, so every reader treats a line still being written the same way."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from fedpose.bounded import ParseError, loads_json

METRICS_FILE = "metrics.jsonl"


def read_jsonl(path: str | Path, check: Callable[[object], str | None] | None = None) -> list[dict]:
    """The rows of a JSON-lines file; [] when it does not exist yet.

    A last line that does not parse is a row still being written (a run in progress, or one
    killed mid-write) and is left out; a bad line before it is corruption and raises ValueError
    naming the file and the line. `check(row)` names what is wrong with a parsed row (None: it
    is sound): ValueError naming the file, the line and the key.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = loads_json(line, f"{path} [line {number}]")
        except ParseError:
            if number == len(lines):
                break
            raise
        problem = check(row) if check is not None else None
        if problem:
            raise ValueError(f"{path} [line {number}]: {problem}")
        rows.append(row)
    return rows


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The per-round records of a run directory, in the order they were written, each checked
    against the metrics schema (metrics_row_problem)."""
    return read_jsonl(Path(run_dir) / METRICS_FILE, metrics_row_problem)


# ----------------------------------------------------------------------------- the row schema
# What readers (report, compare --resume, flower_dp) take from a row, by type. Keys not named
# here are kept as they are; a named key of another type is refused with the key named.
_NUMBER_KEYS = (
    "train_loss",
    "pck_mean",
    "heatmap_acc",
    "sim_time",
    "wall_seconds",
    "conflict_share",
    "agg_seconds",
    "central_pck_mean",
    "epoch_seconds",
    "img_per_s",
)
_NUMBER_MAP_KEYS = ("pck_per_joint", "site_pck", "client_loss", "central_pck_per_joint")
_NUMBER_LIST_KEYS = ("weights", "coefficients", "staleness")
_INT_LIST_KEYS = ("selected", "aggregated", "dropped")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number_map(value: object) -> bool:
    return isinstance(value, dict) and all(v is None or _is_number(v) for v in value.values())


def _list_of(ok: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda value: isinstance(value, list) and all(ok(v) for v in value)


def _layer_conflict(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(e, dict) and _is_number(e.get("conflict_share")) for e in value.values()
    )


# key -> (test of a non-null value, what it should be)
_ROW_TYPES: dict[str, tuple[Callable[[object], bool], str]] = {
    "round": (_is_count, "an integer >= 0"),
    "epoch": (_is_count, "an integer >= 0"),
    **{k: (_is_number, "a number or null") for k in _NUMBER_KEYS},
    **{k: (_number_map, "an object of numbers") for k in _NUMBER_MAP_KEYS},
    **{k: (_list_of(_is_number), "a list of numbers") for k in _NUMBER_LIST_KEYS},
    **{k: (_list_of(_is_count), "a list of integers >= 0") for k in _INT_LIST_KEYS},
    "rejected": (lambda v: isinstance(v, dict), "an object"),
    "layer_conflict": (_layer_conflict, "an object of {conflict_share: number}"),
}


def metrics_row_problem(row: object) -> str | None:
    """Why one metrics.jsonl row cannot be read (None: sound). A row is an object with an
    integer `round` (federated) or `epoch` (centralized) >= 0; the keys readers use have
    their types (_ROW_TYPES)."""
    if not isinstance(row, dict):
        return f"a row must be a JSON object, found {type(row).__name__}"
    if not any(k in row for k in ("round", "epoch")):
        return "key 'round' (or 'epoch') is missing"
    for key in ("round", "epoch"):
        if key in row and row[key] is None:
            return f"key {key!r}: expected an integer >= 0, found null"
    for key, (ok, expected) in _ROW_TYPES.items():
        if row.get(key) is not None and not ok(row[key]):
            return f"key {key!r}: expected {expected}, found {json.dumps(row[key])[:40]}"
    return None
