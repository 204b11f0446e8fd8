"""Client-side differential privacy on the Flower engine: Flower's LocalDpMod applied to fedpose's
train replies, and the privacy report."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedpose.config import Config, ConfigError, FedConfig
from fedpose.engine.flower_client import client_dp_mod
from fedpose.engine.flower_dp import (
    check_dp_config,
    noise_std,
    privacy_report,
    rdp_epsilon,
    releases_per_client,
)
from fedpose.engine.flower_messages import content_to_reply, reply_to_content, request_to_content
from fedpose.engine.runner import run_federation
from fedpose.fl.messages import TrainReply, TrainRequest

P = 40_000


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    # Messages are made inside Flower app processes, where Flower has set the task's identity
    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def _request() -> Message:
    weights = {"w": torch.randn(P), "bn.running_var": torch.rand(4) + 0.5}
    content = request_to_content(
        TrainRequest(client_id=0, version=3, round=3, weights=weights, seed=1)
    )
    return Message(content, dst_node_id=1, message_type="train")


def _app(delta: torch.Tensor, averaged: dict):
    def handler(msg: Message, _context: Context) -> Message:
        reply = TrainReply(
            client_id=0,
            version=3,
            num_samples=12,
            delta=delta.clone(),
            averaged=averaged,
            train_loss=0.5,
            steps=2,
        )
        return Message(reply_to_content(reply), reply_to=msg)

    return handler


def _context(fed: FedConfig) -> Context:
    run_config = {"fedpose-config": json.dumps({"fed": asdict(fed)})}
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config)


def _private(msg: Message, app, fed: FedConfig) -> Message:
    """The ClientApp's DP mod around the handler `app`, as Flower runs it."""
    return client_dp_mod(msg, _context(fed), app)


def _fed(**kw) -> FedConfig:
    return FedConfig(**{"dp_epsilon": 0.5, "dp_delta": 1e-5, "dp_clip": 1.0, **kw})


def test_local_dp_clips_and_adds_noise_of_the_configured_scale():
    gen = torch.Generator().manual_seed(0)
    delta = 3.0 * torch.randn(P, generator=gen) / math.sqrt(P)  # norm about 3
    averaged = {"bn.running_var": torch.rand(4) + 0.5}
    msg = _request()
    fed = _fed(dp_epsilon=50.0)
    out = _private(msg, _app(delta, averaged), fed)
    got = content_to_reply(out.content)
    assert got.problem() is None and got.num_samples == 12
    noise = got.delta.double() - delta.double() / float(delta.norm())  # clipped to norm 1
    sigma = noise_std(fed)
    assert sigma == pytest.approx(2.0 * math.sqrt(2 * math.log(1.25e5)) / 50.0)
    # N(0, sigma^2) per coordinate: the sample std of 40 000 draws is within 2 % of sigma
    assert float(noise.std()) == pytest.approx(sigma, rel=0.02)
    assert abs(float(noise.mean())) < 5 * sigma / math.sqrt(P)
    assert float(out.content["metrics"]["dp-noise-std"]) == pytest.approx(sigma)
    # BatchNorm statistics travel unchanged; the request is left as it came
    assert torch.equal(got.averaged["bn.running_var"], averaged["bn.running_var"])
    assert list(msg.content.array_records) == ["weights"]


def test_noise_is_fresh_and_off_means_untouched():
    delta = torch.full((P,), 1e-4)
    noisy = []
    for _ in range(2):
        np.random.seed(0)  # a seeded global generator must not make the noise predictable
        out = _private(_request(), _app(delta, {}), _fed())
        noisy.append(content_to_reply(out.content).delta)
    assert not torch.equal(noisy[0], noisy[1])
    off = _private(_request(), _app(delta, {}), _fed(dp_epsilon=0.0))
    assert torch.equal(content_to_reply(off.content).delta, delta)


def test_failed_client_releases_nothing():
    def crashed(msg: Message, _context: Context) -> Message:
        return Message(
            reply_to_content(TrainReply(client_id=0, version=3, error="boom")), reply_to=msg
        )

    out = _private(_request(), crashed, _fed())
    assert content_to_reply(out.content).error == "boom"


def test_privacy_report():
    rows = [
        {"selected": [0, 1, 2], "dropped": [2]},
        {"selected": [0, 2], "dropped": []},
        {"selected": [0], "dropped": []},
    ]
    releases = releases_per_client(rows)
    assert releases == {0: 3, 1: 1, 2: 1}
    fed = _fed(dp_epsilon=0.5)
    report = privacy_report(fed, releases)
    assert report["releases_max"] == 3
    assert report["epsilon_composed_simple"] == pytest.approx(1.5)
    assert report["delta_composed_simple"] == pytest.approx(3e-5)
    if report["epsilon_rdp"] is None:
        assert report["accountant"].startswith("unavailable")


def test_rdp_epsilon_grows_with_releases_and_shrinks_with_noise():
    pytest.importorskip("dp_accounting")
    one, ten = rdp_epsilon(2.0, 1, 1e-5), rdp_epsilon(2.0, 10, 1e-5)
    assert 0 < one < ten < 10 * one  # RDP composes better than the simple k * epsilon
    assert rdp_epsilon(4.0, 10, 1e-5) < ten


def test_dp_settings_are_checked():
    check_dp_config(_fed())
    check_dp_config(FedConfig())  # off
    for bad in ({"dp_epsilon": -1.0}, {"dp_clip": 0.0}, {"dp_delta": 1.0}):
        with pytest.raises(ConfigError):
            check_dp_config(_fed(**bad))


def test_in_process_engine_refuses_dp(tmp_path):
    cfg = Config(out_dir=str(tmp_path))
    cfg.fed.dp_epsilon = 1.0
    with pytest.raises(ConfigError, match="Flower engine only"):
        run_federation(cfg)
    assert not (tmp_path / cfg.name).exists()  # refused before the run directory is made
