"""Independent runs in parallel worker processes, one thread each.

Seeds of a comparison share nothing, so they scale across cores as separate processes; one
intra-op thread per process keeps them from fighting over the cores (and keeps each run's
numbers those of a single-threaded run, whatever the parallelism). A job is a library function
and its arguments, run in a fresh (spawned) interpreter whose output goes to the job's log.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@dataclass
class Job:
    name: str
    target: Callable[..., int]  # a module-level function (picklable); returns an exit code
    args: tuple  # its arguments (picklable)
    log: Path  # stdout and stderr of the worker

    def run_here(self) -> int:
        """The job in this process, output and all (what a worker runs)."""
        return int(self.target(*self.args) or 0)


def _worker(job: Job) -> None:
    """A worker process: everything it prints, also below Python, goes to the job's log."""
    with open(job.log, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        code = job.run_here()
    except BaseException:  # a crash is the job's result, with its traceback in the log
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


@contextmanager
def _single_thread_env() -> Iterator[None]:
    """A spawned interpreter takes the environment of the moment it starts: its math libraries
    read the thread counts before any of fedpose's code runs."""
    saved = {k: os.environ.get(k) for k in SINGLE_THREAD}
    os.environ.update(SINGLE_THREAD)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_jobs(
    jobs: list[Job],
    workers: int,
    on_done: Callable[[Job, int, float], None] | None = None,
    on_tick: Callable[[list[Job]], None] | None = None,
) -> dict[str, int]:
    """Run every job in a worker process, at most `workers` at once; exit codes by job name.
    `on_done(job, exit code, seconds)` is called as each one finishes, `on_tick(the jobs
    running)` every poll (for progress shown meanwhile)."""
    context = multiprocessing.get_context("spawn")
    queue = list(jobs)
    running: list[tuple[Job, multiprocessing.process.BaseProcess, float]] = []
    codes: dict[str, int] = {}
    try:
        while queue or running:
            while queue and len(running) < max(workers, 1):
                job = queue.pop(0)
                job.log.parent.mkdir(parents=True, exist_ok=True)
                proc = context.Process(target=_worker, args=(job,), name=f"fedpose {job.name}")
                with _single_thread_env():
                    proc.start()
                running.append((job, proc, time.perf_counter()))
            time.sleep(0.2)
            if on_tick:
                on_tick([job for job, *_ in running])
            for item in list(running):
                job, proc, started = item
                if proc.is_alive():
                    continue
                proc.join()
                running.remove(item)
                codes[job.name] = proc.exitcode if proc.exitcode is not None else 1
                if on_done:
                    on_done(job, codes[job.name], time.perf_counter() - started)
    finally:
        for _, proc, _ in running:  # interrupted: no orphaned workers
            proc.terminate()
            proc.join()
    return codes
