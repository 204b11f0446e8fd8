"""One run, from the config to the saved model: the lifecycle every engine, tool and face uses.

    prepare      check_config: the config's values and every registry's names, once; then
                 the engine's own conditions. Nothing is written yet.
    server side  build_server_side: the seeded model, its layout, the strategy (no data).
    client side  the engine's `prepare`: in-process, the records, the partition and the
                 datasets (unreadable data fails here); Flower: the central test split, if asked.
    checkpoint   with resume, read (and checked) before the run folder is touched.
    run folder   claim (fedpose.run_dir): links refused, a lock for the whole run, another
                 command's folder refused; prepare_run_dir: the one call that writes it first
                 (a write tried, stale results moved aside, config.json).
    rounds       the engine starts its transport, clients.json is written, FederatedServer runs.
    finish       the model file, then the engine's own outputs (Flower: privacy.json).

A RunObserver (fl/observer.py) watches all of it: progress bars, timing, benchmarks.
`engine/runner.py: run_federation` is the in-process engine's face of it,
`engine/flower_server.py: run_flower_server` the Flower ServerApp's; centralized training
(train.py) uses the same steps around its epoch loop.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from fedpose.config import Config, ConfigError
from fedpose.data import dataset_problem
from fedpose.data.partition import partition_problem
from fedpose.engine.federation import ServerSide, build_server_side
from fedpose.fl.observer import RunObserver
from fedpose.fl.secure import secure_config_problems
from fedpose.fl.selection import selection_problem
from fedpose.fl.server import FederatedServer, Transport, read_checkpoint
from fedpose.fl.strategies import method_problem
from fedpose.model.io import MODEL_FILE, run_identity, save_model
from fedpose.provenance import runtime_info
from fedpose.run_dir import claim, write_file
from fedpose.run_dir import start as start_run_dir

CLIENTS_FILE = "clients.json"


# ----------------------------------------------------------------------------- prepare
def check_config(cfg: Config) -> Config:
    """Validate a run's config once, before anything is written: its own values
    (Config.validate) and the names each registry owns (strategies, datasets, partitions,
    selection policies). ConfigError names the key, the value and what is allowed."""
    cfg.validate()
    for problem in (
        dataset_problem(cfg.data.dataset),
        method_problem(cfg.fed.method),
        partition_problem(cfg.fed.partition),
        selection_problem(cfg.fed.selection),
        *secure_config_problems(cfg.fed),
    ):
        if problem:
            raise ConfigError(problem)
    return cfg


def prepare_run_dir(cfg: Config, resume: bool, command: str = "run") -> Path:
    """Start writing the run's folder, claimed by fedpose.run_dir.claim: check that it can be
    written, then (a fresh start, `resume` false) move the previous results aside, record the
    command that made it and write config.json. The one call that touches the run folder before
    the rounds, after every other check has passed."""
    config_json = json.dumps({**cfg.to_dict(), "runtime": runtime_info()}, indent=2)
    return start_run_dir(cfg.run_dir, command, resume, config_json)


def client_row(client: int, site: str, samples: int, test_samples: int, **extra) -> dict:
    """One client's line of clients.json, the same shape on every engine: its id, its site (or
    partition), its training and test records, then engine-specific extras (Flower: its node;
    in-process: its records' attribute counts)."""
    return {
        "client": client,
        "site": site,
        "samples": samples,
        "test_samples": test_samples,
        **extra,
    }


# ----------------------------------------------------------------------------- engines
class Engine:
    """Where the clients are. The lifecycle calls `check`, `prepare` (before the run folder is
    touched), `start` (after), then runs the rounds over `transport`, and `finish`."""

    transport: Transport
    command = "run"  # the command its run folders are recorded as made by (fedpose.run_dir)

    def check(self, cfg: Config) -> None:
        """The engine's own conditions on the config (ConfigError)."""

    def prepare(self, cfg: Config, server: ServerSide) -> None:
        """Load what the engine needs before anything is written (data that may be bad)."""

    def start(self, run_dir: Path, resumed: bool, observer: RunObserver) -> None:
        """Set up `transport` (and reach the clients) in the claimed run folder; `resumed`: a
        checkpoint is about to be restored."""
        raise NotImplementedError

    def client_sizes(self) -> list[int]:
        raise NotImplementedError

    def clients(self) -> list[dict]:
        """clients.json: one client_row per client."""
        raise NotImplementedError

    def evaluate(self, weights: dict[str, torch.Tensor], version: int) -> dict:
        """The metrics of the global model `weights` after `version` rounds."""
        raise NotImplementedError

    def finish(self, cfg: Config, run_dir: Path, server: FederatedServer) -> None:
        """The engine's own outputs once the model is saved."""


@contextmanager
def _long_lived_objects_frozen() -> Iterator[Callable[[int, dict], None]]:
    """A hook for the end of each round that, after the first one, freezes the objects that
    exist (gc.freeze): the records, the datasets, the model and the modules the first round
    imported all live as long as the run, and the cyclic collector need no longer walk them at
    every full collection (a few hundred thousand objects for the 10^4 records of `bench sim` at
    K = 1000: 0.2 to 0.6 s each time on a loaded 2-core machine). No collection first: in a
    process that holds much else (a test session, a notebook) a full one costs 0.3 s, more than
    a short run's whole round; what garbage is frozen waits for the run's end. Reference
    counting frees objects as before; the run's end hands them all back to the collector."""
    first = [True]

    def after_round(_done: int, _record: dict) -> None:
        if first:
            first.clear()
            gc.freeze()

    try:
        yield after_round
    finally:
        gc.unfreeze()


# ----------------------------------------------------------------------------- the lifecycle
def run_lifecycle(
    cfg: Config,
    engine: Engine,
    *,
    resume: bool = False,
    force: bool = False,
    observer: RunObserver | None = None,
) -> FederatedServer:
    """Run (or resume) one federated run on `engine`; returns the finished server.

    Nothing in the run folder changes until the config, the data and the checkpoint have been
    checked, so a failed start leaves the previous run as it was. `resume` without a checkpoint
    starts over; `force` resumes from a checkpoint of another method, seed or config.
    """
    observer = observer or RunObserver()
    check_config(cfg)
    engine.check(cfg)
    server_side = build_server_side(cfg)
    engine.prepare(cfg, server_side)
    identity = run_identity(cfg.to_dict())
    # the folder is checked and locked before its checkpoint is read, for the whole run: a
    # second run of the same folder stops here, and nothing is read or written through a link
    with claim(cfg.run_dir, cfg.out_dir, engine.command, force=force):
        return _run_claimed(cfg, engine, server_side, identity, resume, force, observer)


def _run_claimed(
    cfg: Config,
    engine: Engine,
    server_side: ServerSide,
    identity: dict[str, str],
    resume: bool,
    force: bool,
    observer: RunObserver,
) -> FederatedServer:
    payload = None
    if resume:
        payload, warnings = read_checkpoint(
            cfg.run_dir,
            identity,
            force,
            weights=server_side.initial_weights(),
            mode=cfg.fed.mode,
        )
        for warning in warnings:
            observer.message(f"warning: {warning}")
    run_dir = prepare_run_dir(cfg, payload is not None, engine.command)
    try:
        engine.start(run_dir, payload is not None, observer)
        write_file(run_dir / CLIENTS_FILE, json.dumps(engine.clients(), indent=2, default=str))
        server = FederatedServer(
            cfg.fed,
            cfg.system,
            server_side.initial_weights(),
            server_side.layout,
            server_side.strategy,
            engine.transport,
            engine.client_sizes(),
            evaluate=lambda weights: engine.evaluate(weights, server.state.round),
            run_dir=run_dir,
            seed=cfg.seed,
            batch_size=cfg.train.batch_size,
            identity=identity,
            observer=observer,
            track=cfg.track,
        )
        if payload is not None:
            server.restore(payload)
            observer.message(f"resumed {cfg.name} at round {server.state.round}")
        elif resume:
            observer.message(f"{cfg.name}: no checkpoint yet, starting over")
        observer.started(server)
        with _long_lived_objects_frozen() as after_round:
            server.run(after_round)
        save_model(run_dir / MODEL_FILE, server.weights, cfg, server_side.skeleton)
        engine.finish(cfg, run_dir, server)
        observer.finished(server)
    finally:
        observer.closed()
    return server
