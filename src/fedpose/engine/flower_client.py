"""Flower 1.42 ClientApp: fedpose's `local_train` and evaluation on one SuperNode's data.

Clients (from `flower-supernode --node-config`):
  a site         data-root="<folder>" and optionally dataset, ann, test-ann, headboxes,
                 lsp-labels, name (see fedpose.data.site): the site trains and evaluates on its
                 own files only; sites are numbered in the order of their names
  a partition    partition-id=<i> num-partitions=<n> (the simulation shortcut, and what Flower's
                 Simulation Engine gives every virtual SuperNode): the node builds the whole
                 federation from the Config and serves partition i of it; an optional data-root
                 says where this node keeps the Config's dataset

Training and evaluation report a failure (unreadable data, a broken config, an exception) in
their reply instead of crashing, and a node whose data cannot be read says why when queried; the
server counts such clients as failed. Local DP
(`client_dp_mod`, `engine/flower_dp.py`) noises train replies when the run's config asks for it.
What travels in the messages: `engine/flower_messages.py`; the ServerApp:
`engine/flower_server.py`.
"""

from __future__ import annotations

import copy
import json
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedpose.config import Config, ConfigError, DataConfig
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
from fedpose.engine.flower_dp import dp_enabled, noise_std, privatize_update
from fedpose.engine.flower_messages import (
    SiteEvaluation,
    client_state_to_records,
    content_to_request,
    count_correct,
    evaluation_to_content,
    pack_state,
    record_to_state,
    records_to_client_state,
    reply_to_content,
    settings_from_run_config,
)
from fedpose.engine.flower_secagg import client_secure_mod
from fedpose.fl.client import local_batches, local_train
from fedpose.fl.messages import TrainReply
from fedpose.fl.params import ModelLayout
from fedpose.model.inference import resolve_device


def client_dp_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's LocalDpMod on train replies when the run's config asks for it. The config
    lives in the run config, so the mod is chosen per message, not fixed at import."""
    if msg.metadata.message_type != "train":
        return call_next(msg, context)
    try:
        fed = settings_from_run_config(context.run_config, dict(context.node_config)).config.fed
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


# outermost first: under fed.secure the secure mod sees the update after LocalDpMod's noise
client_app = ClientApp(mods=[client_secure_mod, client_dp_mod])


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
            settings_from_run_config(context.run_config, dict(context.node_config)).config,
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
        cfg = settings_from_run_config(context.run_config, dict(context.node_config)).config
        side = client_side(cfg, dict(context.node_config), context.state)
        if side.mode == "partition" and client_id != side.partition_id:
            raise RuntimeError(
                f"request for client {client_id} reached partition {side.partition_id}"
            )
        request = content_to_request(msg.content)
        reply, state = local_train(
            side.model,
            local_batches(side.dataset, request, cfg.fed, cfg.train.batch_size, cfg.data.workers),
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
        cfg = settings_from_run_config(context.run_config, dict(context.node_config)).config
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
