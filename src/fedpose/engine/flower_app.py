"""Flower 1.42 adapter: a ServerApp and a ClientApp around fedpose's own server loop and client.

Nothing federated is implemented here. The ServerApp runs `run_federation` (what the in-process
engine runs too, so run directory, metrics, checkpoints and evaluation are the same) with a
`FlowerTransport` in place of the in-process one; the ClientApp runs the same client training
(`local_train`). Both sides build the federation from the same Config with
`build_federation`, so data, partition, initial model and strategy are identical to an in-process
run of that Config.

Message layout (Flower Message API, no NumPyClient):
  train request  "weights": ArrayRecord (global state dict)
                 "config":  ConfigRecord client-id, version, round, seed, client-rule
                            (plain | prox | dyn), client-coef (FedProx's mu, FedDyn's alpha)
  train reply    "delta":    ArrayRecord {"delta": flat float32 update}
                 "averaged": ArrayRecord (tensors the server averages by sample count)
                 "metrics":  MetricRecord num-examples, train-loss, steps, seconds, and the
                             handler's timing (handler-started, handler-seconds, process-age)
                 "config":   ConfigRecord client-id, version, error
  query          reply "config": ConfigRecord partition-id, num-partitions

Run config (`[tool.flwr.app.config]`, overridable with `flwr run --run-config`):
  fedpose-config     the whole Config as a JSON object, or a path to a TOML config file;
                     empty = the defaults
  fedpose-overrides  `section.key=value` items separated by spaces (shell-style quoting)
  fedpose-resume     continue the run in the run directory from its last checkpoint
  reply-timeout      seconds the server waits for one client's reply before dropping it
  connect-timeout    seconds the server waits for a SuperNode per partition at start
Node config (`flower-supernode --node-config`): partition-id, num-partitions, and optionally
data-root (where this site keeps the dataset, when it differs from the Config's data.root).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fedpose.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    merge_dicts,
    parse_overrides,
)
from fedpose.engine.federation import Federation, build_federation
from fedpose.engine.runner import run_federation
from fedpose.fl.client import local_batches, local_train
from fedpose.fl.messages import TrainReply, TrainRequest

CONFIG_KEY = "fedpose-config"
OVERRIDES_KEY = "fedpose-overrides"
RESUME_KEY = "fedpose-resume"
REPLY_TIMEOUT_KEY = "reply-timeout"
CONNECT_TIMEOUT_KEY = "connect-timeout"
# Defaults of the two waits (pyproject.toml's [tool.flwr.app.config] repeats them: keep in step).
# A round of real training on a slow CPU site can take many minutes; a SuperNode that has not
# connected within two minutes of the start is not coming.
REPLY_TIMEOUT_S = 900.0
CONNECT_TIMEOUT_S = 120.0
# what `[tool.flwr.app.config]` must declare (flwr only accepts overrides of declared keys)
DEFAULT_RUN_CONFIG: dict[str, str | bool | float] = {
    CONFIG_KEY: "",
    OVERRIDES_KEY: "",
    RESUME_KEY: False,
    REPLY_TIMEOUT_KEY: REPLY_TIMEOUT_S,
    CONNECT_TIMEOUT_KEY: CONNECT_TIMEOUT_S,
}
TIMING_FILE = "flower_timing.jsonl"
_CLIENT_STATE_PREFIX = "fedpose."  # context.state keys; other mods may share the RecordDict


# ----------------------------------------------------------------------------- conversions
def state_to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """A torch state dict as an ArrayRecord: exact values, dtypes (int64 counters too), shapes."""
    record = ArrayRecord()
    for name, tensor in state.items():
        record[name] = Array(tensor.detach().cpu().contiguous().numpy())
    return record


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    # np.load hands back read-only buffers; a copy gives torch memory it may write to
    return {name: torch.from_numpy(np.array(array.numpy(), copy=True))
            for name, array in record.items()}


def request_to_content(request: TrainRequest) -> RecordDict:
    return RecordDict({
        "weights": state_to_record(request.weights),
        "config": ConfigRecord({"client-id": request.client_id, "version": request.version,
                                "round": request.round, "seed": int(request.seed),
                                "client-rule": request.rule,
                                "client-coef": float(request.coef)}),
    })


def content_to_request(content: RecordDict) -> TrainRequest:
    cfg = content["config"]
    return TrainRequest(client_id=int(cfg["client-id"]), version=int(cfg["version"]),
                        round=int(cfg["round"]), weights=record_to_state(content["weights"]),
                        seed=int(cfg["seed"]), rule=str(cfg["client-rule"]),
                        coef=float(cfg["client-coef"]))


def reply_to_content(reply: TrainReply, timing: dict[str, float] | None = None) -> RecordDict:
    content = RecordDict({
        "metrics": MetricRecord({"num-examples": int(reply.num_samples),
                                 "train-loss": float(reply.train_loss), "steps": int(reply.steps),
                                 "seconds": float(reply.seconds), **(timing or {})}),
        "config": ConfigRecord({"client-id": reply.client_id, "version": reply.version,
                                "error": reply.error or ""}),
    })
    if reply.delta is not None:
        content["delta"] = state_to_record({"delta": reply.delta})
        content["averaged"] = state_to_record(reply.averaged)
    return content


def content_to_reply(content: RecordDict) -> TrainReply:
    cfg, metrics = content["config"], content["metrics"]
    return TrainReply(
        client_id=int(cfg["client-id"]),
        version=int(cfg["version"]),
        num_samples=int(metrics["num-examples"]),
        delta=record_to_state(content["delta"])["delta"] if "delta" in content else None,
        averaged=record_to_state(content["averaged"]) if "averaged" in content else {},
        train_loss=float(metrics["train-loss"]),
        steps=int(metrics["steps"]),
        seconds=float(metrics["seconds"]),
        error=str(cfg["error"]) or None,
    )


def client_state_to_records(client_state: dict, store: RecordDict) -> None:
    """Write local_train's client state ({key: {name: tensor}}) into a node's context.state."""
    for key, tensors in client_state.items():
        if not isinstance(tensors, dict):
            raise TypeError(f"client state {key!r} is not a dict of tensors; Flower cannot keep it")
        store[_CLIENT_STATE_PREFIX + key] = state_to_record(tensors)


def records_to_client_state(store: RecordDict) -> dict:
    return {key[len(_CLIENT_STATE_PREFIX):]: record_to_state(record)
            for key, record in store.array_records.items()
            if key.startswith(_CLIENT_STATE_PREFIX)}


# ----------------------------------------------------------------------------- run config
@dataclass
class AppSettings:
    config: Config
    resume: bool = False
    reply_timeout: float = REPLY_TIMEOUT_S
    connect_timeout: float = CONNECT_TIMEOUT_S


def settings_from_run_config(run_config: dict) -> AppSettings:
    """The fedpose Config and engine settings carried by a Flower run config."""
    source = str(run_config.get(CONFIG_KEY, "") or "").strip()
    overrides = shlex.split(str(run_config.get(OVERRIDES_KEY, "") or ""))
    if source.startswith("{"):
        try:
            values = json.loads(source)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{CONFIG_KEY}: not a JSON object: {e}") from None
        cfg = config_from_dict(merge_dicts(values, parse_overrides(overrides)))
    else:
        cfg = load_config(source or None, overrides)
    return AppSettings(
        config=cfg,
        resume=bool(run_config.get(RESUME_KEY, False)),
        reply_timeout=float(run_config.get(REPLY_TIMEOUT_KEY, REPLY_TIMEOUT_S)),
        connect_timeout=float(run_config.get(CONNECT_TIMEOUT_KEY, CONNECT_TIMEOUT_S)),
    )


def run_config_toml(cfg: Config, **settings: str | bool | float) -> str:
    """`[tool.flwr.app.config]` lines (or a `flwr run --run-config` file) carrying `cfg` as JSON.

    settings: other run config keys, with `_` for `-` (reply_timeout=60.0)."""
    values = dict(DEFAULT_RUN_CONFIG)
    values[CONFIG_KEY] = json.dumps(cfg.to_dict())
    for key, value in settings.items():
        key = key.replace("_", "-")
        if key not in values:
            raise KeyError(f"unknown run config key {key!r}; known: {', '.join(values)}")
        values[key] = value
    return "".join(f"{key} = {_toml_value(value)}\n" for key, value in values.items())


def _toml_value(value: str | bool | float) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string literal is a valid TOML basic string
    return repr(float(value))


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


class FlowerTransport:
    """The server loop's Transport over a Flower Grid.

    Clients are partition ids; each is served by the SuperNode started with that `partition-id`
    (asked once, with a "query" message, at `connect`). Flower's own sampling and reply order
    play no part: the server loop picks and orders clients, `send` pushes one message at once (so
    selected clients train concurrently) and `receive` waits for exactly that client's reply.
    A missing node, an error reply or a timeout becomes a TrainReply with `error`, which the
    server rejects like any failed client.
    """

    def __init__(self, grid: Grid, num_clients: int, reply_timeout: float = REPLY_TIMEOUT_S,
                 connect_timeout: float = CONNECT_TIMEOUT_S, timing_path: Path | None = None,
                 log=print):
        self.grid = grid
        self.num_clients = num_clients
        self.reply_timeout = reply_timeout
        self.connect_timeout = connect_timeout
        self.timing_path = timing_path
        self.log = log
        self.node_of: dict[int, int] = {}  # partition id -> node id
        self.in_flight: dict[int, _InFlight] = {}
        self.failed: dict[int, TrainReply] = {}
        self.arrived: dict[str, tuple[Message, float]] = {}  # request id -> reply, time.time()

    # --------------------------------------------------------------------- discovery
    def connect(self) -> dict[int, int]:
        """Map every partition id to the SuperNode serving it; wait up to connect_timeout."""
        deadline = time.monotonic() + self.connect_timeout
        asked: set[int] = set()
        queries: dict[str, int] = {}  # message id -> node id
        while len(self.node_of) < self.num_clients and time.monotonic() < deadline:
            new = [n for n in self.grid.get_node_ids() if n not in asked]
            if new:
                msgs = [Message(RecordDict(), dst_node_id=n, message_type="query",
                                ttl=self.connect_timeout) for n in new]
                queries.update(zip(self.grid.push_messages(msgs), new, strict=True))
                asked.update(new)
            if queries:
                for reply in self.grid.pull_messages(list(queries)):
                    node = queries.pop(reply.metadata.reply_to_message_id, None)
                    if node is not None:
                        self._register(node, reply)
            time.sleep(0.2)
        missing = sorted(set(range(self.num_clients)) - set(self.node_of))
        if missing:
            self.log(f"no SuperNode serves partition(s) {missing} after "
                     f"{self.connect_timeout:.0f} s: they count as failed clients")
        return dict(self.node_of)

    def _register(self, node: int, reply: Message) -> None:
        if reply.has_error():
            self.log(f"node {node} did not answer the query: {reply.error.reason}")
            return
        cfg = reply.content["config"]
        pid, parts = int(cfg["partition-id"]), int(cfg["num-partitions"])
        if parts != self.num_clients:
            raise RuntimeError(f"node {node} has num-partitions={parts} but the config has "
                               f"fed.num_clients={self.num_clients}")
        if not 0 <= pid < self.num_clients:
            raise RuntimeError(f"node {node} has partition-id={pid}, outside 0..{parts - 1}")
        if pid in self.node_of:
            raise RuntimeError(f"nodes {self.node_of[pid]} and {node} both have "
                               f"partition-id={pid}")
        self.node_of[pid] = node
        self.log(f"partition {pid} -> node {node}")

    # --------------------------------------------------------------------- Transport protocol
    def send(self, request: TrainRequest) -> None:
        k = request.client_id
        node = self.node_of.get(k)
        if node is None:
            self.failed[k] = TrainReply(client_id=k, version=request.version,
                                        error=f"no SuperNode serves partition {k}")
            return
        t0, t0_wall = time.monotonic(), time.time()
        content = request_to_content(request)
        msg = Message(content, dst_node_id=node, message_type="train",
                      group_id=str(request.round), ttl=self.reply_timeout + 60.0)
        (message_id,) = self.grid.push_messages([msg])
        self.in_flight[k] = _InFlight(message_id, request.version, request.round, t0, t0_wall,
                                      time.monotonic() - t0, content["weights"].count_bytes())

    def receive(self, client_id: int) -> TrainReply:
        if client_id in self.failed:
            return self.failed.pop(client_id)
        job = self.in_flight[client_id]
        poll = 0.02
        while job.message_id not in self.arrived:
            if time.monotonic() - job.sent > self.reply_timeout:
                del self.in_flight[client_id]
                return TrainReply(client_id=client_id, version=job.version,
                                  error=f"no reply within {self.reply_timeout:.0f} s")
            time.sleep(poll)
            poll = min(poll * 1.5, 0.25)  # replies take seconds: back off, but not by much
            self._pull()
        del self.in_flight[client_id]
        msg, pulled = self.arrived.pop(job.message_id)
        t0 = time.monotonic()
        if msg.has_error():
            return TrainReply(client_id=client_id, version=job.version,
                              error=f"Flower error {msg.error.code}: {msg.error.reason}")
        reply = content_to_reply(msg.content)
        if reply.client_id != client_id:
            return TrainReply(client_id=client_id, version=job.version,
                              error=f"reply names client {reply.client_id}, expected {client_id}")
        metrics = msg.content["metrics"]
        self._record_timing({
            "round": job.round, "client": client_id, "push_s": job.push_seconds,
            "roundtrip_s": pulled - job.sent_wall, "decode_s": time.monotonic() - t0,
            "train_s": reply.seconds, **_client_timing(metrics, job.sent_wall, pulled),
            "request_bytes": job.request_bytes,
            "reply_bytes": sum(r.count_bytes() for r in msg.content.array_records.values()),
        })
        return reply

    def _pull(self) -> None:
        # Only ask for replies not yet pulled: the SuperLink hands each reply out once and
        # answers a second request for it with a "message unavailable" error.
        waiting = [j.message_id for j in self.in_flight.values()
                   if j.message_id not in self.arrived]
        if waiting:
            for reply in self.grid.pull_messages(waiting):
                self.arrived[reply.metadata.reply_to_message_id] = (reply, time.time())

    def _record_timing(self, row: dict) -> None:
        self.log(f"round {row['round']}: partition {row['client']} replied after "
                 f"{row['roundtrip_s']:.2f} s (training {row['train_s']:.2f} s)")
        if self.timing_path is not None:
            with open(self.timing_path, "a") as f:
                f.write(json.dumps(row) + "\n")

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
    return {"queue_s": started - age - sent, "startup_s": age, "handler_s": handler,
            "return_s": pulled - started - handler}


# ----------------------------------------------------------------------------- ServerApp
server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    settings = settings_from_run_config(context.run_config)
    cfg = settings.config
    console = Console(file=sys.stdout, width=100)

    def log(text: str) -> None:
        console.print(f"[fedpose] {text}", markup=False, highlight=False)

    log(f"run {cfg.name}: {cfg.fed.method} {cfg.fed.mode}, {cfg.fed.rounds} rounds, "
        f"{cfg.fed.num_clients} partitions, run dir {cfg.run_dir.resolve()}")
    if settings.resume:
        log("resuming: client-local state (FedBN BatchNorm, FedDyn's term) lives in each run's "
            "context.state and starts empty in this run")

    def make_transport(federation: Federation) -> FlowerTransport:
        timing = federation.cfg.run_dir / TIMING_FILE
        if not settings.resume:
            timing.unlink(missing_ok=True)
        transport = FlowerTransport(grid, cfg.fed.num_clients, settings.reply_timeout,
                                    settings.connect_timeout, timing, log)
        transport.connect()
        return transport

    server = run_federation(cfg, resume=settings.resume, console=console,
                       transport_factory=make_transport)
    log(f"finished at round {server.state.round}; run directory {cfg.run_dir.resolve()}")


# ----------------------------------------------------------------------------- ClientApp
client_app = ClientApp()
_federations: dict[str, Federation] = {}  # per process: reused if Flower reuses the process


def _partition(context: Context) -> tuple[int, int]:
    try:
        return (int(context.node_config["partition-id"]),
                int(context.node_config["num-partitions"]))
    except KeyError as e:
        raise RuntimeError(f"start the SuperNode with --node-config "
                           f"'partition-id=<i> num-partitions=<n>' (missing {e})") from None


def _client_federation(cfg: Config, node_config: dict) -> Federation:
    if "data-root" in node_config:
        cfg.data.root = str(node_config["data-root"])
    key = json.dumps(cfg.to_dict(), sort_keys=True)
    if key not in _federations:
        _federations[key] = build_federation(cfg)
    return _federations[key]


@client_app.query()
def _client_query(msg: Message, context: Context) -> Message:
    pid, parts = _partition(context)
    return Message(RecordDict({"config": ConfigRecord({"partition-id": pid,
                                                       "num-partitions": parts})}),
                   reply_to=msg)


@client_app.train()
def _client_train(msg: Message, context: Context) -> Message:
    started, started_wall = time.perf_counter(), time.time()
    cfg_record = msg.content["config"]
    client_id, version = int(cfg_record["client-id"]), int(cfg_record["version"])
    try:
        pid, parts = _partition(context)
        if client_id != pid:
            raise RuntimeError(f"request for partition {client_id} reached partition {pid}")
        cfg = settings_from_run_config(context.run_config).config
        if parts != cfg.fed.num_clients:
            raise RuntimeError(f"num-partitions={parts} but fed.num_clients="
                               f"{cfg.fed.num_clients}")
        federation = _client_federation(cfg, context.node_config)
        request = content_to_request(msg.content)
        dataset = federation.client_dataset(pid)
        reply, state = local_train(
            federation.model, local_batches(dataset, request, cfg), request,
            records_to_client_state(context.state), cfg.train, federation.layout,
            federation.device, num_samples=len(dataset),
        )
        client_state_to_records(state, context.state)
    except Exception as e:  # a failed client is a rejected reply, as in-process
        traceback.print_exc()
        reply = TrainReply(client_id=client_id, version=version,
                           error=f"client crashed: {type(e).__name__}: {e}")
    timing = {"handler-started": started_wall, "handler-seconds": time.perf_counter() - started,
              "process-age": _process_age(started_wall)}
    return Message(reply_to_content(reply, timing), reply_to=msg)


def proc_stat(pid: int | str) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, ... (Linux).
    The name is cut at the last ")" because it may itself hold spaces and parentheses."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _process_age(now: float) -> float:
    """Seconds this process had lived at wall time `now` (Linux; NaN elsewhere): each message
    starts a fresh ClientApp process, and its start-up is part of Flower's latency."""
    try:
        ticks = int(proc_stat("self")[19])  # starttime, in clock ticks after boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")
    return uptime - ticks / os.sysconf("SC_CLK_TCK") - (time.time() - now)

