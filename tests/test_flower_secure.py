"""Secure aggregation on Flower (engine/flower_secagg.py): the client mod's two phases in
process, and (slow) real SuperLink/SuperNode runs of FedAvg and FedGH under SecAgg+ whose
ServerApp writes down every message it receives."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import secure_sites
import torch
from flwr.common.secure_aggregation.secaggplus_constants import Key
from rich.console import Console
from secure_sites import AVERAGING
from test_flower import _running_with_home

from fedpose.config import ConfigError
from fedpose.engine import runner
from fedpose.engine.flower_secagg import (
    DROP_ENV,
    INSPECT_ENV,
    SKETCH_SECRET,
    check_server_config,
    quantisation_bound,
)
from fedpose.engine.runner import run_federation
from fedpose.fl.server import CHECKPOINT_CLASSES
from fedpose.model.io import checkpoint_paths, read_checkpoint
from fedpose.tools.flower_demo import FlowerDemoError, demo_config, renamed, run_flower


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
@pytest.mark.parametrize(
    "method, width",
    # SCAFFOLD's case in make test-slow only (long): CI keeps within its 20 minutes with FedAvg and
    # FedGH, and the same SCAFFOLD sums are checked in-process by the fast suite
    [("fedavg", 0), ("fedgh", 1024), pytest.param("scaffold", 0, marks=pytest.mark.long)],
)
def test_secure_flower_run_reveals_no_update_and_matches(tmp_path, method, width):
    """SLOW (about 3-4 min each): a SuperLink and 2 SuperNodes run one secure round; the
    ServerApp records every message it receives. None holds a float vector longer than the
    sketch; the masked vectors are integers; the final model (and SCAFFOLD's control variate,
    summed in the same masked vector) is the in-process run's (exact sum, same sketches) within
    SecAgg+'s stated quantisation error."""
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
    if method == "scaffold":
        last, _ = checkpoint_paths(flower.run_dir / "checkpoints")
        c = read_checkpoint(last, CHECKPOINT_CLASSES)[0]["server"].strategy["c"]
        exact = local.state.strategy["c"].double()
        assert exact.abs().max() > 100 * bound  # the control variate moved
        assert bool(((c.double() - exact).abs() <= bound + 2.0**-23 * exact.abs()).all())
    rows = [json.loads(x) for x in (flower.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["secure"] is True and rows[-1]["secagg_clients"] == 2
    assert rows[-1]["secagg_clipped"] == 0
    assert np.isfinite(rows[-1]["train_loss"])


class _LosesClientInProcess:
    """The in-process transport with one client's reply refused: the plain survivors' run."""

    def __init__(self, inner, lost: int):
        self.inner, self.lost = inner, lost

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def receive(self, client_id: int):
        reply = self.inner.receive(client_id)
        if client_id == self.lost:
            reply.error = "lost during the secure sum on Flower"
        return reply


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("stage", ["collect_masked_vectors", "share_keys"])
def test_a_site_that_exits_during_secaggplus(tmp_path, stage):
    """SLOW (about 4-5 min each): a SuperLink and 3 SuperNodes run one secure FedAvg round; the
    third site's ClientApp process exits without a reply at one SecAgg+ stage (DROP_ENV on its
    SuperNode), and Flower answers for it once its heartbeat lapses.

    Lost while the masked vectors are collected: SecAgg+ removes the lost site's masks with
    the others' key shares and the run completes; the model is the plain in-process FedAvg
    round over the two survivors within SecAgg+'s quantisation bound, and no message the
    ServerApp received held an update. Lost while the keys are shared: no shares of its keys
    exist, Flower 1.42's unmask stage wants them, SecAgg+ halts; the run fails with one line
    saying so and leaves no metrics, checkpoint or model."""
    overrides = [
        f"out_dir={tmp_path / 'runs'}",
        f"data.root={tmp_path / 'synth-arm'}",
        "fed.method=fedavg",
        "fed.secure=true",
    ]
    cfg = renamed(demo_config(None, supernodes=3, rounds=1, overrides=overrides), "lost-site")
    log = tmp_path / "received.jsonl"
    work = tmp_path / "flower"
    envs = [{}, {}, {DROP_ENV: stage}, {INSPECT_ENV: str(log)}]
    try:
        flower = run_flower(cfg, 3, Console(width=100), work, timeout=500, envs=envs)
    except FlowerDemoError as e:
        flower, failure = None, str(e)
    finally:
        assert _running_with_home(work / "flwr-home") == [], "Flower processes left running"
    assert "this site drops out of SecAgg+ here" in (work / "logs" / "supernode-2.log").read_text()

    if stage == "share_keys":
        assert flower is None and "finished:failed" in failure
        lines = (work / "logs" / "flwr-run.log").read_text().splitlines()
        said = [x for x in lines if "run failed: SecureAggregationError" in x]
        assert len(said) == 1 and "round 1: SecAgg+ halted" in said[0], said
        assert said[0].endswith("see the ServerApp log"), said  # the whole message, one line
        # the run folder holds what the run started with (config, clients, timings) only
        written = {str(f.relative_to(cfg.run_dir)) for f in cfg.run_dir.rglob("*") if f.is_file()}
        assert not written & {"metrics.jsonl", "model.safetensors"}, written
        assert not [f for f in written if f.startswith("checkpoints")], written
        return

    assert flower.status["status"] == "finished:completed"
    # the reference: the same round in-process, without secure aggregation, client 2 refused
    local_cfg = renamed(cfg, "survivors-local")
    local_cfg.fed.secure = False
    local = run_federation(
        local_cfg,
        console=Console(width=100),
        transport_factory=lambda federation: _LosesClientInProcess(
            runner.local_transport(federation), lost=2
        ),
    )
    rows = [json.loads(x) for x in (flower.run_dir / "metrics.jsonl").read_text().splitlines()]
    row = rows[-1]
    assert row["aggregated"] == [0, 1, 2]  # phase 1: all three sites trained and sent counts
    assert row["secagg_clients"] == 2 and row["secagg_dropped"] == [2]
    n = local.client_sizes
    scale = sum(n) / (n[0] + n[1])  # FedAvg's coefficients n_k / n, brought to the survivors
    assert row["survivor_scale"] == pytest.approx(scale, rel=1e-12)
    bound = quantisation_bound(2, cfg.fed.secagg_clip) * scale
    worst = 0.0
    for name, w in local.weights.items():
        fw = flower.weights[name]
        if w.is_floating_point():
            diff = (fw.double() - w.double()).abs()
            # the bound, plus the float32 rounding of adding the sum to the weights
            assert bool((diff <= bound + 4 * 2.0**-24 * w.double().abs()).all()), name
            worst = max(worst, float(diff.max()))
        else:
            assert torch.equal(fw, w), name
    print(f"largest weight difference {worst:.3g} (bound {bound:.3g}); {row['agg_seconds']:.0f} s")

    received = _received(log)
    p = local.layout.slices[-1][2]
    assert max((size for _, _, size in _clear_vectors(received)), default=0) <= 64
    masked = _masked_vectors(received)
    assert masked and all(d.startswith(("int", "uint")) for d, _ in masked), masked
    assert max(size for _, size in masked) >= p


# ----------------------------------------------------------------------------- SecAgg+ in process
@pytest.fixture
def flower_ids(monkeypatch):
    """Flower Messages outside a run need a task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class _Sites:
    """Flower sites in this process: every node is fedpose's ClientApp mod with a context of its
    own, so FlowerSecureTransport talks to client_secure_mod and secaggplus_mod as it does over a
    SuperLink. Phase 1 through `send`/`receive` (the FlowerTransport it wraps), phase 2 through
    the Grid's `send_and_receive`. `drop`: node -> the SecAgg+ stage at which that site stops
    answering. `computed`: what each site computed this round (the test's knowledge, never the
    server's); `received`: a summary of every message the server side received."""

    def __init__(self, cfg, drop: dict | None = None):
        from flwr.app import Context, RecordDict

        from fedpose.engine.flower_messages import CONFIG_KEY

        self.grid = self
        self.reply_timeout = 30.0
        self.node_of = {k: 101 + k for k in range(cfg.fed.num_clients)}
        run_config = {CONFIG_KEY: json.dumps(cfg.to_dict())}
        self.contexts = {
            node: Context(
                run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config=run_config
            )
            for node in self.node_of.values()
        }
        self.layout = secure_sites.layout()
        self.drop = drop or {}
        self.computed: dict[int, object] = {}
        self.replies: dict[int, object] = {}
        self.received: list[dict] = []

    def send(self, request) -> None:
        from flwr.app import Message

        from fedpose.engine.flower_messages import reply_to_content, request_to_content
        from fedpose.engine.flower_secagg import client_secure_mod

        node = self.node_of[request.client_id]
        msg = Message(request_to_content(request), dst_node_id=node, message_type="train")
        reply = secure_sites.site_reply(request, self.layout)
        self.computed[request.client_id] = reply

        def train(m, _context):  # the ClientApp's train handler
            return Message(reply_to_content(reply), reply_to=m)

        self.replies[request.client_id] = client_secure_mod(msg, self.contexts[node], train)

    def receive(self, client_id: int):
        from fedpose.engine.flower_messages import content_to_reply
        from fedpose.engine.flower_secagg import message_summary

        msg = self.replies.pop(client_id)
        self.received.append(message_summary(msg))
        return content_to_reply(msg.content)

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ARG002 (Grid signature)
        from flwr.app import Error, Message

        from fedpose.engine.flower_secagg import client_secure_mod, message_summary

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
            try:
                replies.append(client_secure_mod(msg, self.contexts[node], None))
            except Exception as e:  # a ClientApp that raises answers with an error, in Flower
                replies.append(Message(Error(code=0, reason=repr(e)), reply_to=msg))
        self.received += [message_summary(r) for r in replies]
        return replies

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class _Recorder:
    """The secure transport, with each round's exact sums beside what SecAgg+ revealed."""

    def __init__(self, transport, sites: _Sites):
        self.transport, self.sites = transport, sites
        self.rounds: list[tuple[dict, object]] = []

    def __getattr__(self, name):
        return getattr(self.transport, name)

    def secure_sum(self, client_ids, coef, avg_weights, control_coef=None):
        totals = self.transport.secure_sum(client_ids, coef, avg_weights, control_coef)
        rows = [self.sites.computed[k] for k in totals.kept]
        c = {k: (coef[i], avg_weights[i]) for i, k in enumerate(client_ids)}
        exact = {"update": sum(c[r.client_id][0] * r.delta.double() for r in rows)}
        if control_coef is not None:
            e = dict(zip(client_ids, control_coef, strict=True))
            exact["control"] = sum(e[r.client_id] * r.control_delta.double() for r in rows)
        a = math.fsum(c[r.client_id][1] for r in rows)
        for name in self.sites.layout.avg_names:
            if rows[0].averaged[name].is_floating_point():
                exact[name] = sum(c[r.client_id][1] * r.averaged[name].double() for r in rows) / a
        # a copy: the server's step may scale the sums in place
        self.rounds.append((exact, copy.deepcopy(totals)))
        return totals


def _within_bound(got: torch.Tensor, exact: torch.Tensor, clients: int, clip: float) -> bool:
    """SecAgg+'s stated error, plus the float32 rounding of the result."""
    allowed = quantisation_bound(clients, clip) + 2.0**-23 * exact.abs()
    return bool(((got.double() - exact).abs() <= allowed).all())


def _received_no_update(sites: _Sites, p: int) -> None:
    """The inspection test's conditions on every message the server side received."""
    clear = _clear_vectors(sites.received)
    assert max((size for _, _, size in clear), default=0) < p, clear
    masked = _masked_vectors(sites.received)
    assert masked and all(d.startswith(("int", "uint")) for d, _ in masked), masked
    assert max(size for _, size in masked) >= p  # the masked c_k Δ_k did arrive, masked


# the server steps that are linear in the sums: their weights follow from the sums' errors
_LINEAR = ("fedavg", "fedprox", "feddyn", "fedavgm", "scaffold", "scaffold+server_opt")


@pytest.mark.parametrize("name", list(AVERAGING))
@pytest.mark.usefixtures("flower_ids")
def test_every_averaging_strategy_sums_through_secaggplus(name):
    """FedAvg, FedProx, FedDyn, the server optimisers and SCAFFOLD on the Flower path, sites
    and SecAgg+ in this process: each round's update (and SCAFFOLD's control variate change,
    in the same masked vector) is the exact sum within SecAgg+'s quantisation bound, no
    message holds a parameter-length float vector, and where the server step is linear in the
    sums the weights are the plain run's within the bounds of the rounds added up."""
    from fedpose.engine.flower_secagg import FlowerSecureTransport

    cfg = secure_sites.config(*AVERAGING[name], "fed.secure=true")
    sites = _Sites(cfg)
    recorder = _Recorder(FlowerSecureTransport(sites, sites.layout, cfg.fed), sites)
    flower = secure_sites.server(cfg, recorder)
    flower.run()
    plain = secure_sites.server(
        secure_sites.config(*AVERAGING[name]), secure_sites.SeededSites(sites.layout)
    )
    plain.run()

    clip, p = cfg.fed.secagg_clip, sites.layout.slices[-1][2]
    assert len(recorder.rounds) == secure_sites.ROUNDS
    for exact, totals in recorder.rounds:
        assert len(totals.kept) == 3
        assert _within_bound(totals.update, exact["update"], 3, clip)
        assert not torch.equal(totals.update.double(), exact["update"])  # it was quantised
        assert (totals.control is not None) == name.startswith("scaffold")
        if totals.control is not None:
            assert _within_bound(totals.control, exact["control"], 3, clip)
        for tensor, value in exact.items():
            if tensor not in ("update", "control"):  # BatchNorm statistics, averaged
                assert _within_bound(totals.averaged[tensor], value, 3, clip), tensor
    _received_no_update(sites, p)
    assert flower.state.strategy.keys() == plain.state.strategy.keys()
    if name in _LINEAR:
        rounds = secure_sites.ROUNDS
        for tensor, w in plain.weights.items():
            if w.is_floating_point():
                allowed = rounds**2 * quantisation_bound(3, clip) + 2.0**-20 * w.abs()
                diff = (flower.weights[tensor].double() - w.double()).abs()
                assert bool((diff <= allowed).all()), (tensor, float(diff.max()))
            else:
                assert torch.equal(flower.weights[tensor], w), tensor


class _LosesClient(secure_sites.SeededSites):
    """Seeded sites where one client fails in phase 1 of every round: the survivors' plain run."""

    def __init__(self, layout, lost: int):
        super().__init__(layout)
        self.lost = lost

    def receive(self, client_id: int):
        reply = super().receive(client_id)
        if client_id == self.lost:
            reply.error = "lost"
        return reply


@pytest.mark.parametrize(
    "stage, survives",
    [
        ("setup", False),
        ("share_keys", False),
        ("collect_masked_vectors", True),
        ("unmask", True),
    ],
)
@pytest.mark.usefixtures("flower_ids")
def test_a_site_lost_during_secaggplus(tmp_path, stage, survives):
    """Flower 1.42's SecAgg+ with one of three sites lost at each stage. Lost while the masked
    vectors are collected: the round completes with the survivors' sum, and the weights are
    the plain FedAvg round over the survivors within the quantisation bound. Lost during the
    unmask stage: its masked vector is in, SecAgg+ removes its mask from the others' shares,
    and the round is the full one. Lost before its key shares went out (setup, share keys):
    Flower's unmask stage wants shares of every sampled site, SecAgg+ halts, and the run stops
    with one line before anything of the round is written."""
    from fedpose.engine.flower_secagg import FlowerSecureTransport, SecureAggregationError

    overrides = [
        "fed.method=fedavg",
        "fed.num_clients=3",
        "fed.rounds=1",
        "fed.clients_per_round=3",
    ]
    cfg = secure_sites.config(*overrides, "fed.secure=true")
    sites = _Sites(cfg, drop={103: stage})
    flower = secure_sites.server(cfg, FlowerSecureTransport(sites, sites.layout, cfg.fed))
    flower.run_dir = tmp_path / "run"
    flower.run_dir.mkdir()
    if not survives:
        with pytest.raises(SecureAggregationError) as failure:
            flower.run()
        assert "\n" not in str(failure.value) and "SecAgg+ halted" in str(failure.value)
        assert list(flower.run_dir.iterdir()) == []  # no metrics line, no checkpoint
        return
    record = flower.run()
    lost = 2 if stage == "collect_masked_vectors" else None
    plain_cfg = secure_sites.config(*overrides)
    plain = secure_sites.server(plain_cfg, _LosesClient(sites.layout, lost))
    plain.run()
    assert record["secagg_dropped"] == ([2] if lost is not None else [])
    assert record["secagg_clients"] == (2 if lost is not None else 3)
    assert ("survivor_scale" in record) == (lost is not None)
    scale = record.get("survivor_scale", 1.0)
    bound = quantisation_bound(record["secagg_clients"], cfg.fed.secagg_clip) * scale
    for tensor, w in plain.weights.items():
        got = flower.weights[tensor]
        if w.is_floating_point():
            diff = (got.double() - w.double()).abs()
            assert bool((diff <= bound + 2.0**-22 * w.abs()).all()), tensor
        else:
            assert torch.equal(got, w), tensor
    _received_no_update(sites, sites.layout.slices[-1][2])
