"""The in-process engine: every client trains in this process, one after another, on the
simulated clock. It is the embedded default and the reference the Flower engine must match."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedpose.config import Config
from fedpose.data.partition import client_statistics
from fedpose.engine.federation import Federation, build_federation
from fedpose.fl.client import local_train
from fedpose.fl.messages import TrainReply, TrainRequest
from fedpose.fl.server import FederatedServer
from fedpose.train import save_model


class LocalTransport:
    """Holds each client's request until the server asks for the reply, then trains it.

    Training lazily at `receive` keeps memory flat and gives the same result as training at
    `send`, because a request carries everything the client needs. A client that raises is
    reported as a failed reply, never as a crash of the server.
    """

    def __init__(self, federation: Federation):
        self.fed = federation
        self.requests: dict[int, TrainRequest] = {}
        self.client_states: dict[int, dict] = {}

    def send(self, request: TrainRequest) -> None:
        self.requests[request.client_id] = request

    def receive(self, client_id: int) -> TrainReply:
        request = self.requests.pop(client_id)
        f = self.fed
        try:
            reply, state = local_train(
                f.model, f.client_dataset(client_id), request,
                self.client_states.get(client_id, {}), f.cfg, f.strategy.client_rule, f.layout,
                f.device,
            )
        except Exception as e:  # noqa: BLE001 - any client failure must not stop the federation
            return TrainReply(client_id=client_id, version=request.version,
                              error=f"client crashed: {type(e).__name__}: {e}")
        self.client_states[client_id] = state
        return reply

    def state_dict(self) -> dict:
        return {"client_states": self.client_states}

    def load_state_dict(self, state: dict) -> None:
        self.client_states = state.get("client_states", {})


def prepare_run_dir(cfg: Config, resume: bool) -> Path:
    run_dir = cfg.run_dir
    if not resume and run_dir.exists():
        for stale in ("metrics.jsonl", "checkpoints"):
            p = run_dir / stale
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    return run_dir


def run_local(cfg: Config, resume: bool = False, console: Console | None = None,
              transport_factory=None) -> FederatedServer:
    """Run (or resume) one federated experiment; returns the finished server."""
    console = console or Console()
    run_dir = prepare_run_dir(cfg, resume)
    federation = build_federation(cfg)
    stats = client_statistics(federation.train_records, federation.parts)
    (run_dir / "clients.json").write_text(json.dumps(stats, indent=2, default=str))
    transport = (transport_factory or LocalTransport)(federation)
    server = FederatedServer(cfg, federation.initial_weights(), federation.layout,
                             federation.strategy, transport, federation.client_sizes,
                             evaluate=federation.evaluate, run_dir=run_dir)
    if resume:
        server.load_checkpoint()
        console.print(f"resumed {cfg.name} at round {server.state.round}")
    with Progress(TextColumn(f"[bold]{cfg.name}[/] {cfg.fed.method}"), BarColumn(),
                  MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task("rounds", total=cfg.fed.rounds, completed=server.state.round, info="")

        def show(done: int, record: dict) -> None:
            info = f"loss {record['train_loss']:.5f}" if record.get("train_loss") else ""
            if record.get("pck_mean") is not None:
                info += f"  PCK {record['pck_mean']:.1f}%"
            bar.update(task, completed=done, info=info)

        server.run(progress=show)
    save_model(run_dir / "model.pt", server.weights, cfg, federation.skeleton)
    return server
