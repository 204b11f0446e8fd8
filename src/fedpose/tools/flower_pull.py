"""`fedpose flower-pull RUN_ID [SUPERLINK]`: a Flower run's results, from its log stream into a
local run folder.

Runs `flwr ls` (the run's status) and `flwr log --show` (its log) with the caller's Flower
configuration, and writes what the ServerApp sent (engine/flower_results.py): config.json,
clients.json, metrics.jsonl, the final model.safetensors (when the run sent it) and the
tracking outputs the run's config asks for (metrics.csv, tensorboard/), replayed from the same
records. Nothing is written outside the output folder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fedpose.config import ConfigError, config_from_dict
from fedpose.engine.flower_results import PulledRun, parse_results
from fedpose.files import write_atomically
from fedpose.metrics.log import METRICS_FILE
from fedpose.metrics.track import replay


class PullError(ValueError):
    pass


@dataclass
class PullResult:
    out: Path
    status: str  # flwr ls's status, e.g. "finished:completed"
    pulled: PulledRun


def flwr_command(*args: str, timeout: float = 120.0) -> str:
    """stdout of `flwr ARGS`; PullError with its output when it fails."""
    if shutil.which("flwr") is None:
        raise PullError("flwr: command not found (activate the environment fedpose is in)")
    try:
        done = subprocess.run(
            ["flwr", *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise PullError(f"flwr {' '.join(args)}: no answer within {timeout:.0f} s") from None
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise PullError(f"flwr {' '.join(args)} failed: {' / '.join(last)}")
    return done.stdout


def run_status(run_id: int, superlink: str | None, flwr=None) -> str:
    flwr = flwr or flwr_command
    args = ["ls", *([superlink] if superlink else []), "--run-id", str(run_id)]
    text = flwr(*args, "--format", "json")
    try:
        rows = json.loads(text).get("runs", [])
    except (json.JSONDecodeError, AttributeError):
        raise PullError(f"flwr ls gave no JSON: {text.strip()[:200]}") from None
    for row in rows:
        if str(row.get("run-id")) == str(run_id):
            return str(row.get("status", ""))
    raise PullError(f"the SuperLink knows no run {run_id}")


def pull_run(
    run_id: int,
    superlink: str | None,
    out: Path | None = None,
    force: bool = False,
    flwr=None,
) -> PullResult:
    """Write run `run_id`'s results into `out` (default runs/flower-<run_id>).
    flwr(*args) -> stdout: how `flwr` is called (default: the `flwr` on PATH)."""
    flwr = flwr or flwr_command
    status = run_status(run_id, superlink, flwr)
    log = flwr("log", str(run_id), *([superlink] if superlink else []), "--show")
    pulled = parse_results(log)
    if "config.json" not in pulled.files and not pulled.records:
        raise PullError(
            f"run {run_id} ({status}) has no fedpose results in its log: not a fedpose run, "
            f"or it failed before it began" + (f" ({pulled.error})" if pulled.error else "")
        )
    out = Path(out) if out is not None else Path("runs") / f"flower-{run_id}"
    write_pulled(pulled, out, force)
    return PullResult(out, status, pulled)


def write_pulled(pulled: PulledRun, out: Path, force: bool = False) -> None:
    """The pulled files and records as a run folder (refuses a folder that holds a run, unless
    force)."""
    if (out / "config.json").exists() and not force:
        raise PullError(f"{out}: already holds a run; give another --out, or --force")
    out.mkdir(parents=True, exist_ok=True)
    for name, data in pulled.files.items():
        write_atomically(out / name, lambda tmp, data=data: tmp.write_bytes(data))
    lines = "".join(json.dumps(r) + "\n" for r in pulled.records)
    write_atomically(out / METRICS_FILE, lambda tmp: tmp.write_text(lines))
    if "config.json" in pulled.files:
        values = json.loads(pulled.files["config.json"])
        values.pop("runtime", None)
        try:
            track = config_from_dict(values).track
        except ConfigError as e:  # a config of another fedpose version: no tracking outputs
            pulled.problems.append(f"config.json: {e}; metrics.csv/tensorboard not written")
            track = []
        if track:
            replay(out, track, pulled.records)
