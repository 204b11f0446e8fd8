"""Flower 1.42 ServerApp: fedpose's own server loop over a Flower Grid.

Nothing federated is implemented here. The ServerApp runs fedpose's run lifecycle
(engine/run.py: the same checks, server side, checkpoints and FederatedServer loop as the
in-process engine) on a `FlowerEngine`, whose `FlowerTransport` sends each selected client its
training request as a Flower Message and waits for exactly that client's reply. The ServerApp
loads no training data: it builds the initial model from the Config (seeded, as every engine
does) and learns each client's sample counts from the clients. What travels in the messages:
`engine/flower_messages.py`; the ClientApp: `engine/flower_client.py`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fedpose.config import Config
from fedpose.data import load_split
from fedpose.engine.federation import ServerSide
from fedpose.engine.flower_dp import check_dp_config, privacy_report, releases_per_client
from fedpose.engine.flower_messages import (
    CONNECT_TIMEOUT_S,
    REPLY_TIMEOUT_S,
    AppSettings,
    SiteEvaluation,
    content_to_evaluation,
    content_to_reply,
    count_correct,
    federated_metrics,
    pack_state,
    request_to_content,
    settings_from_run_config,
)
from fedpose.engine.flower_results import emit, file_lines, record_line, status_line
from fedpose.engine.flower_secagg import maybe_inspect, secure_transport
from fedpose.engine.run import CLIENTS_FILE, Engine, client_row, run_lifecycle
from fedpose.fl.messages import TrainReply, TrainRequest
from fedpose.fl.observer import RunObserver
from fedpose.fl.server import FederatedServer
from fedpose.metrics.log import read_jsonl
from fedpose.metrics.pck import score_counts
from fedpose.model.io import MODEL_FILE
from fedpose.run_dir import append_line, write_file

TIMING_FILE = "flower_timing.jsonl"
# how often the ServerApp asks the SuperLink for replies: replies are pulled at most this late
POLL_SECONDS = 0.05


# ----------------------------------------------------------------------------- transport
@dataclass
class _InFlight:
    message_id: str
    version: int
    round: int
    sent: float  # time.monotonic() when the push began (for the timeout)
    sent_wall: float  # time.time() of the same moment (to compare with the client's clock)
    push_seconds: float  # serialization + push
    request_bytes: int


@dataclass
class ClientInfo:
    """What a SuperNode said about itself when asked ("query"): its partition (simulation
    shortcut) or its site name, and how many training and test records it holds."""

    node: int
    mode: str  # "partition" | "site"
    name: str  # site name, or "partition <i>"
    partition_id: int  # -1 for a site
    num_partitions: int
    train_samples: int
    test_samples: int
    refused: str = ""  # why the node cannot take part (its data cannot be read, no records)


class FlowerTransport:
    """The server loop's Transport over a Flower Grid.

    Clients are numbered 0 … N-1: a SuperNode started with a `partition-id` serves that client;
    sites (SuperNodes with their own data) are numbered in the order of their names. Both are
    learnt once, with a "query" message, at `connect`, together with each client's sample
    counts. Flower's own sampling and reply order play no part: the server loop picks and
    orders clients, `send` pushes one message at once (so selected clients train concurrently)
    and `receive` waits for exactly that client's reply. A missing node, an error reply or a
    timeout becomes a TrainReply with `error`, which the server rejects like any failed client.
    """

    def __init__(
        self,
        grid: Grid,
        num_clients: int,
        reply_timeout: float = REPLY_TIMEOUT_S,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        timing_path: Path | None = None,
        log=print,
        follow_partitions: bool = False,
    ):
        self.grid = grid
        self.num_clients = num_clients
        # num-clients = 0: take N from the first partition SuperNode's num-partitions
        self.follow_partitions = follow_partitions
        self.reply_timeout = reply_timeout
        self.connect_timeout = connect_timeout
        self.timing_path = timing_path
        self.log = log
        self.node_of: dict[int, int] = {}  # client id -> node id
        self.clients: dict[int, ClientInfo] = {}  # client id -> what its node reported
        self.failed_at_start: dict[int, str] = {}  # client id -> why it was refused
        self.in_flight: dict[int, _InFlight] = {}
        self.failed: dict[int, TrainReply] = {}
        self.arrived: dict[str, tuple[Message, float]] = {}  # request id -> reply, time.time()

    # --------------------------------------------------------------------- discovery
    def connect(self) -> dict[int, int]:
        """Ask every SuperNode what it serves until N clients are known (or refused), or
        connect_timeout passes; number the clients; return client id -> node id."""
        deadline = time.monotonic() + self.connect_timeout
        asked: set[int] = set()
        queries: dict[str, int] = {}  # message id -> node id
        answers: dict[int, ClientInfo] = {}
        unanswerable = 0
        while (
            self.follow_partitions or len(answers) + unanswerable < self.num_clients
        ) and time.monotonic() < deadline:
            new = [n for n in self.grid.get_node_ids() if n not in asked]
            if new:
                msgs = [
                    Message(
                        RecordDict(), dst_node_id=n, message_type="query", ttl=self.connect_timeout
                    )
                    for n in new
                ]
                queries.update(zip(self.grid.push_messages(msgs), new, strict=True))
                asked.update(new)
            if queries:
                for reply in self.grid.pull_messages(list(queries)):
                    node = queries.pop(reply.metadata.reply_to_message_id, None)
                    if node is None:
                        continue
                    info = self._client_info(node, reply)
                    if info is None:
                        unanswerable += 1
                    else:
                        answers[node] = info
                        self._follow(info)
            time.sleep(POLL_SECONDS)
        self._number_clients(list(answers.values()))
        if not self.node_of:
            # nothing to train: end the run (finished:failed) instead of logging empty rounds
            raise RuntimeError(
                f"no usable SuperNode answered within {self.connect_timeout:.0f} s "
                f"(connect-timeout); {len(asked)} node(s) were asked"
            )
        missing = sorted(set(range(self.num_clients)) - set(self.clients))
        if missing:
            self.log(
                f"no SuperNode serves client(s) {missing} after "
                f"{self.connect_timeout:.0f} s: they count as failed clients"
            )
        return dict(self.node_of)

    def _follow(self, info: ClientInfo) -> None:
        """Follow mode: N is the first answer's num-partitions; sites have none, and N stays
        the config's fed.num_clients."""
        if not self.follow_partitions:
            return
        self.follow_partitions = False
        if info.mode == "partition" and info.num_partitions >= 1:
            self.num_clients = info.num_partitions
            self.log(f"num-clients = 0: {self.num_clients} clients, one per partition")

    def _client_info(self, node: int, reply: Message) -> ClientInfo | None:
        """The node's answer (refused, with the reason on the console, when its data cannot be
        used), or None when it did not answer at all."""
        if reply.has_error():
            self.log(f"node {node} did not answer the query: {reply.error.reason}")
            return None
        cfg = reply.content["config"]
        info = ClientInfo(
            node,
            str(cfg["mode"]),
            str(cfg["name"]),
            int(cfg["partition-id"]),
            int(cfg["num-partitions"]),
            int(cfg["train-samples"]),
            int(cfg["test-samples"]),
            str(cfg["error"]),
        )
        if not info.refused and info.train_samples <= 0:
            info.refused = f"{info.name}: no usable training record"
        if info.refused:
            self.log(f"node {node} refused: {info.refused}")
        return info

    def _number_clients(self, infos: list[ClientInfo]) -> None:
        modes = {i.mode for i in infos}
        if len(modes) > 1:
            raise RuntimeError(
                "some SuperNodes have a partition-id and others their own "
                "data-root: start all of them the same way"
            )
        sites = sorted((i for i in infos if i.mode == "site"), key=lambda i: i.name)
        for i in (i for i in infos if i.mode == "partition"):
            if i.num_partitions != self.num_clients:
                raise RuntimeError(
                    f"node {i.node} has num-partitions={i.num_partitions} but "
                    f"the config has fed.num_clients={self.num_clients}"
                )
            if not 0 <= i.partition_id < self.num_clients:
                raise RuntimeError(
                    f"node {i.node} has partition-id={i.partition_id}, outside "
                    f"0..{self.num_clients - 1}"
                )
            if i.partition_id in self.clients:
                raise RuntimeError(
                    f"nodes {self.clients[i.partition_id].node} and {i.node} "
                    f"both have partition-id={i.partition_id}"
                )
            self.clients[i.partition_id] = i
        names = [i.name for i in sites]
        if len(set(names)) < len(names):
            raise RuntimeError(
                f"two sites share a name: {sorted(names)}; give each SuperNode "
                f"its own name=... in --node-config"
            )
        if len(sites) > self.num_clients:
            raise RuntimeError(f"{len(sites)} sites for fed.num_clients={self.num_clients}")
        for k, i in enumerate(sites):
            self.clients[k] = i
        for k, i in sorted(self.clients.items()):
            if i.refused:
                self.failed_at_start[k] = i.refused
                continue
            self.node_of[k] = i.node
            self.log(
                f"client {k} = {i.name} on node {i.node}: {i.train_samples} training, "
                f"{i.test_samples} test records"
            )

    def client_sizes(self) -> list[int]:
        """Training records per client as the clients reported them (0 when missing)."""
        return [
            self.clients[k].train_samples if k in self.node_of else 0
            for k in range(self.num_clients)
        ]

    # --------------------------------------------------------------------- evaluation
    def evaluate(self, weights: dict[str, torch.Tensor], version: int) -> list[SiteEvaluation]:
        """Every connected client scores `weights` on its own test records."""
        content = RecordDict(
            {"weights": pack_state(weights), "config": ConfigRecord({"version": version})}
        )
        msgs = [
            Message(
                content, dst_node_id=node, message_type="evaluate", ttl=self.reply_timeout + 60.0
            )
            for k, node in sorted(self.node_of.items())
        ]
        if not msgs:
            return []
        ids = self.grid.push_messages(msgs)
        client_of = dict(zip(ids, sorted(self.node_of), strict=True))
        out: dict[int, SiteEvaluation] = {}
        sent = time.monotonic()
        while client_of and time.monotonic() - sent < self.reply_timeout:
            time.sleep(POLL_SECONDS)
            for reply in self.grid.pull_messages(list(client_of)):
                k = client_of.pop(reply.metadata.reply_to_message_id, None)
                if k is None:
                    continue
                if reply.has_error():
                    out[k] = SiteEvaluation(
                        k,
                        0,
                        np.zeros(0),
                        np.zeros(0),
                        f"Flower error {reply.error.code}: {reply.error.reason}",
                    )
                else:
                    out[k] = content_to_evaluation(reply.content)
                    out[k].client_id = k
                if out[k].error:
                    self.log(f"client {k} could not evaluate: {out[k].error}")
        for k in client_of.values():
            out[k] = SiteEvaluation(
                k, 0, np.zeros(0), np.zeros(0), f"no evaluation within {self.reply_timeout:.0f} s"
            )
        return [out[k] for k in sorted(out)]

    # --------------------------------------------------------------------- Transport protocol
    def send(self, request: TrainRequest) -> None:
        k = request.client_id
        node = self.node_of.get(k)
        if node is None:
            why = self.failed_at_start.get(k, f"no SuperNode serves client {k}")
            self.failed[k] = TrainReply(client_id=k, version=request.version, error=why)
            return
        t0, t0_wall = time.monotonic(), time.time()
        content = request_to_content(request)
        msg = Message(
            content,
            dst_node_id=node,
            message_type="train",
            group_id=str(request.round),
            ttl=self.reply_timeout + 60.0,
        )
        (message_id,) = self.grid.push_messages([msg])
        self.in_flight[k] = _InFlight(
            message_id,
            request.version,
            request.round,
            t0,
            t0_wall,
            time.monotonic() - t0,
            content["weights"].count_bytes(),
        )

    def receive(self, client_id: int) -> TrainReply:
        if client_id in self.failed:
            return self.failed.pop(client_id)
        job = self.in_flight[client_id]
        while job.message_id not in self.arrived:
            if time.monotonic() - job.sent > self.reply_timeout:
                del self.in_flight[client_id]
                return TrainReply(
                    client_id=client_id,
                    version=job.version,
                    error=f"no reply within {self.reply_timeout:.0f} s",
                )
            time.sleep(POLL_SECONDS)
            self._pull()
        del self.in_flight[client_id]
        msg, pulled = self.arrived.pop(job.message_id)
        t0 = time.monotonic()
        if msg.has_error():
            self.log(
                f"client {client_id} failed: Flower error {msg.error.code}: {msg.error.reason}"
            )
            return TrainReply(
                client_id=client_id,
                version=job.version,
                error=f"Flower error {msg.error.code}: {msg.error.reason}",
            )
        reply = content_to_reply(msg.content)
        if reply.error:
            self.log(f"client {client_id} failed: {reply.error}")
        if reply.client_id != client_id:
            return TrainReply(
                client_id=client_id,
                version=job.version,
                error=f"reply names client {reply.client_id}, expected {client_id}",
            )
        metrics = msg.content["metrics"]
        self._record_timing(
            {
                "round": job.round,
                "client": client_id,
                "push_s": job.push_seconds,
                "roundtrip_s": pulled - job.sent_wall,
                "decode_s": time.monotonic() - t0,
                "train_s": reply.seconds,
                **_client_timing(metrics, job.sent_wall, pulled),
                "request_bytes": job.request_bytes,
                "reply_bytes": sum(r.count_bytes() for r in msg.content.array_records.values()),
            }
        )
        return reply

    def _pull(self) -> None:
        # Only ask for replies not yet pulled: the SuperLink hands each reply out once and
        # answers a second request for it with a "message unavailable" error.
        waiting = [
            j.message_id for j in self.in_flight.values() if j.message_id not in self.arrived
        ]
        if waiting:
            for reply in self.grid.pull_messages(waiting):
                self.arrived[reply.metadata.reply_to_message_id] = (reply, time.time())

    def _record_timing(self, row: dict) -> None:
        self.log(
            f"round {row['round']}: client {row['client']} replied after "
            f"{row['roundtrip_s']:.2f} s (training {row['train_s']:.2f} s)"
        )
        if self.timing_path is not None:
            append_line(self.timing_path, json.dumps(row))

    def state_dict(self) -> dict:
        # Client state (FedBN BatchNorm, FedDyn g_k) stays on the SuperNodes, in context.state
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state.get("client_states"):
            self.log("checkpoint holds in-process client state; Flower clients keep their own")


def _client_timing(metrics: MetricRecord, sent: float, pulled: float) -> dict[str, float]:
    """Split a reply's round trip by wall-clock times (meaningful on one machine, or with
    synchronized clocks): push -> ClientApp process started (SuperNode and SuperExec polling,
    process launch) -> handler started (interpreter, imports, fetching the message) -> handler
    done -> reply pulled by the ServerApp (reply upload, SuperNode and ServerApp polling)."""
    nan = float("nan")
    started = float(metrics.get("handler-started", nan))
    handler = float(metrics.get("handler-seconds", nan))
    age = float(metrics.get("process-age", nan))
    return {
        "queue_s": started - age - sent,
        "startup_s": age,
        "handler_s": handler,
        "return_s": pulled - started - handler,
    }


# ----------------------------------------------------------------------------- ServerApp
server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    console = Console(file=sys.stdout, width=100, emoji=False)

    def log(text: str) -> None:
        console.print(f"[fedpose] {text}", markup=False, highlight=False)

    try:
        run_flower_server(maybe_inspect(grid), settings_from_run_config(context.run_config), log)
    except BaseException as e:
        # the submitter's `flwr run` exits 0 whatever happens here: say it in the log stream,
        # where `fedpose flower-pull` finds it too (and exits non-zero)
        # one line, however long: a log reader greps for it
        console.print(
            f"[fedpose] run failed: {type(e).__name__}: {e}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        emit(status_line("failed", f"{type(e).__name__}: {e}"))
        raise
    emit(status_line("completed"))


class FlowerEngine(Engine):
    """The run lifecycle's Flower engine: the clients are SuperNodes reached over `grid`; their
    sample counts come from them at `start`, evaluation is federated (each client scores its own
    test records) and, with `central-eval`, also central on the config's test split, which must
    then exist here."""

    def __init__(self, grid: Grid, settings: AppSettings, log=print):
        self.grid = grid
        self.settings = settings
        self.log = log
        self.cfg = settings.config
        self.central: list | None = None

    def check(self, cfg: Config) -> None:
        check_dp_config(cfg.fed)

    def prepare(self, cfg: Config, server: ServerSide) -> None:
        self.server_side = server
        if self.settings.central_eval:
            self.central = load_split(cfg.data, "test")[0]

    def start(self, run_dir: Path, resumed: bool, _observer: RunObserver) -> None:
        timing = run_dir / TIMING_FILE
        if not resumed:
            timing.unlink(missing_ok=True)
        s = self.settings
        flower = FlowerTransport(
            self.grid,
            self.cfg.fed.num_clients,
            s.reply_timeout,
            s.connect_timeout,
            timing,
            self.log,
            s.follow_partitions,
        )
        # under fed.secure: replies hold sketches, the sum comes through SecAgg+
        self.transport = secure_transport(flower, self.server_side.layout, self.cfg.fed)
        self.transport.connect()
        if flower.num_clients != self.cfg.fed.num_clients:  # followed the partitions
            _set_num_clients(self.cfg, run_dir, flower.num_clients)

    def client_sizes(self) -> list[int]:
        return self.transport.client_sizes()

    def clients(self) -> list[dict]:
        return [
            client_row(k, i.name, i.train_samples, i.test_samples, node=i.node)
            for k, i in sorted(self.transport.clients.items())
        ]

    def evaluate(self, weights: dict[str, torch.Tensor], version: int) -> dict:
        skeleton = self.server_side.skeleton
        result = federated_metrics(self.transport.evaluate(weights, version), skeleton)
        if self.central is not None:
            correct, counted = count_correct(
                self.server_side.model,
                weights,
                self.central,
                skeleton,
                self.cfg,
                self.server_side.device,
            )
            score = score_counts(correct, counted, skeleton)
            result.update(central_pck_mean=score.mean, central_pck_per_joint=score.per_joint)
        return result

    def finish(self, cfg: Config, run_dir: Path, server: FederatedServer) -> None:
        self.log(f"finished at round {server.state.round}; run directory {run_dir.resolve()}")
        if cfg.fed.dp_epsilon > 0:
            self._privacy(cfg, run_dir)
        _return_model(run_dir / MODEL_FILE, self.settings.return_model_mb, self.log)

    def _privacy(self, cfg: Config, run_dir: Path) -> None:
        report = privacy_report(cfg.fed, releases_per_client(read_jsonl(run_dir / "metrics.jsonl")))
        write_file(run_dir / "privacy.json", json.dumps(report, indent=2))
        rdp = (
            f"epsilon {report['epsilon_rdp']:.4g} at delta {report['delta_rdp']:g} (Flower's "
            f"RDP accountant)"
            if report["epsilon_rdp"] is not None
            else "no RDP accountant (pip install 'flwr[dp]')"
        )
        self.log(
            f"local DP: sigma {report['noise_std']:.4g} per coordinate; a client released at most "
            f"{report['releases_max']} updates: {rdp}; simple composition: epsilon "
            f"{report['epsilon_composed_simple']:.4g} at delta {report['delta_composed_simple']:g}"
            f"; details in privacy.json"
        )
        emit(_file_lines(run_dir, "privacy.json"))


class LogObserver(RunObserver):
    """The ServerApp's log: the run's messages and one line per round, and the results for the
    submitter (engine/flower_results.py): config.json and clients.json once the server is built,
    each round's record as metrics.jsonl gets it."""

    def __init__(self, rounds: int, log=print):
        self.rounds = rounds
        self.log = log

    def message(self, text: str) -> None:
        self.log(text)

    def started(self, server: FederatedServer) -> None:
        if server.run_dir is not None:
            emit(_file_lines(server.run_dir, "config.json"))
            emit(_file_lines(server.run_dir, CLIENTS_FILE))

    def round_done(self, done: int, record: dict) -> None:
        emit(record_line(record))  # the record metrics.jsonl got, for the submitter
        text = f"round {done}/{self.rounds}: aggregated {record['aggregated']}"
        if record.get("train_loss") is not None:
            text += f", loss {record['train_loss']:.5f}"
        if record.get("pck_mean") is not None:
            text += f", federated PCK {record['pck_mean']:.2f}"
            text += "".join(
                f"; client {k} {v:.2f}" for k, v in record["site_pck"].items() if v is not None
            )
        self.log(text)


def run_flower_server(grid: Grid, settings: AppSettings, log=print) -> FederatedServer:
    """The ServerApp: fedpose's run lifecycle (engine/run.py) on the Flower engine. It loads no
    training data: the model comes from the config (seeded, as on every engine), the sample
    counts from the clients (see FlowerEngine)."""
    cfg = settings.config
    clients = (
        f"{cfg.fed.num_clients} (or one per partition)"
        if settings.follow_partitions
        else cfg.fed.num_clients
    )
    log(
        f"run {cfg.name}: {cfg.fed.method} {cfg.fed.mode}, {cfg.fed.rounds} rounds, "
        f"{clients} clients, run dir {cfg.run_dir.resolve()}"
    )
    for item in settings.overridden:
        log(f"run config overrides {item}")
    if settings.resume:
        log(
            "resuming: client-local state (FedBN BatchNorm, FedDyn's term) lives in each run's "
            "context.state and starts empty in this run"
        )
    return run_lifecycle(
        cfg,
        FlowerEngine(grid, settings, log),
        resume=settings.resume,
        observer=LogObserver(cfg.fed.rounds, log),
    )


def _set_num_clients(cfg: Config, run_dir: Path, num_clients: int) -> None:
    """Follow mode: the number of clients the SuperNodes reported, in the Config and in the
    run's config.json (written before anyone was asked)."""
    cfg.fed.num_clients = num_clients
    cfg.validate()
    path = run_dir / "config.json"
    written = json.loads(path.read_text())
    written["fed"]["num_clients"] = num_clients
    path.write_text(json.dumps(written, indent=2))


def _file_lines(run_dir: Path, name: str) -> list[str]:
    return file_lines(name, (run_dir / name).read_bytes())


def _return_model(path: Path, limit_mb: float, log) -> None:
    """The final model into the log stream, when it is at most limit_mb MiB."""
    size = path.stat().st_size
    if size <= limit_mb * 2**20:
        emit(file_lines(path.name, path.read_bytes()))
        log(f"sent {path.name} ({size / 2**20:.2f} MiB) in the log stream: fedpose flower-pull")
    else:
        log(
            f"{path.name} ({size / 2**20:.1f} MiB) stays on this machine: return-model-mb is "
            f"{limit_mb:g}"
        )
