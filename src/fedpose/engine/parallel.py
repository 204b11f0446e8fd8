"""Independent runs in parallel worker processes, one thread each.

Seeds of a comparison share nothing, so they scale across cores as separate processes; one
intra-op thread per process keeps them from fighting over the cores (and keeps each run's
numbers those of a single-threaded run, whatever the parallelism).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@dataclass
class Job:
    name: str
    args: list[str]  # fedpose command-line arguments, e.g. ["run", "cfg.toml", "-c", "seed=1"]
    log: Path  # stdout and stderr of the worker


def run_jobs(
    jobs: list[Job],
    workers: int,
    on_done: Callable[[Job, int, float], None] | None = None,
    on_tick: Callable[[list[Job]], None] | None = None,
) -> dict[str, int]:
    """Run every job as `python -m fedpose.cli ARGS`, at most `workers` at once; exit codes by
    job name. `on_done(job, exit code, seconds)` is called as each one finishes, `on_tick(the
    jobs running)` every poll (for progress shown meanwhile)."""
    env = {**os.environ, **SINGLE_THREAD}
    queue = list(jobs)
    running: list[tuple[Job, subprocess.Popen, float, object]] = []
    codes: dict[str, int] = {}
    try:
        while queue or running:
            while queue and len(running) < max(workers, 1):
                job = queue.pop(0)
                job.log.parent.mkdir(parents=True, exist_ok=True)
                log = job.log.open("w")
                proc = subprocess.Popen(
                    [sys.executable, "-m", "fedpose.cli", *job.args],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
                running.append((job, proc, time.perf_counter(), log))
            time.sleep(0.2)
            if on_tick:
                on_tick([job for job, *_ in running])
            for item in list(running):
                job, proc, started, log = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                log.close()
                codes[job.name] = proc.returncode
                if on_done:
                    on_done(job, proc.returncode, time.perf_counter() - started)
    finally:
        for _, proc, _, log in running:  # interrupted: no orphaned workers
            proc.terminate()
            proc.wait()
            log.close()
    return codes
