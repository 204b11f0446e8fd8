"""The in-process engine: every client trains in this process, one after another, on the
simulated clock (engine/local.py), and evaluation is central. `run_federation` runs it through
the one run lifecycle (engine/run.py) with a progress bar; it is what `fedpose run` does."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedpose.config import Config, ConfigError
from fedpose.data.partition import client_statistics
from fedpose.engine.federation import Federation, ServerSide, build_client_side
from fedpose.engine.local import LocalTransport
from fedpose.engine.run import Engine, client_row, prepare_run_dir, run_lifecycle
from fedpose.engine.secure_local import SecureLocalTransport
from fedpose.fl.observer import RunObserver
from fedpose.fl.secure import needs_sketch
from fedpose.fl.server import FederatedServer

__all__ = [
    "ConsoleObserver",
    "InProcessEngine",
    "local_transport",
    "prepare_run_dir",
    "run_federation",
]


def local_transport(federation: Federation):
    """The in-process transport; under `fed.secure` the sites keep their updates (secure_local)."""
    transport = LocalTransport(federation)
    fed = federation.cfg.fed
    if not fed.secure:
        return transport
    width = fed.sketch_width if needs_sketch(federation.strategy) else None
    return SecureLocalTransport(transport, federation.layout, width, fed.sketch_secret)


class InProcessEngine(Engine):
    """Every client trains in this process (engine/local.py), evaluation is central.
    `transport_factory(federation)` replaces the LocalTransport (tests, benchmarks)."""

    def __init__(self, transport_factory=None):
        self.transport_factory = transport_factory
        self.federation: Federation | None = None

    def check(self, cfg: Config) -> None:
        if self.transport_factory is None and cfg.fed.dp_epsilon > 0:
            raise ConfigError(
                "fed.dp_epsilon: client-side differential privacy runs on the Flower "
                "engine only (Flower's LocalDpMod on each SuperNode)"
            )

    def prepare(self, cfg: Config, server: ServerSide) -> None:
        self.federation = Federation(cfg, server, build_client_side(cfg))

    def start(self, _run_dir: Path, _resumed: bool, observer: RunObserver) -> None:
        assert self.federation is not None
        self.transport = (self.transport_factory or local_transport)(self.federation)
        inner = getattr(self.transport, "local", self.transport)  # secure: the sites' transport
        if isinstance(inner, LocalTransport):
            inner.observer = observer
            # FedBN's sites are also scored with their own BatchNorm tensors
            self.federation.client_state = inner.client_states.get

    def client_sizes(self) -> list[int]:
        assert self.federation is not None
        return self.federation.client_sizes

    def clients(self) -> list[dict]:
        f = self.federation
        assert f is not None
        test_parts = f.test_parts
        stats = client_statistics(f.train_records, f.parts)
        return [
            client_row(
                k,
                f"partition {k}",
                s["size"],
                len(test_parts[k]),
                **{a: v for a, v in s.items() if a not in ("client", "size")},
            )
            for k, s in enumerate(stats)
        ]

    def evaluate(self, weights: dict[str, torch.Tensor], _version: int) -> dict:
        assert self.federation is not None
        return self.federation.evaluate(weights)


# ----------------------------------------------------------------------------- in-process face
class ConsoleObserver(RunObserver):
    """A progress bar of rounds on a rich Console, and the run's messages above it; outside a
    terminal (a log, `tee`), where a bar shows only at the end, one plain line per round."""

    def __init__(self, cfg: Config, console: Console):
        self.cfg = cfg
        self.console = console
        self.bar: Progress | None = None
        self.task = None
        self.label = cfg.name

    def message(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def started(self, server: FederatedServer) -> None:
        if not self.console.is_terminal:
            self.label = f"{self.cfg.name} {server.strategy.name}"
            return
        self.bar = Progress(
            TextColumn(f"[bold]{self.cfg.name}[/] {server.strategy.name}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self.bar.start()
        self.task = self.bar.add_task(
            "rounds", total=self.cfg.fed.rounds, completed=server.state.round, info=""
        )

    def round_done(self, done: int, record: dict) -> None:
        for client, reason in record.get("rejected", {}).items():
            self.message(f"round {done}: rejected client {client}: {reason}")
        info = f"loss {record['train_loss']:.5f}" if record.get("train_loss") else ""
        if record.get("pck_mean") is not None:
            info += f"  PCK {record['pck_mean']:.1f}%"
        if self.bar is not None:
            self.bar.update(self.task, completed=done, info=info)
        else:
            self.message(f"{self.label}: round {done}/{self.cfg.fed.rounds}  {info}".rstrip())

    def closed(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run_federation(
    cfg: Config,
    resume: bool = False,
    console: Console | None = None,
    transport_factory=None,
    force: bool = False,
    observer: RunObserver | None = None,
) -> FederatedServer:
    """One federated run on the in-process engine (`fedpose run`); returns the finished server.

    transport_factory(federation) -> Transport replaces the in-process LocalTransport; `observer`
    replaces the progress bar on `console`. See run_lifecycle for resume and force.
    """
    return run_lifecycle(
        cfg,
        InProcessEngine(transport_factory),
        resume=resume,
        force=force,
        observer=observer or ConsoleObserver(cfg, console or Console(emoji=False)),
    )
