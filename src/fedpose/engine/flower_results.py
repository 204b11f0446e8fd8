"""A Flower run's results, carried back to whoever submitted it in the run's log stream.

Flower 1.42 gives the submitter of a run its log stream (`flwr run --stream`, `flwr log`) and
its status (`flwr ls`); its artifact mechanism (`flwr pull`) needs an artifact provider that only
Flower's enterprise SuperLink has. So the ServerApp writes, besides its console lines, one
machine-readable line per result:

  fedpose-result record <JSON>                      each round's record, exactly the line
                                                    metrics.jsonl gets
  fedpose-result file <name> <i>/<n> <sha256> <b64> a file of the run folder (config.json,
                                                    clients.json, model.safetensors,
                                                    privacy.json) in base64 pieces
  fedpose-result status <completed|failed> <JSON>   the end, with the error of a failed run

`parse_results` turns a log back into those parts (`fedpose flower-pull` writes them into a
local run folder); a file whose pieces are incomplete or whose hash differs is left out and
named in `problems`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from dataclasses import dataclass, field

MARK = "fedpose-result"
CHUNK_BYTES = 48 * 1024  # raw bytes per log line (64 KiB of base64)


def record_line(record: dict) -> str:
    return f"{MARK} record {json.dumps(record)}"


def file_lines(name: str, data: bytes) -> list[str]:
    if not name or any(c in name for c in " /\\") or name.startswith("."):
        raise ValueError(f"not a plain file name: {name!r}")
    digest = hashlib.sha256(data).hexdigest()
    pieces = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
    return [
        f"{MARK} file {name} {i + 1}/{len(pieces)} {digest} {base64.b64encode(p).decode()}"
        for i, p in enumerate(pieces)
    ]


def status_line(status: str, error: str = "") -> str:
    return f"{MARK} status {status} {json.dumps({'error': error})}"


def emit(lines: list[str] | str) -> None:
    """Write result lines to the ServerApp's stdout, which Flower mirrors into the run's log;
    each line in one write, so nothing else printed can land inside it."""
    for line in [lines] if isinstance(lines, str) else lines:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


@dataclass
class PulledRun:
    records: list[dict] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    status: str = ""  # "completed" | "failed" | "" (no status line yet: still running)
    error: str = ""
    problems: list[str] = field(default_factory=list)


def parse_results(text: str) -> PulledRun:
    """The results in a run's log text (any other line is ignored)."""
    out = PulledRun()
    pieces: dict[str, dict[int, bytes]] = {}
    meta: dict[str, tuple[int, str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        at = line.find(MARK + " ")
        if at < 0:
            continue
        kind, _, rest = line[at + len(MARK) + 1 :].partition(" ")
        try:
            if kind == "record":
                out.records.append(json.loads(rest))
            elif kind == "file":
                name, part, digest, b64 = rest.split(" ")
                i, n = (int(x) for x in part.split("/"))
                pieces.setdefault(name, {})[i] = base64.b64decode(b64, validate=True)
                meta[name] = (n, digest)
            elif kind == "status":
                status, _, info = rest.partition(" ")
                out.status, out.error = status, str(json.loads(info or "{}").get("error", ""))
        except (ValueError, json.JSONDecodeError) as e:
            out.problems.append(f"log line {number}: unreadable {kind} line ({e})")
    for name, got in pieces.items():
        n, digest = meta[name]
        if sorted(got) != list(range(1, n + 1)):
            out.problems.append(f"{name}: {len(got)} of {n} pieces in the log")
            continue
        data = b"".join(got[i] for i in range(1, n + 1))
        if hashlib.sha256(data).hexdigest() != digest:
            out.problems.append(f"{name}: sha256 differs from the one the ServerApp sent")
            continue
        out.files[name] = data
    # a resumed round is logged again: the last record of each round counts, as in metrics.jsonl
    by_round = {int(r["round"]): r for r in out.records if "round" in r}
    out.records = [by_round[k] for k in sorted(by_round)]
    return out
