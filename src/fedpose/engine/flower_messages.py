"""What fedpose's Flower ServerApp and ClientApps exchange: message contents, evaluation counts
and the run config. The ServerApp is `engine/flower_server.py`, the ClientApp
`engine/flower_client.py`.

Message layout (Flower Message API, no NumPyClient). Every state dict is packed into two Flower
Arrays (`pack_state`: a JSON layout and one byte buffer), not one Array per tensor.
  query          reply "config": ConfigRecord mode, name, partition-id, num-partitions,
                                 train-samples, test-samples, error (why the node is refused)
  train request  "weights": packed ArrayRecord (global state dict)
                 "config":  ConfigRecord client-id, version, round, seed
                 "control": packed {"c": SCAFFOLD's server control variate} (SCAFFOLD only)
  train reply    "update":  packed ArrayRecord {"delta": flat float32 update,
                            "control-delta": SCAFFOLD's c_k⁺ − c_k (SCAFFOLD only),
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
  return-model-mb    the ServerApp writes the final model into its log stream (for `fedpose
                     flower-pull`) when the file is at most this many MiB; 0 = never
  flat keys          the common knobs, Flower style (FLAT_KEYS: num-server-rounds, num-clients,
                     local-steps, lr, method, ...): each overrides its setting of the full
                     config; num-clients = 0 means one client per partition of the connected
                     SuperNodes (Flower's simulation gives each virtual SuperNode
                     partition-id / num-partitions)
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpose.bounded import ParseError, loads_json
from fedpose.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    merge_dicts,
    parse_overrides,
)
from fedpose.data.records import PoseRecord, Skeleton
from fedpose.engine.evaluate import evaluate_counts
from fedpose.fl.messages import TrainReply, TrainRequest
from fedpose.metrics.pck import score_counts
from fedpose.model.inference import load_weights

CONFIG_KEY = "fedpose-config"
OVERRIDES_KEY = "fedpose-overrides"
RESUME_KEY = "fedpose-resume"
REPLY_TIMEOUT_KEY = "reply-timeout"
CONNECT_TIMEOUT_KEY = "connect-timeout"
CENTRAL_EVAL_KEY = "central-eval"
RETURN_MODEL_KEY = "return-model-mb"
NUM_CLIENTS_KEY = "num-clients"
# Defaults of the two waits (pyproject.toml's [tool.flwr.app.config] repeats them: keep in step).
# A round of real training on a slow CPU site can take many minutes; a SuperNode that has not
# connected within two minutes of the start is not coming.
REPLY_TIMEOUT_S = 900.0
CONNECT_TIMEOUT_S = 120.0
RETURN_MODEL_MB = 16.0
# Flat run config keys, Flower style, for the settings people change most: key -> the Config
# setting it overrides ("section.key", or "key" at the top). `--run-config "num-server-rounds=5
# lr=0.01"` works as in Flower's own apps. `track` is a comma-separated list.
FLAT_KEYS: dict[str, str] = {
    "num-server-rounds": "fed.rounds",
    NUM_CLIENTS_KEY: "fed.num_clients",
    "clients-per-round": "fed.clients_per_round",
    "local-steps": "fed.local_steps",
    "lr": "train.lr",
    "batch-size": "train.batch_size",
    "method": "fed.method",
    "eval-every": "fed.eval_every",
    "seed": "seed",
    "track": "track",
}
# What a plain `flwr run .` runs (pyproject.toml's [tool.flwr.app.config] repeats it: keep in
# step, tests/test_flower_app.py checks): a narrow model for 3 short rounds on a small synth-arm
# set, one client per SuperNode of Flower's default local simulation (2 virtual SuperNodes).
QUICKSTART_CONFIG = {
    "name": "flower-quickstart",
    "seed": 0,
    "track": ["csv"],
    "data": {
        "root": "data/synth-arm-quickstart",
        "generate": True,
        "synth_n": 400,
        "synth_size": 64,
    },
    "model": {"width": 8, "deconv_filters": 32},
    "train": {"lr": 0.002, "batch_size": 16, "flip_test": False},
    "fed": {
        "rounds": 3,
        "clients_per_round": 0,
        "local_steps": 4,
        "method": "fedgh",
        "eval_every": 1,
    },
}
# The flat keys' declared values: the quick start's own settings (a key left at its declared
# value changes nothing), and num-clients = 0 (follow the partitions)
QUICKSTART_FLAT: dict[str, str | int | float] = {
    "num-server-rounds": 3,
    NUM_CLIENTS_KEY: 0,
    "clients-per-round": 0,
    "local-steps": 4,
    "lr": 0.002,
    "batch-size": 16,
    "method": "fedgh",
    "eval-every": 1,
    "seed": 0,
    "track": "csv",
}
# what `[tool.flwr.app.config]` must declare (flwr only accepts overrides of declared keys)
DEFAULT_RUN_CONFIG: dict[str, str | bool | float | int] = {
    CONFIG_KEY: json.dumps(QUICKSTART_CONFIG),
    OVERRIDES_KEY: "",
    RESUME_KEY: False,
    REPLY_TIMEOUT_KEY: REPLY_TIMEOUT_S,
    CONNECT_TIMEOUT_KEY: CONNECT_TIMEOUT_S,
    CENTRAL_EVAL_KEY: False,
    RETURN_MODEL_KEY: RETURN_MODEL_MB,
    **QUICKSTART_FLAT,
}
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
    content = RecordDict(
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
    if request.control is not None:  # SCAFFOLD's server control variate
        content["control"] = pack_state({"c": request.control})
    return content


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
        control=record_to_state(content["control"])["c"] if "control" in content else None,
    )


_AVERAGED = "averaged/"  # name prefix of the averaged tensors in a reply's packed "update"
CONTROL_DELTA = "control-delta"  # SCAFFOLD: c_k⁺ − c_k in a reply's packed "update"


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
        extra = {} if reply.control_delta is None else {CONTROL_DELTA: reply.control_delta}
        content["update"] = pack_state(
            {
                "delta": reply.delta,
                **extra,
                **{_AVERAGED + name: t for name, t in reply.averaged.items()},
            }
        )
    return content


def content_to_reply(content: RecordDict) -> TrainReply:
    cfg, metrics = content["config"], content["metrics"]
    update = record_to_state(content["update"]) if "update" in content else {}
    if "counters" in content:  # secure aggregation: integer BatchNorm counters in the clear
        for name, values in content["counters"].items():
            update[_AVERAGED + name] = torch.tensor(values, dtype=torch.int64).reshape(())
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
        control_delta=update.get(CONTROL_DELTA),
        # secure aggregation's phase 1 (engine/flower_secagg.py): a sketch instead of the update
        sketch=record_to_state(content["sketch"])["sketch"] if "sketch" in content else None,
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
    return evaluate_counts(
        model,
        records,
        skeleton,
        device,
        input_size=cfg.data.input_size,
        flip_test=cfg.train.flip_test,
    )


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
    # num-clients = 0: fed.num_clients is taken from the SuperNodes' num-partitions
    follow_partitions: bool = False
    return_model_mb: float = RETURN_MODEL_MB
    # flat keys that changed a setting of a given fedpose-config: "setting=value (was old)"
    overridden: list[str] = field(default_factory=list)


def settings_from_run_config(run_config: dict, node_config: dict | None = None) -> AppSettings:
    """The fedpose Config and engine settings carried by a Flower run config.

    Order: the full config (fedpose-config), then each flat key whose value differs from its
    declared one (DEFAULT_RUN_CONFIG: a key nobody set changes nothing), then fedpose-overrides.
    num-clients = 0 means: as many clients as the SuperNodes' partitions (Flower's simulation
    gives each virtual SuperNode partition-id / num-partitions); a ClientApp passes its
    node_config and gets fed.num_clients = its num-partitions, the ServerApp learns it from the
    SuperNodes' answers (AppSettings.follow_partitions). SuperNodes with their own data have no
    partitions: fed.num_clients then stays the config's."""
    source = str(run_config.get(CONFIG_KEY, "") or "").strip()
    overrides = shlex.split(str(run_config.get(OVERRIDES_KEY, "") or ""))
    if source.startswith("{"):
        try:
            values = loads_json(source, CONFIG_KEY)
        except ParseError as e:
            raise ConfigError(f"{e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{CONFIG_KEY}: not a JSON object")
        base = config_from_dict(values)
    else:
        base = load_config(source or None)
    flat, follow = _flat_overrides(run_config, node_config)
    tree = merge_dicts(base.to_dict(), parse_overrides(flat))
    cfg = config_from_dict(merge_dicts(tree, parse_overrides(overrides)))
    overridden = []
    if source and not _is_quickstart(source):
        for item in flat:
            key, value = item.split("=", 1)
            old = _setting(base, key)
            if old != _setting(cfg, key):
                overridden.append(f"{key}={_setting(cfg, key)} (fedpose-config: {old})")
    return AppSettings(
        config=cfg,
        resume=bool(run_config.get(RESUME_KEY, False)),
        reply_timeout=float(run_config.get(REPLY_TIMEOUT_KEY, REPLY_TIMEOUT_S)),
        connect_timeout=float(run_config.get(CONNECT_TIMEOUT_KEY, CONNECT_TIMEOUT_S)),
        central_eval=bool(run_config.get(CENTRAL_EVAL_KEY, False)),
        follow_partitions=follow,
        return_model_mb=float(run_config.get(RETURN_MODEL_KEY, RETURN_MODEL_MB)),
        overridden=overridden,
    )


def _is_quickstart(source: str) -> bool:
    try:
        return json.loads(source) == QUICKSTART_CONFIG
    except json.JSONDecodeError:
        return False


def _flat_overrides(run_config: dict, node_config: dict | None) -> tuple[list[str], bool]:
    """The flat keys present as `section.key=value` overrides, and whether the number of
    clients follows the partitions."""
    items, follow = [], False
    for key, setting in FLAT_KEYS.items():
        if key not in run_config:
            continue
        value = run_config[key]
        if value == DEFAULT_RUN_CONFIG[key] and key != NUM_CLIENTS_KEY:
            continue
        if key == NUM_CLIENTS_KEY and int(value) == 0:
            follow = True
            if node_config and "num-partitions" in node_config:
                items.append(f"{setting}={int(node_config['num-partitions'])}")
            continue
        if key == "track":
            value = [k.strip() for k in str(value).split(",") if k.strip()]
        items.append(f"{setting}={value}")
    return items, follow


def _setting(cfg: Config, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def run_config_toml(cfg: Config, **settings: str | bool | float) -> str:
    """`[tool.flwr.app.config]` lines (or a `flwr run --run-config` file) carrying `cfg` as JSON,
    with the flat keys set from `cfg` (they override the JSON: here they agree with it).

    settings: other run config keys, with `_` for `-` (reply_timeout=60.0)."""
    values = dict(DEFAULT_RUN_CONFIG)
    values[CONFIG_KEY] = json.dumps(cfg.to_dict())
    for key, setting in FLAT_KEYS.items():
        value = _setting(cfg, setting)
        values[key] = ",".join(value) if key == "track" else value
    for key, value in settings.items():
        key = key.replace("_", "-")
        if key not in values:
            raise KeyError(f"unknown run config key {key!r}; known: {', '.join(values)}")
        values[key] = value
    return "".join(f"{key} = {_toml_value(value)}\n" for key, value in values.items())


def _toml_value(value: str | bool | float | int) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string literal is a valid TOML basic string
    if isinstance(value, int):
        return str(value)
    return repr(float(value))
