"""`fedpose flower-demo`: one federation on real Flower processes, then in-process, compared.

Starts a SuperLink and N SuperNodes on loopback (free ports, a private FLWR_HOME, each process in
its own process group so that stopping it also stops the SuperExec/ServerApp/ClientApp processes
it spawned), submits the fedpose Flower app with `flwr run`, follows the run through the run
directory and `flwr ls`, stops every process it started (also on Ctrl-C, SIGTERM or failure),
runs the same Config in-process and reports the largest weight difference.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedpose.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    merge_dicts,
    parse_overrides,
)
from fedpose.engine.federation import build_federation
from fedpose.engine.flower_client import proc_stat
from fedpose.engine.flower_messages import CONNECT_TIMEOUT_S, REPLY_TIMEOUT_S, run_config_toml
from fedpose.engine.runner import prepare_run_dir, run_federation
from fedpose.fl.server import CHECKPOINT_CLASSES
from fedpose.metrics.log import read_jsonl
from fedpose.model.io import MODEL_FILE, checkpoint_paths, read_checkpoint, read_model
from fedpose.run_dir import check_usable
from fedpose.tools import ToolError

CONNECTION = "fedpose-loopback"  # the SuperLink connection name in $FLWR_HOME/config.toml
AGREEMENT = 1e-5  # largest weight difference the demo still calls agreement
SUPERLINK_BINARIES = ("flower-superlink", "flower-supernode", "flwr", "flower-superexec")

# A federation small enough for a laptop or CI in well under a minute of training.
TINY: dict = {
    "name": "flower-demo",
    "out_dir": "runs",
    "data": {
        "dataset": "synth-arm",
        "root": "data/synth-arm-tiny64",
        "synth_n": 64,
        "synth_size": 64,
        "generate": True,  # the demo renders its own tiny set on first use
        "input_size": 64,
        "test_fraction": 0.25,
    },
    "model": {"depth": 18, "width": 8, "deconv_filters": 32},
    "train": {"batch_size": 8, "flip_test": False, "device": "cpu"},
    "fed": {
        "method": "fedgh",
        "local_steps": 2,
        "partition": "dirichlet",
        "partition_attr": "view",
        "dirichlet_alpha": 1.0,
    },
}


class FlowerDemoError(ToolError):
    """A Flower process failed, did not start in time, or the run did not complete."""


# ----------------------------------------------------------------------------- configuration
def demo_config(
    config_path: str | None,
    supernodes: int,
    rounds: int,
    overrides: list[str],
    default_name: str = "flower-demo",
) -> Config:
    """The demo's Config: the file (or the tiny default, named `default_name` unless an override
    names it) + overrides, one client per SuperNode, and absolute paths (the Flower processes do
    not share this process's working directory)."""
    if supernodes < 1 or rounds < 1:
        raise ConfigError("--supernodes and --rounds must be at least 1")
    # the demo's own settings go last, as overrides: a config is never changed after it loads
    overrides = [*overrides, f"fed.num_clients={supernodes}", f"fed.rounds={rounds}"]
    if config_path is None:
        tiny = {**TINY, "name": default_name}
        cfg = config_from_dict(merge_dicts(tiny, parse_overrides(overrides)))
    else:
        cfg = load_config(config_path, overrides)
    return absolute_paths(cfg)


def absolute_paths(cfg: Config) -> Config:
    cfg = copy.deepcopy(cfg)
    cfg.out_dir = str(Path(cfg.out_dir).resolve())
    d = cfg.data
    for attr in ("root", "train_root", "test_root", "ann", "test_ann", "headboxes"):
        if getattr(d, attr):
            setattr(d, attr, str(Path(getattr(d, attr)).resolve()))
    if cfg.model.pretrained:
        cfg.model.pretrained = str(Path(cfg.model.pretrained).resolve())
    return cfg


def renamed(cfg: Config, name: str) -> Config:
    cfg = copy.deepcopy(cfg)
    cfg.name = name
    return cfg


def write_app_dir(
    app_dir: Path,
    cfg: Config,
    reply_timeout: float = REPLY_TIMEOUT_S,
    **settings: str | bool | float,
) -> Path:
    """A minimal Flower app: only a pyproject.toml whose components live in the installed
    fedpose package, so the bundle `flwr run` uploads stays tiny. The Config travels in the run
    config as JSON; settings are other run config keys (see run_config_toml)."""
    app_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "fedpose-flower"',
        f'version = "{package_version("fedpose")}"',
        'description = "fedpose on Flower; the app code is the installed fedpose package"',
        f'dependencies = ["fedpose", "flwr=={package_version("flwr")}"]',
        "",
        "[tool.flwr.app]",
        'publisher = "fedpose"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "fedpose.engine.flower_server:server_app"',
        'clientapp = "fedpose.engine.flower_client:client_app"',
        "",
        "[tool.flwr.app.config]",
        run_config_toml(cfg, reply_timeout=float(reply_timeout), **settings),
    ]
    (app_dir / "pyproject.toml").write_text("\n".join(lines))
    return app_dir


# ----------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


APP_THREADS = "1"  # OMP_NUM_THREADS of the Flower processes when the user sets none


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            # offline machines: no `uv sync` per run (it fails, and `flwr run` still exits 0)
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            # SuperExec looks for new app tasks every 1 s by default; every message starts one
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
            "PYTHONUNBUFFERED": "1",
        }
    )
    # a SuperLink, SuperNodes and their app processes share the cores: one intra-op thread each
    # unless the user says otherwise (two busy processes with two threads on two cores run
    # several times slower than one)
    env.setdefault("OMP_NUM_THREADS", APP_THREADS)
    # SuperLink and SuperNodes start flower-superexec / flwr-serverapp from PATH: this
    # interpreter's environment must come first
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@dataclass
class Started:
    name: str
    popen: subprocess.Popen
    log: Path


@dataclass
class Deployment:
    """A SuperLink and SuperNodes on loopback; `stop` ends every process it started."""

    work_dir: Path
    console: Console
    processes: list[Started] = field(default_factory=list)
    superlink_port: int = 0

    def __post_init__(self) -> None:
        self.flwr_home = self.work_dir / "flwr-home"
        self.logs = self.work_dir / "logs"
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = flower_env(self.flwr_home)
        missing = [b for b in SUPERLINK_BINARIES if shutil.which(b, path=self.env["PATH"]) is None]
        if missing:
            raise FlowerDemoError(
                f"{', '.join(missing)} not found on PATH: install the pinned "
                f"Flower (pip install 'flwr==1.42.0') into this environment"
            )

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Started:
        log = self.logs / f"{name}.log"
        with open(log, "wb") as out:
            # a session of its own: Ctrl-C in the terminal reaches only us, and one killpg
            # stops the process together with the SuperExec and app processes it spawns
            popen = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**self.env, **(env or {})},
                cwd=self.work_dir,
                start_new_session=True,
            )
        started = Started(name, popen, log)
        self.processes.append(started)
        return started

    def start_superlink(self, env: dict[str, str] | None = None, simulation: bool = False) -> None:
        """simulation: Flower's Simulation Engine runs the ClientApps on virtual SuperNodes
        inside the SuperLink's runtime (Ray), instead of waiting for real SuperNodes."""
        self.superlink_port = free_port()
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.superlink_port}"\ninsecure = true\n'
        )
        link = self.start(
            "superlink",
            [
                "flower-superlink",
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.superlink_port),
                *(["--simulation"] if simulation else []),
            ],
            env=env,
        )
        deadline = time.monotonic() + 60
        while not _listening(self.superlink_port):
            self.check_alive()
            if time.monotonic() > deadline:
                raise FlowerDemoError(f"SuperLink not listening after 60 s; see {link.log}")
            time.sleep(0.1)

    def start_supernodes(
        self,
        n: int,
        node_configs: list[str] | None = None,
        envs: list[dict[str, str]] | None = None,
    ) -> None:
        """n SuperNodes, by default serving partitions 0 … n-1; node_configs (one
        --node-config string each) point them at their own data instead."""
        for i in range(n):
            node_config = (
                node_configs[i] if node_configs else f"partition-id={i} num-partitions={n}"
            )
            self.start(
                f"supernode-{i}",
                [
                    "flower-supernode",
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{self.superlink_port}",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    node_config,
                ],
                env=envs[i] if envs else None,
            )

    def connected_nodes(self) -> int:
        text = (self.logs / "superlink.log").read_text(errors="replace")
        return len(re.findall(r"Activated node_id=\d+", text))

    def check_alive(self) -> None:
        for p in self.processes:
            if p.name != "flwr-run" and p.popen.poll() is not None:
                raise FlowerDemoError(
                    f"{p.name} exited with code {p.popen.returncode}:\n{tail(p.log)}"
                )

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["flwr", *args],
            env=self.env,
            cwd=self.work_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop(self) -> None:
        stop_groups([p.popen for p in self.processes])
        self.processes.clear()


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop_groups(popens: list[subprocess.Popen], grace: float = 10.0) -> None:
    """Stop the processes we started and everything they spawned, then reap our children.

    Each was started in a session of its own (process group id = its PID), but Flower starts
    its SuperExec in yet another session, and the ServerApp under it: so first collect the
    process groups of all descendants, then SIGTERM every group, wait, SIGKILL what is left.
    """
    table = _processes()
    groups = {p.pid for p in popens}
    for popen in popens:
        groups |= {table[pid][1] for pid in _descendants(popen.pid, table)}
    for pgid in groups:
        _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _live_groups(groups):
        time.sleep(0.1)
    for pgid in _live_groups(groups):
        _signal_group(pgid, signal.SIGKILL)
    for popen in popens:
        try:
            popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group id, state) from /proc; empty where there is none."""
    table = {}
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else []:
        if entry.name.isdigit():
            try:
                fields = proc_stat(entry.name)
                table[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[0])
            except (OSError, IndexError, ValueError):
                continue
    return table


def _descendants(pid: int, table: dict[int, tuple[int, int, str]]) -> set[int]:
    found, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, _, _) in table.items():
            if ppid == parent and child not in found:
                found.add(child)
                frontier.append(child)
    return found & table.keys()


def _live_groups(groups: set[int]) -> set[int]:
    """The groups with a member still running. Members that exited after their parent stay
    zombies until init reaps them; they no longer run and do not count."""
    table = _processes()
    if not table:  # no /proc: ask the kernel whether the group exists at all
        live = set()
        for pgid in groups:
            try:
                os.killpg(pgid, 0)
                live.add(pgid)
            except (ProcessLookupError, PermissionError):
                pass
        return live
    return {pgid for _, pgid, state in table.values() if pgid in groups and state not in "ZX"}


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so `finally` blocks stop the processes."""
    if sys.platform == "win32" or not _main_thread():
        yield
        return

    def handler(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------- one Flower run
@dataclass
class FlowerResult:
    weights: dict[str, torch.Tensor]
    run_dir: Path
    status: dict  # the run's row of `flwr ls --format json`
    seconds: dict[str, float]  # start (processes up, nodes connected), run (submit to finished)


def run_flower(
    cfg: Config,
    supernodes: int,
    console: Console,
    work_dir: Path | None = None,
    timeout: float = 3600.0,
    reply_timeout: float = REPLY_TIMEOUT_S,
    node_configs: list[str] | None = None,
    envs: list[dict[str, str]] | None = None,
) -> FlowerResult:
    """Run `cfg` on a fresh loopback deployment of `supernodes` SuperNodes; stop it after.
    node_configs / envs: per SuperNode (see Deployment.start_supernodes); envs[supernodes], when
    given, goes to the SuperLink (and so to the ServerApp)."""
    if cfg.fed.num_clients != supernodes:
        raise ConfigError(f"{supernodes} SuperNodes for fed.num_clients={cfg.fed.num_clients}")
    # the ServerApp claims the folder; refused here already, before any process starts
    check_usable(cfg.run_dir, cfg.out_dir, "run")  # as prepare_run_dir records it
    own_dir = work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="fedpose-flower-")) if own_dir else Path(work_dir)
    deployment = Deployment(work_dir, console)
    ok = False
    try:
        t0 = time.monotonic()
        with console.status("starting the SuperLink"):
            deployment.start_superlink(
                envs[supernodes] if envs and len(envs) > supernodes else None
            )
        console.print(
            f"SuperLink on 127.0.0.1:{deployment.superlink_port} ({time.monotonic() - t0:.1f} s)"
        )
        deployment.start_supernodes(supernodes, node_configs, envs)
        with console.status(f"waiting for {supernodes} SuperNodes") as status:
            deadline = time.monotonic() + CONNECT_TIMEOUT_S
            while (n := deployment.connected_nodes()) < supernodes:
                deployment.check_alive()
                if time.monotonic() > deadline:
                    raise FlowerDemoError(
                        f"only {n} of {supernodes} SuperNodes connected in "
                        f"{CONNECT_TIMEOUT_S:.0f} s; logs in {deployment.logs}"
                    )
                status.update(f"waiting for SuperNodes: {n}/{supernodes} connected")
                time.sleep(0.2)
        started = time.monotonic() - t0
        console.print(f"{supernodes} SuperNodes connected ({started:.1f} s)")
        app_dir = write_app_dir(work_dir / "app", cfg, reply_timeout)
        # no stale metrics.jsonl to mistake for progress, no stale model file for a result
        prepare_run_dir(cfg, resume=False)
        t1 = time.monotonic()
        status_row = _follow_run(deployment, app_dir, cfg, console, timeout)
        run_seconds = time.monotonic() - t1
        if status_row.get("status") != "finished:completed":
            raise FlowerDemoError(
                f"Flower run {status_row.get('run-id')} ended {status_row.get('status')}: "
                f"{status_row.get('status-details')}\n{tail(deployment.logs / 'flwr-run.log')}"
            )
        weights = final_weights(cfg.run_dir)
        ok = True
        return FlowerResult(
            weights, cfg.run_dir, status_row, {"start": started, "run": run_seconds}
        )
    finally:
        with console.status("stopping the Flower processes"):
            deployment.stop()
        if own_dir and ok:
            shutil.rmtree(work_dir, ignore_errors=True)
        elif not ok:
            console.print(f"Flower logs kept in {deployment.logs}")


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The final model a run wrote: its model file, else the last checkpoint (same weights)."""
    model_file = run_dir / MODEL_FILE
    if model_file.exists():
        return read_model(model_file)[0]
    last, _ = checkpoint_paths(run_dir / "checkpoints")
    if last.exists():
        return read_checkpoint(last, CHECKPOINT_CLASSES)[0]["weights"]
    raise FlowerDemoError(f"{run_dir}: the run wrote neither {MODEL_FILE} nor a checkpoint")


def _follow_run(
    deployment: Deployment,
    app_dir: Path,
    cfg: Config,
    console: Console,
    timeout: float,
    flwr_args: tuple[str, ...] = (),
) -> dict:
    """Submit the app, show the rounds as the ServerApp logs them, return the final status."""
    flwr_run = deployment.start(
        "flwr-run", ["flwr", "run", str(app_dir), CONNECTION, "--stream", *flwr_args]
    )
    metrics = cfg.run_dir / "metrics.jsonl"
    run_id = None
    deadline = time.monotonic() + timeout
    with Progress(
        TextColumn("[bold]Flower[/] {task.fields[state]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("rounds", total=cfg.fed.rounds, state="submitting", info="")
        while True:
            if time.monotonic() > deadline:
                raise FlowerDemoError(f"the Flower run did not finish within {timeout:.0f} s")
            deployment.check_alive()
            if run_id is None:
                found = re.search(r"Successfully started run (\d+)", flwr_run.log.read_text())
                run_id = found.group(1) if found else None
            rows = read_jsonl(metrics) if run_id else []
            info = ""
            if rows and rows[-1].get("train_loss") is not None:
                info = f"loss {rows[-1]['train_loss']:.5f}"
            bar.update(
                task,
                completed=len(rows),
                info=info,
                state=f"run {run_id}" if run_id else "submitting",
            )
            if flwr_run.popen.poll() is not None:  # the log stream ends with the run
                if run_id is None:
                    raise FlowerDemoError(f"flwr run did not start a run:\n{tail(flwr_run.log)}")
                row = _run_status(deployment, run_id)
                if row.get("status", "").startswith("finished"):
                    bar.update(task, completed=len(read_jsonl(metrics)), state=row["status"])
                    return row
            time.sleep(0.5)


def _run_status(deployment: Deployment, run_id: str) -> dict:
    # `flwr run` exits 0 even when the run failed: the SuperLink's record is what counts
    result = deployment.flwr("ls", "--run-id", run_id, "--format", "json")
    try:
        listing = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise FlowerDemoError(f"flwr ls gave no JSON:\n{result.stdout}\n{result.stderr}") from None
    for row in listing.get("runs", []):
        if str(row.get("run-id")) == run_id:
            return row
    raise FlowerDemoError(f"flwr ls does not know run {run_id}: {result.stdout}")


# ----------------------------------------------------------------------------- comparison
def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        raise ValueError(f"the two models differ in tensors: {sorted(a.keys() ^ b.keys())}")
    return max(
        (float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()), default=0.0
    )


@dataclass
class Comparison:
    max_diff: float
    flower: FlowerResult
    local_weights: dict[str, torch.Tensor]
    local_seconds: float
    local_run_dir: Path
    config: Config  # the config both engines ran


def compare_engines(
    cfg: Config,
    supernodes: int,
    console: Console,
    timeout: float = 3600.0,
    work_dir: Path | None = None,
    local_transport=None,
) -> Comparison:
    """Run `cfg` on Flower (run dir `<name>-flower`) and in-process (`<name>-local`, with
    `local_transport` as run_federation's transport_factory when given)."""
    with console.status("checking the config and preparing the data"):
        # here, before any process starts: a bad config fails fast, and concurrent ClientApps
        # do not all generate a missing data set at once
        build_federation(cfg)
    flower = run_flower(
        renamed(cfg, f"{cfg.name}-flower"), supernodes, console, work_dir, timeout=timeout
    )
    local_cfg = renamed(cfg, f"{cfg.name}-local")
    # the in-process run computes with as many threads as the ClientApps did (flower_env): a
    # different count may change the last bits of a convolution's gradient
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", APP_THREADS)))
    console.print("the same federation in-process:")
    t0 = time.monotonic()
    try:
        server = run_federation(local_cfg, console=console, transport_factory=local_transport)
    finally:
        torch.set_num_threads(threads)
    local_seconds = time.monotonic() - t0
    return Comparison(
        max_abs_diff(flower.weights, server.weights),
        flower,
        server.weights,
        local_seconds,
        local_cfg.run_dir,
        cfg,
    )
