"""One federated run on any transport: prepare the run directory, build the federation, run the
server loop, save the final model. Both engines (in-process and Flower) run this function."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedpose.config import Config, ConfigError
from fedpose.data.partition import client_statistics
from fedpose.engine.federation import build_federation
from fedpose.engine.local import LocalTransport
from fedpose.engine.secure_local import SecureLocalTransport
from fedpose.fl.secure import needs_sketch
from fedpose.fl.server import FederatedServer
from fedpose.model.io import MODEL_FILE, save_model
from fedpose.provenance import runtime_info


def prepare_run_dir(cfg: Config, resume: bool) -> Path:
    """The run's directory with its config.json; a fresh start clears the previous results."""
    run_dir = cfg.run_dir
    if not resume and run_dir.exists():
        for stale in ("metrics.jsonl", "checkpoints", MODEL_FILE):
            p = run_dir / stale
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(
        json.dumps({**cfg.to_dict(), "runtime": runtime_info()}, indent=2)
    )
    return run_dir


def local_transport(federation):
    """The in-process transport; under `fed.secure` the sites keep their updates (secure_local)."""
    transport = LocalTransport(federation)
    fed = federation.cfg.fed
    if not fed.secure:
        return transport
    width = fed.sketch_width if needs_sketch(federation.strategy) else None
    return SecureLocalTransport(transport, federation.layout, width, fed.sketch_secret)


def run_federation(
    cfg: Config,
    resume: bool = False,
    console: Console | None = None,
    transport_factory=None,
    force: bool = False,
) -> FederatedServer:
    """Run (or resume) one federated experiment; returns the finished server.

    transport_factory(federation) -> Transport: how the server reaches the clients (default: the
    in-process LocalTransport; the Flower ServerApp passes its FlowerTransport).
    Nothing in the run directory changes until the config, the data and the checkpoint have been
    checked, so a failed start leaves the previous run as it was. `resume` without a checkpoint
    starts over; `force` resumes from a checkpoint of another method, seed or config.
    """
    console = console or Console()
    cfg.validate()
    if transport_factory is None and cfg.fed.dp_epsilon > 0:
        raise ConfigError(
            "fed.dp_epsilon: client-side differential privacy runs on the Flower "
            "engine only (Flower's LocalDpMod on each SuperNode)"
        )
    federation = build_federation(cfg)
    transport = (transport_factory or local_transport)(federation)
    server = FederatedServer(
        cfg,
        federation.initial_weights(),
        federation.layout,
        federation.strategy,
        transport,
        federation.client_sizes,
        evaluate=federation.evaluate,
        run_dir=cfg.run_dir,
    )
    resumed = False
    if resume:
        resumed, warnings = server.load_checkpoint(force=force)
        for warning in warnings:
            console.print(f"warning: {warning}", markup=False, highlight=False)
        console.print(
            f"resumed {cfg.name} at round {server.state.round}"
            if resumed
            else f"{cfg.name}: no checkpoint yet, starting over"
        )
    run_dir = prepare_run_dir(cfg, resumed)
    stats = client_statistics(federation.train_records, federation.parts)
    (run_dir / "clients.json").write_text(json.dumps(stats, indent=2, default=str))
    with Progress(
        TextColumn(f"[bold]{cfg.name}[/] {cfg.fed.method}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task("rounds", total=cfg.fed.rounds, completed=server.state.round, info="")

        def show(done: int, record: dict) -> None:
            for client, reason in record.get("rejected", {}).items():
                console.print(
                    f"round {done}: rejected client {client}: {reason}",
                    markup=False,
                    highlight=False,
                )
            info = f"loss {record['train_loss']:.5f}" if record.get("train_loss") else ""
            if record.get("pck_mean") is not None:
                info += f"  PCK {record['pck_mean']:.1f}%"
            bar.update(task, completed=done, info=info)

        server.run(progress=show)
    save_model(run_dir / MODEL_FILE, server.weights, cfg, federation.skeleton)
    return server
