"""Secure aggregation on Flower (engine/flower_secagg.py): the client mod's two phases in
process, and (slow) real SuperLink/SuperNode runs of FedAvg and FedGH under SecAgg+ whose
ServerApp writes down every message it receives."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from flwr.common.secure_aggregation.secaggplus_constants import Key
from rich.console import Console
from test_flower import _running_with_home

from fedpose.config import ConfigError
from fedpose.engine.flower_secagg import (
    INSPECT_ENV,
    SKETCH_SECRET,
    check_server_config,
    quantisation_bound,
)
from fedpose.engine.runner import run_federation
from fedpose.fl.params import model_layout
from fedpose.tools.flower_demo import demo_config, renamed, run_flower


def test_the_server_refuses_a_run_config_that_holds_the_secret(tmp_path):
    cfg = demo_config(None, 2, 1, [f"out_dir={tmp_path}", "fed.secure=true"])
    cfg.fed.sketch_secret = "leaked"
    with pytest.raises(ConfigError, match="SuperNode"):
        check_server_config(cfg.fed)


def test_quantisation_bound_follows_secaggplus():
    # K clients, each rounded stochastically on a grid of 2 clip / 2^22
    assert quantisation_bound(4, 1.0) == 4 * 2.0 / 2**22


def _received(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _clear_vectors(summaries: list[dict]) -> list[tuple[str, str, int]]:
    """(record, dtype, size) of every float vector a received message held in the clear."""
    out = []
    for msg in summaries:
        for record, entries in msg["records"].items():
            for key, entry in entries.items():
                if entry["kind"] == "array":
                    if entry["dtype"].startswith("float") or entry["dtype"] in ("<f4", "<f8"):
                        out.append((f"{record}/{key}", entry["dtype"], entry["size"]))
                    elif entry["dtype"] == "uint8":  # a packed state: fedpose's float tensors
                        out.append((f"{record}/{key}", "packed", entry["size"] // 4))
                elif entry["kind"] in ("config", "metric"):
                    for v in entry["values"]:
                        if v["dtype"].startswith("float") and v["size"] > 1:
                            out.append((f"{record}/{key}", v["dtype"], v["size"]))
    return out


def _masked_vectors(summaries: list[dict]) -> list[tuple[str, int]]:
    return [
        (v["dtype"], v["size"])
        for msg in summaries
        for entries in msg["records"].values()
        for key, entry in entries.items()
        if entry["kind"] == "config" and key == Key.MASKED_PARAMETERS
        for v in entry["values"]
    ]


@pytest.mark.slow
@pytest.mark.parametrize("method, width", [("fedavg", 0), ("fedgh", 1024)])
def test_secure_flower_run_reveals_no_update_and_matches(tmp_path, method, width):
    """SLOW (about 60-90 s): a SuperLink and 2 SuperNodes run one secure round; the ServerApp
    records every message it receives. None holds a float vector longer than the sketch; the
    masked vectors are integers; the final model is the in-process run's (exact sum, same
    sketches) within SecAgg+'s stated quantisation error."""
    secret = "consortium-test-secret"
    overrides = [
        f"out_dir={tmp_path / 'runs'}",
        f"data.root={tmp_path / 'synth-arm'}",
        f"fed.method={method}",
        "fed.secure=true",
    ]
    if width:
        overrides.append(f"fed.sketch_width={width}")
    cfg = demo_config(None, supernodes=2, rounds=1, overrides=overrides)
    log = tmp_path / "received.jsonl"
    work = tmp_path / "flower"
    node_configs = [
        f'partition-id={i} num-partitions=2 {SKETCH_SECRET}="{secret}"' for i in range(2)
    ]
    envs = [{}, {}, {INSPECT_ENV: str(log)}]  # the last one: the SuperLink's, hence the ServerApp's
    try:
        flower = run_flower(
            renamed(cfg, "secure-flower"),
            2,
            Console(width=100),
            work,
            timeout=400,
            node_configs=node_configs,
            envs=envs,
        )
    finally:
        assert _running_with_home(work / "flwr-home") == [], "Flower processes left running"
    assert flower.status["status"] == "finished:completed"

    # the in-process run of the same secure protocol: same sketches, exact sum
    local_cfg = renamed(cfg, "secure-local")
    local_cfg.fed.sketch_secret = secret
    local = run_federation(local_cfg, console=Console(width=100))
    p = local.layout.slices[-1][2]

    received = _received(log)
    assert any(m["type"] == "train" for m in received)
    clear = _clear_vectors(received)
    longest = max((size for _, _, size in clear), default=0)
    assert longest <= max(width, 64), clear  # sketches, BN-free scalars; never P values
    masked = _masked_vectors(received)
    assert masked and all(d.startswith(("int", "uint")) for d, _ in masked), masked
    assert max(size for _, size in masked) >= p  # the masked c_k Δ_k did arrive, masked

    bound = quantisation_bound(2, cfg.fed.secagg_clip)
    for name, w in local.weights.items():
        fw = flower.weights[name]
        if w.is_floating_point():
            # SecAgg+'s bound, plus the float32 rounding of adding the sum to the weights
            allowed = bound + 4 * 2.0**-24 * w.double().abs()
            assert bool(((fw.double() - w.double()).abs() <= allowed).all()), name
        else:
            assert torch.equal(fw, w), name
    rows = [json.loads(x) for x in (flower.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["secure"] is True and rows[-1]["secagg_clients"] == 2
    assert rows[-1]["secagg_clipped"] == 0
    assert np.isfinite(rows[-1]["train_loss"])


# ----------------------------------------------------------------------------- SecAgg+ in process
class _SitesGrid:
    """A Grid whose nodes are ClientApp mods in this process: the SecAgg+ workflow talks to
    fedpose's client_secure_mod exactly as over a SuperLink. `drop`: node -> the SecAgg+ stage
    at which it stops answering."""

    def __init__(self, run_config: dict, updates: dict[int, torch.Tensor], drop: dict | None):
        from flwr.app import Context, RecordDict

        from fedpose.engine.flower_messages import pack_state
        from fedpose.engine.flower_secagg import _KEPT

        self.drop = drop or {}
        self.contexts = {}
        for node, delta in updates.items():
            ctx = Context(
                run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config=run_config
            )
            ctx.state[_KEPT] = pack_state({"delta": delta})  # what phase 1 left on the site
            self.contexts[node] = ctx

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ARG002 (Grid signature)
        from flwr.app import Error, Message

        from fedpose.engine.flower_secagg import client_secure_mod

        replies = []
        for sent in messages:
            node = sent.metadata.dst_node_id
            # each node gets its own copy, as over the wire (the mod edits what it receives)
            msg = Message(
                copy.deepcopy(sent.content),
                dst_node_id=node,
                message_type=sent.metadata.message_type,
                group_id=sent.metadata.group_id,
            )
            if self.drop.get(node) == msg.content["secaggplus_configs"]["stage"]:
                replies.append(Message(Error(code=0, reason="site gone"), reply_to=msg))
                continue
            replies.append(client_secure_mod(msg, self.contexts[node], None))
        return replies


@pytest.mark.parametrize("drop", [None, {103: "collect_masked_vectors"}])
def test_secaggplus_sums_the_weighted_updates_and_survives_a_dropout(monkeypatch, drop):
    from flwr.supercore.task_identity import TaskIdentity

    from fedpose.engine.flower_messages import CONFIG_KEY
    from fedpose.engine.flower_secagg import FlowerSecureTransport

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    cfg = demo_config(None, 3, 1, ["fed.secure=true", "fed.method=fedavg"])
    gen = torch.Generator().manual_seed(0)
    deltas = {101 + k: (torch.randn(500, generator=gen) * 0.01).float() for k in range(3)}
    grid = _SitesGrid({CONFIG_KEY: json.dumps(cfg.to_dict())}, deltas, drop)
    inner = type("Inner", (), {})()
    inner.grid, inner.node_of, inner.reply_timeout = grid, {0: 101, 1: 102, 2: 103}, 30.0
    layout = model_layout(torch.nn.Linear(2, 2))  # no BatchNorm statistics
    transport = FlowerSecureTransport(inner, layout, cfg.fed)
    coef = [0.2, 0.5, 0.3]
    total, averaged = transport.secure_sum([0, 1, 2], coef, [1 / 3] * 3)
    kept = [k for k in range(3) if (drop or {}).get(101 + k) is None]
    scale = sum(coef) / sum(coef[k] for k in kept)
    expected = sum(coef[k] * deltas[101 + k].double() for k in kept) * scale
    bound = quantisation_bound(len(kept), cfg.fed.secagg_clip) * scale
    err = float((total.double() - expected).abs().max())
    assert err <= bound + 4 * 2.0**-24 * float(expected.abs().max())
    assert err > 0  # it did go through the quantiser: not a copy of the plain sum
    assert transport.last_sum["secagg_clients"] == len(kept)
    assert transport.last_sum["secagg_dropped"] == 3 - len(kept)
    assert averaged == {}
