"""`fedpose flower-sim`: the fedpose ServerApp and ClientApp on Flower's Simulation Engine.

A `flower-superlink --simulation` on loopback (free port, private FLWR_HOME) runs the ServerApp
and, through Ray, the ClientApp for N virtual SuperNodes; `flwr run` submits the same app as a
real deployment gets, with `--federation-config num_supernodes=N`. Every virtual SuperNode has
node config `partition-id` / `num-partitions`, so it serves that partition of the Config's
federation (the partition shortcut of fedpose.engine.flower_client). The run directory is written
exactly as on the other engines. Every process started is stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from fedpose.config import Config, ConfigError
from fedpose.engine.federation import build_federation
from fedpose.engine.flower_messages import REPLY_TIMEOUT_S
from fedpose.engine.runner import prepare_run_dir
from fedpose.run_dir import check_usable
from fedpose.tools.flower_demo import (
    Deployment,
    FlowerDemoError,
    FlowerResult,
    _follow_run,
    final_weights,
    tail,
    write_app_dir,
)


@dataclass
class SimulationResult:
    flower: FlowerResult
    peak_rss_bytes: int  # largest sum of resident memory over the SuperLink's process tree


def run_flower_simulation(
    cfg: Config,
    supernodes: int,
    console: Console,
    work_dir: Path | None = None,
    timeout: float = 3600.0,
    cpus_per_client: int = 1,
    reply_timeout: float = REPLY_TIMEOUT_S,
    connect_timeout: float = 600.0,
) -> SimulationResult:
    """Run `cfg` on `supernodes` virtual SuperNodes of Flower's Simulation Engine.
    connect_timeout: how long the ServerApp waits for every virtual SuperNode to answer its
    first message; each answer is a ClientApp call scheduled by Ray, so at hundreds of clients
    this takes minutes on a small machine."""
    if cfg.fed.num_clients != supernodes:
        raise ConfigError(
            f"{supernodes} virtual SuperNodes for fed.num_clients={cfg.fed.num_clients}"
        )
    # the ServerApp claims the folder; refused here already, before any process starts
    check_usable(cfg.run_dir, cfg.out_dir, "run")  # as prepare_run_dir records it
    with console.status("checking the config and preparing the data"):
        # here, before any process starts: a bad config fails fast, and the Ray workers do not
        # all generate a missing data set at once
        build_federation(cfg)
    own_dir = work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="fedpose-flower-sim-")) if own_dir else Path(work_dir)
    deployment = Deployment(work_dir, console)
    ok = False
    sampler = _MemorySampler()
    try:
        t0 = time.monotonic()
        with console.status("starting the simulation SuperLink"):
            deployment.start_superlink(simulation=True)
        sampler.start(deployment.processes[0].popen.pid)
        started = time.monotonic() - t0
        console.print(
            f"simulation SuperLink on 127.0.0.1:{deployment.superlink_port} ({started:.1f} s)"
        )
        app_dir = write_app_dir(
            work_dir / "app", cfg, reply_timeout, connect_timeout=float(connect_timeout)
        )
        prepare_run_dir(cfg, resume=False)  # also removes a stale model file
        t1 = time.monotonic()
        federation = f"num_supernodes={supernodes} client_resources_num_cpus={cpus_per_client}"
        status_row = _follow_run(
            deployment, app_dir, cfg, console, timeout, ("--federation-config", federation)
        )
        run_seconds = time.monotonic() - t1
        if status_row.get("status") != "finished:completed":
            raise FlowerDemoError(
                f"Flower run {status_row.get('run-id')} ended {status_row.get('status')}: "
                f"{status_row.get('status-details')}\n{tail(deployment.logs / 'flwr-run.log')}"
                f"\n{tail(deployment.logs / 'superlink.log')}"
            )
        ok = True
        result = FlowerResult(
            final_weights(cfg.run_dir),
            cfg.run_dir,
            status_row,
            {"start": started, "run": run_seconds},
        )
        return SimulationResult(result, sampler.peak)
    finally:
        sampler.stop()
        with console.status("stopping the Flower processes"):
            deployment.stop()
        if own_dir and ok:
            shutil.rmtree(work_dir, ignore_errors=True)
        elif not ok:
            console.print(f"Flower logs kept in {deployment.logs}")


class _MemorySampler:
    """Samples, every 0.2 s, the resident memory summed over a process and its descendants
    (the SuperLink, its ServerApp/simulation process, Ray's workers) and keeps the peak."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, root: int) -> None:
        self._thread = threading.Thread(target=self._run, args=(root,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self, root: int) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, tree_rss(root))


def tree_rss(root: int) -> int:
    """Resident bytes of `root` and every process descended from it (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            resident = int((entry / "statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        rss[pid] = resident * page
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total
