"""Flower 1.42 adapter: a ServerApp and a ClientApp around fedpose's own server loop and client.

Nothing federated is implemented here. The ServerApp runs fedpose's FederatedServer (the same
loop as the in-process engine: selection, aggregation, metrics, checkpoints) with a
`FlowerTransport`; the ClientApp runs `local_train`. The ServerApp loads no training data: it
builds the initial model from the Config (seeded, as every engine does) and learns each client's
sample counts from the clients.

Clients (ClientApp side, from `flower-supernode --node-config`):
  a site         data-root="<folder>" and optionally dataset, ann, test-ann, headboxes,
                 lsp-labels, name (see fedpose.data.site): the site trains and evaluates on its
                 own files only; sites are numbered in the order of their names
  a partition    partition-id=<i> num-partitions=<n> (the simulation shortcut, and what Flower's
                 Simulation Engine gives every virtual SuperNode): the node builds the whole
                 federation from the Config and serves partition i of it; an optional data-root
                 says where this node keeps the Config's dataset

Message layout (Flower Message API, no NumPyClient). Every state dict is packed into two Flower
Arrays (`pack_state`: a JSON layout and one byte buffer), not one Array per tensor.
  query          reply "config": ConfigRecord mode, name, partition-id, num-partitions,
                                 train-samples, test-samples, error (why the node is refused)
  train request  "weights": packed ArrayRecord (global state dict)
                 "config":  ConfigRecord client-id, version, round, seed
  train reply    "update":  packed ArrayRecord {"delta": flat float32 update,
                            "averaged/<name>": tensors the server averages by sample count}
                 "metrics": MetricRecord num-examples, train-loss, steps, seconds, and the
                            handler's timing (handler-started, handler-seconds, process-age)
                 "config":  ConfigRecord client-id, version, error
  evaluate       request "weights" (packed), "config" version; reply "metrics": num-examples,
                 per-joint "correct" and "counted" on the client's own test records, "config"
                 client-id, error. The server sums the counts (federated_metrics).

Run config (`[tool.flwr.app.config]`, overridable with `flwr run --run-config`):
  fedpose-config     the whole Config as a JSON object, or a path to a TOML config file;
                     empty = the defaults
  fedpose-overrides  `section.key=value` items separated by spaces (shell-style quoting)
  fedpose-resume     continue the run in the run directory from its last checkpoint
  reply-timeout      seconds the server waits for one client's reply before dropping it
  connect-timeout    seconds the server waits at start for a SuperNode per client
  central-eval       also evaluate on the Config's test split on the server (which must then
                     have it); without it the ServerApp reads no data at all
"""

from __future__ import annotations

import copy
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
    DataConfig,
    config_from_dict,
    load_config,
    merge_dicts,
    parse_overrides,
)
from fedpose.data import load_split
from fedpose.data.dataset import PoseDataset
from fedpose.data.records import DatasetError, PoseRecord, Skeleton
from fedpose.data.site import (
    DATA_ROOT,
    SiteData,
    dataset_skeleton,
    evaluation_partition,
    is_site,
    load_site,
    site_data_config,
    site_name,
)
from fedpose.engine.federation import Federation, build_federation, build_model_and_strategy
from fedpose.engine.flower_dp import (
    check_dp_config,
    dp_enabled,
    noise_std,
    privacy_report,
    privatize_update,
    releases_per_client,
)
from fedpose.engine.runner import prepare_run_dir
from fedpose.fl.client import local_batches, local_train
from fedpose.fl.messages import TrainReply, TrainRequest
from fedpose.fl.params import ModelLayout
from fedpose.fl.server import FederatedServer
from fedpose.metrics.evaluate import evaluate_counts
from fedpose.metrics.log import read_jsonl
from fedpose.metrics.pck import score_counts
from fedpose.model.inference import load_weights, resolve_device
from fedpose.model.io import MODEL_FILE, save_model

CONFIG_KEY = "fedpose-config"
OVERRIDES_KEY = "fedpose-overrides"
RESUME_KEY = "fedpose-resume"
REPLY_TIMEOUT_KEY = "reply-timeout"
CONNECT_TIMEOUT_KEY = "connect-timeout"
CENTRAL_EVAL_KEY = "central-eval"
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
    CENTRAL_EVAL_KEY: False,
}
TIMING_FILE = "flower_timing.jsonl"
# how often the ServerApp asks the SuperLink for replies: replies are pulled at most this late
POLL_SECONDS = 0.05
_CLIENT_STATE_PREFIX = "fedpose."  # context.state keys; other mods may share the RecordDict


# ----------------------------------------------------------------------------- conversions
def state_to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """A torch state dict as an ArrayRecord of one Flower Array per tensor: the layout Flower's
    own strategies read. fedpose's messages use the packed form (`pack_state`)."""
    record = ArrayRecord()
    for name, tensor in state.items():
        record[name] = Array(tensor.detach().cpu().contiguous().numpy())
    return record


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The tensors of an ArrayRecord, packed (`pack_state`) or one Array per tensor."""
    if set(record) == {PACK_LAYOUT, PACK_DATA}:
        return unpack_state(record)
    # np.load hands back read-only buffers; a copy gives torch memory it may write to
    return {
        name: torch.from_numpy(np.array(array.numpy(), copy=True)) for name, array in record.items()
    }


PACK_LAYOUT, PACK_DATA = "layout", "data"


def pack_state(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """A state dict as two Flower Arrays: a JSON layout (name, dtype, shape, offset, size per
    tensor) and one byte buffer holding every tensor's bytes. Flower sends each Array as its own
    object (and its own request on each hop), so two instead of one per tensor; exact values,
    dtypes and shapes."""
    entries, chunks, offset = [], [], 0
    for name, tensor in state.items():
        array = tensor.detach().cpu().contiguous().numpy()
        data = array.tobytes()
        entries.append([name, array.dtype.str, list(array.shape), offset, len(data)])
        chunks.append(data)
        offset += len(data)
    record = ArrayRecord()
    record[PACK_LAYOUT] = Array(np.frombuffer(json.dumps(entries).encode(), dtype=np.uint8))
    record[PACK_DATA] = Array(np.frombuffer(b"".join(chunks), dtype=np.uint8))
    return record


def unpack_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    entries = json.loads(record[PACK_LAYOUT].numpy().tobytes())
    data = record[PACK_DATA].numpy()
    state = {}
    for name, dtype, shape, offset, size in entries:
        dt = np.dtype(dtype)
        # a copy: aligned, writable memory that outlives the buffer
        array = np.frombuffer(data, dtype=dt, count=size // dt.itemsize, offset=offset).copy()
        state[name] = torch.from_numpy(array.reshape(shape))
    return state


def request_to_content(request: TrainRequest) -> RecordDict:
    return RecordDict(
        {
            "weights": pack_state(request.weights),
            "config": ConfigRecord(
                {
                    "client-id": request.client_id,
                    "version": request.version,
                    "round": request.round,
                    "seed": int(request.seed),
                    "client-rule": request.rule,
                    "client-coef": float(request.coef),
                }
            ),
        }
    )


def content_to_request(content: RecordDict) -> TrainRequest:
    cfg = content["config"]
    return TrainRequest(
        client_id=int(cfg["client-id"]),
        version=int(cfg["version"]),
        round=int(cfg["round"]),
        weights=record_to_state(content["weights"]),
        seed=int(cfg["seed"]),
        rule=str(cfg["client-rule"]),
        coef=float(cfg["client-coef"]),
    )


_AVERAGED = "averaged/"  # name prefix of the averaged tensors in a reply's packed "update"


def reply_to_content(reply: TrainReply, timing: dict[str, float] | None = None) -> RecordDict:
    content = RecordDict(
        {
            "metrics": MetricRecord(
                {
                    "num-examples": int(reply.num_samples),
                    "train-loss": float(reply.train_loss),
                    "train-loss-sq": float(reply.train_loss_sq),
                    "steps": int(reply.steps),
                    "seconds": float(reply.seconds),
                    **(timing or {}),
                }
            ),
            "config": ConfigRecord(
                {"client-id": reply.client_id, "version": reply.version, "error": reply.error or ""}
            ),
        }
    )
    if reply.delta is not None:
        content["update"] = pack_state(
            {"delta": reply.delta, **{_AVERAGED + name: t for name, t in reply.averaged.items()}}
        )
    return content


def content_to_reply(content: RecordDict) -> TrainReply:
    cfg, metrics = content["config"], content["metrics"]
    update = record_to_state(content["update"]) if "update" in content else {}
    return TrainReply(
        client_id=int(cfg["client-id"]),
        version=int(cfg["version"]),
        num_samples=int(metrics["num-examples"]),
        delta=update.get("delta"),
        averaged={
            name[len(_AVERAGED) :]: t for name, t in update.items() if name.startswith(_AVERAGED)
        },
        train_loss=float(metrics["train-loss"]),
        train_loss_sq=float(metrics.get("train-loss-sq", float("nan"))),
        steps=int(metrics["steps"]),
        seconds=float(metrics["seconds"]),
        error=str(cfg["error"]) or None,
    )


def client_state_to_records(client_state: dict, store: RecordDict) -> None:
    """Write local_train's client state ({key: {name: tensor}}) into a node's context.state."""
    for key, tensors in client_state.items():
        if not isinstance(tensors, dict):
            raise TypeError(f"client state {key!r} is not a dict of tensors; Flower cannot keep it")
        store[_CLIENT_STATE_PREFIX + key] = pack_state(tensors)


def records_to_client_state(store: RecordDict) -> dict:
    return {
        key[len(_CLIENT_STATE_PREFIX) :]: record_to_state(record)
        for key, record in store.array_records.items()
        if key.startswith(_CLIENT_STATE_PREFIX)
    }


# ----------------------------------------------------------------------------- evaluation
@dataclass
class SiteEvaluation:
    """One site's score of a model on its own test records: per-joint counts, which add up."""

    client_id: int
    samples: int
    correct: np.ndarray  # (J,) int64
    counted: np.ndarray  # (J,) int64
    error: str | None = None


def count_correct(
    model: torch.nn.Module,
    weights: dict[str, torch.Tensor],
    records: list[PoseRecord],
    skeleton: Skeleton,
    cfg: Config,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-joint (correct, counted) of `weights` on `records`, by the evaluator central
    evaluation uses, so counts summed over sites equal the central counts."""
    load_weights(model, weights)
    return evaluate_counts(model, records, skeleton, cfg, device)


def evaluation_to_content(ev: SiteEvaluation) -> RecordDict:
    return RecordDict(
        {
            "metrics": MetricRecord(
                {
                    "num-examples": int(ev.samples),
                    "correct": [int(v) for v in ev.correct],
                    "counted": [int(v) for v in ev.counted],
                }
            ),
            "config": ConfigRecord({"client-id": ev.client_id, "error": ev.error or ""}),
        }
    )


def content_to_evaluation(content: RecordDict) -> SiteEvaluation:
    metrics, cfg = content["metrics"], content["config"]
    return SiteEvaluation(
        int(cfg["client-id"]),
        int(metrics["num-examples"]),
        np.asarray(metrics["correct"], dtype=np.int64),
        np.asarray(metrics["counted"], dtype=np.int64),
        str(cfg["error"]) or None,
    )


def federated_metrics(evaluations: list[SiteEvaluation], skeleton: Skeleton) -> dict:
    """The federation's PCK from the sites' summed counts (exactly the PCK of the union of their
    test sets), and each site's own PCK, as metrics.jsonl fields."""
    correct = np.zeros(skeleton.num_joints, dtype=np.int64)
    counted = np.zeros(skeleton.num_joints, dtype=np.int64)
    sites: dict[str, float | None] = {}
    samples: dict[str, int] = {}
    errors: dict[str, str] = {}
    for ev in sorted(evaluations, key=lambda e: e.client_id):
        key = str(ev.client_id)
        if ev.error:
            errors[key] = ev.error
            continue
        if (
            ev.correct.shape != (skeleton.num_joints,)
            or ev.counted.shape != correct.shape
            or (ev.correct > ev.counted).any()
            or (ev.correct < 0).any()
        ):
            errors[key] = "malformed evaluation counts"
            continue
        correct += ev.correct
        counted += ev.counted
        samples[key] = ev.samples
        site = score_counts(ev.correct, ev.counted, skeleton)
        sites[key] = None if np.isnan(site.mean) else site.mean
    result = score_counts(correct, counted, skeleton)
    out = {
        # the same fields, and the same values, as central evaluation (Federation.evaluate)
        "pck_mean": result.mean,
        "pck_per_joint": result.per_joint,
        "site_pck": sites,
        "site_test_samples": samples,
    }
    if errors:
        out["site_eval_errors"] = errors
    return out


# ----------------------------------------------------------------------------- run config
@dataclass
class AppSettings:
    config: Config
    resume: bool = False
    reply_timeout: float = REPLY_TIMEOUT_S
    connect_timeout: float = CONNECT_TIMEOUT_S
    central_eval: bool = False


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
        central_eval=bool(run_config.get(CENTRAL_EVAL_KEY, False)),
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
    ):
        self.grid = grid
        self.num_clients = num_clients
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
        while len(answers) + unanswerable < self.num_clients and time.monotonic() < deadline:
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
    settings = settings_from_run_config(context.run_config)
    check_dp_config(settings.config.fed)
    console = Console(file=sys.stdout, width=100)

    def log(text: str) -> None:
        console.print(f"[fedpose] {text}", markup=False, highlight=False)

    run_flower_server(grid, settings, log)


def run_flower_server(grid: Grid, settings: AppSettings, log=print) -> FederatedServer:
    """The ServerApp: fedpose's server loop over a FlowerTransport. It loads no training data:
    the model comes from the config (seeded, as on every engine), the sample counts from the
    clients; evaluation is federated (each client scores its own test records) and, with
    `central-eval`, also central on the config's test split, which must then exist here."""
    cfg = settings.config
    log(
        f"run {cfg.name}: {cfg.fed.method} {cfg.fed.mode}, {cfg.fed.rounds} rounds, "
        f"{cfg.fed.num_clients} clients, run dir {cfg.run_dir.resolve()}"
    )
    if settings.resume:
        log(
            "resuming: client-local state (FedBN BatchNorm, FedDyn's term) lives in each run's "
            "context.state and starts empty in this run"
        )
    run_dir = prepare_run_dir(cfg, settings.resume)
    skeleton = dataset_skeleton(cfg.data.dataset)
    model, layout, strategy = build_model_and_strategy(cfg, skeleton)
    device = resolve_device(cfg.train.device)
    timing = run_dir / TIMING_FILE
    if not settings.resume:
        timing.unlink(missing_ok=True)
    transport = FlowerTransport(
        grid, cfg.fed.num_clients, settings.reply_timeout, settings.connect_timeout, timing, log
    )
    transport.connect()
    (run_dir / "clients.json").write_text(
        json.dumps(
            [
                {
                    "client": k,
                    "site": i.name,
                    "node": i.node,
                    "samples": i.train_samples,
                    "test_samples": i.test_samples,
                }
                for k, i in sorted(transport.clients.items())
            ],
            indent=2,
        )
    )
    central = load_split(cfg.data, "test")[0] if settings.central_eval else None

    def evaluate(weights: dict[str, torch.Tensor]) -> dict:
        result = federated_metrics(transport.evaluate(weights, server.state.round), skeleton)
        if central is not None:
            correct, counted = count_correct(model, weights, central, skeleton, cfg, device)
            score = score_counts(correct, counted, skeleton)
            result.update(central_pck_mean=score.mean, central_pck_per_joint=score.per_joint)
        return result

    server = FederatedServer(
        cfg,
        {n: t.detach().clone() for n, t in model.state_dict().items()},
        layout,
        strategy,
        transport,
        transport.client_sizes(),
        evaluate=evaluate,
        run_dir=run_dir,
    )
    if settings.resume:
        resumed, warnings = server.load_checkpoint()
        for warning in warnings:
            log(f"warning: {warning}")
        log(
            f"resumed at round {server.state.round}"
            if resumed
            else "no checkpoint yet: starting over"
        )

    def progress(done: int, record: dict) -> None:
        text = f"round {done}/{cfg.fed.rounds}: aggregated {record['aggregated']}"
        if record.get("train_loss") is not None:
            text += f", loss {record['train_loss']:.5f}"
        if record.get("pck_mean") is not None:
            text += f", federated PCK {record['pck_mean']:.2f}"
            text += "".join(
                f"; client {k} {v:.2f}" for k, v in record["site_pck"].items() if v is not None
            )
        log(text)

    server.run(progress=progress)
    save_model(run_dir / MODEL_FILE, server.weights, cfg, skeleton)
    log(f"finished at round {server.state.round}; run directory {run_dir.resolve()}")
    if cfg.fed.dp_epsilon > 0:
        report = privacy_report(cfg.fed, releases_per_client(read_jsonl(run_dir / "metrics.jsonl")))
        (run_dir / "privacy.json").write_text(json.dumps(report, indent=2))
        rdp = (
            f"epsilon {report['epsilon_rdp']:.4g} at delta {report['delta_rdp']:g} (Flower's "
            f"RDP accountant)"
            if report["epsilon_rdp"] is not None
            else "no RDP accountant (pip install 'flwr[dp]')"
        )
        log(
            f"local DP: sigma {report['noise_std']:.4g} per coordinate; a client released at most "
            f"{report['releases_max']} updates: {rdp}; simple composition: epsilon "
            f"{report['epsilon_composed_simple']:.4g} at delta {report['delta_composed_simple']:g}"
            f"; details in privacy.json"
        )
    return server


# ----------------------------------------------------------------------------- ClientApp
def client_dp_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's LocalDpMod on train replies when the run's config asks for it. The config
    lives in the run config, so the mod is chosen per message, not fixed at import."""
    if msg.metadata.message_type != "train":
        return call_next(msg, context)
    try:
        fed = settings_from_run_config(context.run_config).config.fed
    except Exception:  # the handler reports a broken config as a failed client
        return call_next(msg, context)
    reply = call_next(msg, context)
    if not dp_enabled(fed) or reply.has_error() or "update" not in reply.content:
        return reply  # a failed client releases no update
    update = record_to_state(reply.content["update"])
    noisy = privatize_update(msg, reply, context, update["delta"].numpy(), fed)
    update["delta"] = torch.from_numpy(noisy)
    reply.content["update"] = pack_state(update)
    reply.content["metrics"]["dp-noise-std"] = noise_std(fed)
    return reply


client_app = ClientApp(mods=[client_dp_mod])


@dataclass
class ClientSide:
    """What a ClientApp needs to train and evaluate: its records, the model to train."""

    mode: str  # "partition" | "site"
    name: str
    partition_id: int  # -1 for a site
    num_partitions: int
    dataset: PoseDataset
    test_records: list[PoseRecord]
    skeleton: Skeleton
    model: torch.nn.Module
    layout: ModelLayout
    device: torch.device


# One entry per node config and Config. In Flower's Deployment Engine every message runs in a
# fresh `flwr-clientapp` process, so this dict lives for one message only; what survives from
# message to message on a SuperNode is the run's context.state, where a site keeps its parsed
# records (site_records). In the Simulation Engine the Ray actors live on and each virtual
# SuperNode builds its side once.
_client_sides: dict[str, ClientSide] = {}
_federations: dict[str, Federation] = {}


def client_side(cfg: Config, node_config: dict, store: RecordDict | None = None) -> ClientSide:
    """The ClientApp's data and model for this SuperNode (cached, see _client_sides)."""
    key = json.dumps([dict(node_config), cfg.to_dict()], sort_keys=True, default=str)
    if key not in _client_sides:
        _client_sides[key] = (
            _site_side(cfg, node_config, store)
            if is_site(node_config)
            else _partition_side(cfg, node_config)
        )
    return _client_sides[key]


def _partition_side(cfg: Config, node_config: dict) -> ClientSide:
    """The simulation shortcut: build the whole federation from the config and take the
    partition's share of the training and test records."""
    try:
        pid, parts = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except KeyError as e:
        raise ConfigError(
            f"start the SuperNode with --node-config 'data-root=\"<folder>\" ...' "
            f"(its own data) or 'partition-id=<i> num-partitions=<n>' "
            f"(missing {e})"
        ) from None
    if parts != cfg.fed.num_clients:
        raise ConfigError(f"num-partitions={parts} but fed.num_clients={cfg.fed.num_clients}")
    if DATA_ROOT in node_config:
        cfg = copy.deepcopy(cfg)
        cfg.data.root = str(node_config[DATA_ROOT])
    key = json.dumps(cfg.to_dict(), sort_keys=True)
    if key not in _federations:  # one per process, shared by the partitions it serves
        _federations[key] = build_federation(cfg)
    f = _federations[key]
    test = [f.test_records[i] for i in evaluation_partition(f.test_records, cfg)[pid]]
    return ClientSide(
        "partition",
        f"partition {pid}",
        pid,
        parts,
        f.client_dataset(pid),
        test,
        f.skeleton,
        f.model,
        f.layout,
        f.device,
    )


def _site_side(cfg: Config, node_config: dict, store: RecordDict | None) -> ClientSide:
    skeleton = dataset_skeleton(cfg.data.dataset)
    site = site_records(node_config, cfg.data, skeleton, store)
    model, layout, _ = build_model_and_strategy(cfg, skeleton)
    d = cfg.data
    dataset = PoseDataset(
        site.train, skeleton, d.input_size, d.sigma, train=d.augment, seed=cfg.seed
    )
    return ClientSide(
        "site",
        site.name,
        -1,
        0,
        dataset,
        site.test,
        skeleton,
        model,
        layout,
        resolve_device(cfg.train.device),
    )


_SITE_CACHE = "fedpose.site"  # context.state keys of a site's parsed records


def site_records(
    node_config: dict, data: DataConfig, skeleton: Skeleton, store: RecordDict | None = None
) -> SiteData:
    """The site's records, parsed and checked once per run on this SuperNode: the first message
    loads the annotation files (load_site) and keeps the records in `store` (context.state);
    later messages, each in a fresh process, take them from there as long as the node config
    and the annotation files' sizes and modification times are unchanged."""
    stamp = _site_stamp(node_config, data, skeleton)
    if store is not None and _SITE_CACHE in store.config_records:
        meta = store.config_records[_SITE_CACHE]
        if meta["stamp"] == stamp:
            return SiteData(
                str(meta["name"]),
                _records_from_store(store, meta, "train"),
                _records_from_store(store, meta, "test"),
            )
    site = load_site(node_config, data, skeleton)
    if store is not None:
        meta = ConfigRecord({"stamp": stamp, "name": site.name})
        _records_to_store(site.train, store, meta, "train")
        _records_to_store(site.test, store, meta, "test")
        store[_SITE_CACHE] = meta
    return site


def _site_stamp(node_config: dict, data: DataConfig, skeleton: Skeleton) -> str:
    files = site_data_config(node_config, data)
    stats = []
    for path in (files.root, files.ann, files.test_ann, files.headboxes):
        if path and Path(path).exists():
            st = Path(path).stat()
            stats.append([path, st.st_size, st.st_mtime_ns])
    return json.dumps([dict(node_config), skeleton.name, stats], sort_keys=True, default=str)


_RECORD_ARRAYS = ("joints", "visibility", "center", "person_box", "head_box")


def _records_to_store(
    records: list[PoseRecord], store: RecordDict, meta: ConfigRecord, split: str
) -> None:
    nan4 = np.full(4, np.nan, dtype=np.float32)
    tensors = (
        {
            name: torch.from_numpy(
                np.stack(
                    [
                        np.asarray(getattr(r, name) if getattr(r, name) is not None else nan4)
                        for r in records
                    ]
                )
            )
            for name in _RECORD_ARRAYS
        }
        if records
        else {}
    )
    if records:
        tensors["scale"] = torch.tensor([float(r.scale) for r in records], dtype=torch.float64)
    store[f"{_SITE_CACHE}.{split}"] = pack_state(tensors)
    meta[f"{split}-images"] = [str(r.image) for r in records]
    meta[f"{split}-ids"] = [r.record_id for r in records]


def _records_from_store(store: RecordDict, meta: ConfigRecord, split: str) -> list[PoseRecord]:
    images = list(meta.get(f"{split}-images", []))
    if not images:
        return []
    t = {
        name: tensor.numpy()
        for name, tensor in record_to_state(store.array_records[f"{_SITE_CACHE}.{split}"]).items()
    }

    def box(values: np.ndarray) -> np.ndarray | None:
        return None if np.isnan(values).all() else values

    return [
        PoseRecord(
            image=Path(image),
            joints=t["joints"][i],
            visibility=t["visibility"][i],
            center=t["center"][i],
            scale=float(t["scale"][i]),
            head_box=box(t["head_box"][i]),
            person_box=box(t["person_box"][i]),
            record_id=str(rid),
        )
        for i, (image, rid) in enumerate(zip(images, meta[f"{split}-ids"], strict=True))
    ]


_DATA_ERRORS = (DatasetError, ConfigError, OSError)


@client_app.query()
def _client_query(msg: Message, context: Context) -> Message:
    try:
        side = client_side(
            settings_from_run_config(context.run_config).config,
            dict(context.node_config),
            context.state,
        )
        answer = {
            "mode": side.mode,
            "name": side.name,
            "partition-id": side.partition_id,
            "num-partitions": side.num_partitions,
            "train-samples": len(side.dataset),
            "test-samples": len(side.test_records),
            "error": "",
        }
    except _DATA_ERRORS as e:  # the server refuses this node and says why
        nc = context.node_config
        answer = {
            "mode": "site" if is_site(nc) else "partition",
            "name": site_name(nc) if is_site(nc) else _describe(nc),
            "partition-id": int(nc.get("partition-id", -1)),
            "num-partitions": int(nc.get("num-partitions", 0)),
            "train-samples": 0,
            "test-samples": 0,
            "error": f"{_describe(nc)}: {e}",
        }
    return Message(RecordDict({"config": ConfigRecord(answer)}), reply_to=msg)


def _describe(node_config) -> str:
    if is_site(node_config):
        return f"site {site_name(node_config)}"
    return f"partition {node_config.get('partition-id', '?')}"


@client_app.train()
def _client_train(msg: Message, context: Context) -> Message:
    started, started_wall = time.perf_counter(), time.time()
    cfg_record = msg.content["config"]
    client_id, version = int(cfg_record["client-id"]), int(cfg_record["version"])
    try:
        cfg = settings_from_run_config(context.run_config).config
        side = client_side(cfg, dict(context.node_config), context.state)
        if side.mode == "partition" and client_id != side.partition_id:
            raise RuntimeError(
                f"request for client {client_id} reached partition {side.partition_id}"
            )
        request = content_to_request(msg.content)
        reply, state = local_train(
            side.model,
            local_batches(side.dataset, request, cfg),
            request,
            records_to_client_state(context.state),
            cfg.train,
            side.layout,
            side.device,
            num_samples=len(side.dataset),
        )
        client_state_to_records(state, context.state)
    except Exception as e:  # a failed client is a rejected reply, as in-process
        traceback.print_exc()
        reply = TrainReply(
            client_id=client_id,
            version=version,
            error=f"{_describe(context.node_config)}: {type(e).__name__}: {e}",
        )
    timing = {
        "handler-started": started_wall,
        "handler-seconds": time.perf_counter() - started,
        "process-age": _process_age(started_wall),
    }
    return Message(reply_to_content(reply, timing), reply_to=msg)


@client_app.evaluate()
def _client_evaluate(msg: Message, context: Context) -> Message:
    try:
        cfg = settings_from_run_config(context.run_config).config
        side = client_side(cfg, dict(context.node_config), context.state)
        weights = record_to_state(msg.content["weights"])
        correct, counted = count_correct(
            side.model, weights, side.test_records, side.skeleton, cfg, side.device
        )
        ev = SiteEvaluation(-1, len(side.test_records), correct, counted)
    except Exception as e:  # reported to the server, never a crash of the run
        traceback.print_exc()
        ev = SiteEvaluation(
            -1,
            0,
            np.zeros(0),
            np.zeros(0),
            f"{_describe(context.node_config)}: {type(e).__name__}: {e}",
        )
    return Message(evaluation_to_content(ev), reply_to=msg)


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
