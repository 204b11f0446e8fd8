"""The Flower engine: message conversions, FedAvg against Flower's own FedAvg, and one slow
end-to-end run on real Flower processes (SuperLink + 2 SuperNodes) against the in-process engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity
from rich.console import Console
from torch import nn

from fedpose.config import Config
from fedpose.engine.flower_messages import (
    client_state_to_records,
    content_to_reply,
    content_to_request,
    record_to_state,
    records_to_client_state,
    reply_to_content,
    request_to_content,
    settings_from_run_config,
    state_to_record,
)
from fedpose.fl.messages import TrainReply, TrainRequest
from fedpose.fl.params import flatten, model_layout
from fedpose.fl.server import FederatedServer
from fedpose.fl.strategies import build_strategy
from fedpose.tools.flower_demo import compare_engines, demo_config, write_app_dir


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    )


def _over_the_wire(content: RecordDict) -> RecordDict:
    """Deflate into the byte objects Flower sends, and inflate them again."""
    objects = get_all_nested_objects(content)
    contents = {oid: obj.deflate() for oid, obj in objects.items()}
    return inflate_object_from_contents(content.object_id, contents)


# ----------------------------------------------------------------------------- (c) conversions
def test_state_dict_round_trips_exactly():
    state = dict(_net().state_dict())
    state["1.num_batches_tracked"] = torch.tensor(123456789012, dtype=torch.int64)
    state["extra.f64"] = torch.randn(3, 2, dtype=torch.float64)
    state["extra.f16"] = torch.randn(5).half()
    state["extra.i32"] = torch.arange(-3, 3, dtype=torch.int32)
    state["extra.u8"] = torch.arange(7, dtype=torch.uint8)
    state["extra.bool"] = torch.tensor([True, False])
    state["extra.empty"] = torch.zeros(0, 4)
    state["extra.nan"] = torch.tensor([float("nan"), float("inf"), -0.0])
    state["extra.strided"] = torch.randn(4, 6).t()  # not contiguous

    for back in (
        record_to_state(state_to_record(state)),
        record_to_state(_over_the_wire(RecordDict({"w": state_to_record(state)}))["w"]),
    ):
        assert list(back) == list(state)
        for name, t in state.items():
            assert back[name].dtype == t.dtype, name
            assert back[name].shape == t.shape, name
            assert torch.equal(back[name].nan_to_num(), t.nan_to_num()), name
            assert torch.equal(back[name].isnan(), t.isnan()), name
        back["0.weight"].add_(1)  # writable, and not aliasing the record


def test_request_and_reply_survive_the_wire():
    state = dict(_net().state_dict())
    request = TrainRequest(client_id=3, version=7, round=9, weights=state, seed=2**32 - 1)
    got = content_to_request(_over_the_wire(request_to_content(request)))
    assert (got.client_id, got.version, got.round, got.seed) == (3, 7, 9, 2**32 - 1)
    assert all(torch.equal(got.weights[k], state[k]) for k in state)

    reply = TrainReply(
        client_id=3,
        version=7,
        num_samples=40,
        delta=torch.randn(11),
        averaged={"bn.num_batches_tracked": torch.tensor(5), "bn.running_mean": torch.randn(4)},
        train_loss=0.125,
        steps=2,
        seconds=1.5,
    )
    got = content_to_reply(_over_the_wire(reply_to_content(reply, {"handler-seconds": 2.0})))
    assert got.problem() is None
    assert torch.equal(got.delta, reply.delta)
    assert all(torch.equal(got.averaged[k], reply.averaged[k]) for k in reply.averaged)
    assert (got.num_samples, got.train_loss, got.steps, got.seconds) == (40, 0.125, 2, 1.5)

    failed = content_to_reply(
        _over_the_wire(
            reply_to_content(TrainReply(client_id=1, version=0, error="client crashed: boom"))
        )
    )
    assert failed.problem() == "client crashed: boom"
    assert failed.delta is None


def test_client_state_lives_in_context_state():
    store = RecordDict()
    store["some-mod"] = MetricRecord({"x": 1.0})  # other users of context.state are left alone
    state = {
        "local": {"bn.running_var": torch.rand(4), "bn.num_batches_tracked": torch.tensor(3)},
        "dyn_grad": {"w": torch.randn(2, 3)},
    }
    client_state_to_records(state, store)
    back = records_to_client_state(_over_the_wire(store))
    assert back.keys() == state.keys()
    for key in state:
        assert all(torch.equal(back[key][n], state[key][n]) for n in state[key])


def test_run_config_carries_the_whole_config(tmp_path):
    cfg = Config()
    cfg.fed.method, cfg.fed.rounds, cfg.system.speeds = "fedbn", 7, [1.0, 2.5]
    settings = settings_from_run_config(
        {
            "fedpose-config": json.dumps(cfg.to_dict()),
            "fedpose-overrides": "fed.rounds=3 name='a b'",
            "reply-timeout": 5.0,
        }
    )
    assert settings.config.fed.method == "fedbn"
    assert settings.config.system.speeds == [1.0, 2.5]
    assert (settings.config.fed.rounds, settings.config.name) == (3, "a b")
    assert settings.reply_timeout == 5.0 and not settings.resume

    toml = tmp_path / "exp.toml"
    toml.write_text('[fed]\nmethod = "fedprox"\n')
    assert settings_from_run_config({"fedpose-config": str(toml)}).config.fed.method == "fedprox"

    # the app directory `flwr run` uploads: the JSON config must come back unchanged
    import tomllib

    app = write_app_dir(tmp_path / "app", cfg)
    run_config = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert run_config["components"]["serverapp"] == "fedpose.engine.flower_server:server_app"
    assert settings_from_run_config(run_config["config"]).config == cfg


# ----------------------------------------------------------------------------- (b) FedAvg
def test_fedavg_equals_flower_fedavg(monkeypatch):
    """fedpose: w + Σ (n_k/n) Δ_k (+ n-weighted BN statistics); Flower: Σ (n_k/n) w_k."""
    # Messages are made inside a ServerApp, where Flower has set the task's identity
    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    model = _net()
    layout = model_layout(model)
    base = {n: t.clone() for n, t in model.state_dict().items()}
    counts = [5, 17, 40]
    gen = torch.Generator().manual_seed(1)
    clients = []
    for k in range(len(counts)):
        w = {}
        for name, t in base.items():
            if t.is_floating_point():
                w[name] = t + 0.1 * torch.randn(t.shape, generator=gen)
            else:
                w[name] = t + 10 * (k + 1)  # BatchNorm's num_batches_tracked
        clients.append(w)

    cfg = Config()
    cfg.fed.method, cfg.fed.num_clients = "fedavg", len(counts)
    server = FederatedServer(
        cfg.fed, cfg.system, base, layout, build_strategy(cfg.fed), None, client_sizes=counts
    )
    replies = [
        TrainReply(
            client_id=k,
            version=0,
            num_samples=n,
            delta=flatten(w, layout.agg_names) - flatten(base, layout.agg_names),
            averaged={name: w[name] for name in layout.avg_names},
        )
        for k, (w, n) in enumerate(zip(clients, counts, strict=True))
    ]
    server.aggregate(replies, [0] * len(replies))

    messages = [
        Message(
            RecordDict(
                {"arrays": state_to_record(w), "metrics": MetricRecord({"num-examples": n})}
            ),
            dst_node_id=k + 1,
            message_type="train",
        )
        for k, (w, n) in enumerate(zip(clients, counts, strict=True))
    ]
    arrays, _ = FedAvg().aggregate_train(1, messages)
    flower = {name: torch.from_numpy(np.asarray(a.numpy())) for name, a in arrays.items()}

    assert flower.keys() == server.weights.keys()
    for name, ours in server.weights.items():
        theirs = flower[name]
        if ours.is_floating_point():
            # float32 sums in a different order: equal to float32 rounding
            torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=0, atol=2e-7)
        else:
            # Flower averages the counter in float64; fedpose rounds it back to int64
            assert ours.item() == round(theirs.item()), name


# ----------------------------------------------------------------------------- (a) end to end
def _running_with_home(flwr_home: Path) -> list[int]:
    """PIDs of live processes started with FLWR_HOME=flwr_home."""
    needle = f"FLWR_HOME={flwr_home}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if needle in env and state not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


# what differs between a Flower run and the in-process one by design: wall-clock times, and the
# per-site figures only Flower's federated evaluation reports (its sites send PCK counts only:
# no heatmap accuracy yet)
ENGINE_SPECIFIC = ("wall_seconds", "agg_seconds", "site_pck", "site_test_samples", "heatmap_acc")


def comparable_rows(run_dir) -> list[dict]:
    """A run's metrics.jsonl rows without the fields that differ between engines by design."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in ENGINE_SPECIFIC} for x in lines]


@pytest.mark.slow
def test_flower_processes_match_the_in_process_engine(tmp_path):
    """SLOW (about 30-60 s): a real flower-superlink and 2 flower-supernode processes on
    loopback run 2 rounds of FedGH; the final model equals the in-process engine's."""
    cfg = demo_config(
        None,
        supernodes=2,
        rounds=2,
        overrides=[f"out_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'synth-arm'}"],
    )
    work = tmp_path / "flower"
    try:
        result = compare_engines(cfg, 2, Console(width=100), timeout=240, work_dir=work)
    finally:
        assert _running_with_home(work / "flwr-home") == [], "Flower processes left running"

    assert result.flower.status["status"] == "finished:completed"
    rows = {
        engine: comparable_rows(run_dir)
        for engine, run_dir in (("flower", result.flower.run_dir), ("local", result.local_run_dir))
    }
    assert [r["round"] for r in rows["flower"]] == [1, 2]
    assert [r["aggregated"] for r in rows["flower"]] == [[0, 1], [0, 1]]
    # Same initial model, same seeded batches, the same CPU kernels with the same thread count,
    # replies aggregated in partition order on both engines, tensors carried bit for bit: the
    # engines compute identical numbers, metrics included, so no tolerance is needed.
    assert rows["flower"] == rows["local"]
    assert result.max_diff == 0.0
    timing = (result.flower.run_dir / "flower_timing.jsonl").read_text().splitlines()
    assert len(timing) == 4
