"""Server optimisers: the same arithmetic as Flower 1.42's FedAvgM, FedAdam, FedYogi and
FedAdagrad on the same arrays, composable with any strategy, and the default step unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi
from flwr.supercore.task_identity import TaskIdentity

from fedpose.config import ConfigError, FedConfig, load_config
from fedpose.fl.strategies import FedAvg, FedGH, build_strategy
from fedpose.fl.strategies.base import RoundInput
from fedpose.fl.strategies.server_opt import ServerOptimizer, WithServerOptimizer

SHAPES = {"a": (5, 4), "b": (7,)}
COUNTS = [30, 10, 20]


def _flat(arrays: dict[str, np.ndarray]) -> torch.Tensor:
    return torch.cat([torch.from_numpy(arrays[k]).reshape(-1) for k in SHAPES])


def _slices() -> list[tuple[str, int, int]]:
    out, start = [], 0
    for name, shape in SHAPES.items():
        end = start + int(np.prod(shape))
        out.append((name, start, end))
        start = end
    return out


def _flower(method: str, lr: float, momentum: float, beta1: float, beta2: float, tau: float):
    if method == "fedavgm":
        return FedAvgM(server_learning_rate=lr, server_momentum=momentum)
    cls = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}[method]
    kwargs = {"eta": lr, "tau": tau}
    if method != "fedadagrad":
        kwargs.update(beta_1=beta1, beta_2=beta2)
    return cls(**kwargs)


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _messages(clients: list[dict[str, np.ndarray]]) -> list[Message]:
    return [
        Message(
            RecordDict({"arrays": _record(w), "metrics": MetricRecord({"num-examples": n})}),
            dst_node_id=k + 1,
            message_type="train",
        )
        for k, (w, n) in enumerate(zip(clients, COUNTS, strict=True))
    ]


@pytest.mark.parametrize(
    ("method", "lr"),
    [("fedavgm", 0.7), ("fedadam", 0.05), ("fedyogi", 0.05), ("fedadagrad", 0.05)],
)
def test_matches_flowers_strategy_over_several_rounds(method, lr, monkeypatch):
    # a Message outside a running app needs the identity of a task
    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    momentum, beta1, beta2, tau = 0.8, 0.85, 0.95, 1e-3
    if method == "fedadagrad":
        beta1 = 0.0  # Flower's FedAdagrad takes no beta_1: FedOpt's default 0 (m = Δ)
    cfg = FedConfig(
        method=method,
        server_lr=lr,
        server_momentum=momentum,
        server_beta1=beta1,
        server_beta2=beta2,
        server_tau=tau,
        num_clients=len(COUNTS),
    )
    ours = build_strategy(cfg)
    assert isinstance(ours, WithServerOptimizer)
    flower = _flower(method, lr, momentum, beta1, beta2, tau)
    rng = np.random.default_rng(3)
    weights = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    state = ours.initial_state()
    for server_round in (1, 2, 3, 4):
        # clients pull in different directions, with a shared drift that momentum accumulates
        drift = {k: rng.normal(scale=0.05, size=s) for k, s in SHAPES.items()}
        clients = [
            {
                k: (w + drift[k] + rng.normal(scale=0.02, size=w.shape)).astype(np.float32)
                for k, w in weights.items()
            }
            for _ in COUNTS
        ]
        deltas = torch.stack([_flat(c) - _flat(weights) for c in clients])
        inputs = RoundInput(
            deltas=deltas,
            counts=torch.tensor(COUNTS, dtype=torch.float64),
            client_ids=list(range(len(COUNTS))),
            num_clients=len(COUNTS),
            slices=_slices(),
        )
        result = ours.aggregate(inputs, state)
        state = result.state
        expected_w = _flat(weights) + result.update

        # Flower's strategies keep the arrays they sent as `current_arrays` (set by
        # configure_train, which needs a Grid): set them as it would
        if method == "fedavgm":
            if server_round == 1:
                flower.current_arrays = _record(weights)
        else:
            flower.current_arrays = {k: v.copy() for k, v in weights.items()}
        arrays, _ = flower.aggregate_train(server_round, _messages(clients))
        # (Flower's FedAdam returns float64: its bias-corrected rate is a NumPy float64; the
        # model stays float32 as it would between rounds)
        theirs = {k: np.asarray(a.numpy()).astype(np.float32) for k, a in arrays.items()}
        # Flower averages the client models, fedpose the updates: float32 rounding apart
        torch.testing.assert_close(expected_w, _flat(theirs), rtol=1e-5, atol=2e-6)
        weights = theirs
    assert state["server_opt"]["t"] == 4


def test_default_is_the_bare_strategy_and_any_strategy_composes():
    plain = build_strategy(FedConfig(method="fedgh", server_lr=1.3))
    assert isinstance(plain, FedGH) and plain.server_lr == 1.3
    cfg = FedConfig(method="fedgh", server_opt="adam", server_lr=0.01, gh_order="index")
    composed = build_strategy(cfg)
    assert isinstance(composed, WithServerOptimizer) and composed.inner.server_lr == 1.0
    rng = torch.Generator().manual_seed(0)
    deltas = torch.randn(3, 27, generator=rng)
    inputs = RoundInput(
        deltas, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), [0, 1, 2], 3, _slices()
    )
    bare = FedGH(order="index").aggregate(inputs, {})
    result = composed.aggregate(inputs, {})
    step, _ = ServerOptimizer("adam", lr=0.01).step(bare.update, {})
    assert torch.equal(result.update, step)
    assert not torch.equal(result.update, bare.update)
    # FedAW's running angles and the optimiser's moments live side by side
    assert set(result.state) == set(bare.state) | {"server_opt"}


def test_sgd_with_momentum_accumulates_like_fedavgm():
    opt = ServerOptimizer("sgd", lr=0.5, momentum=0.9)
    d1, d2 = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5])
    u1, s = opt.step(d1, {})
    u2, s = opt.step(d2, s)
    assert torch.equal(u1, d1 * 0.5)
    assert torch.equal(u2, (d1 * 0.9 + d2) * 0.5)
    assert torch.equal(FedAvg().aggregate(_one(d1), {}).update, d1)


def _one(delta: torch.Tensor) -> RoundInput:
    return RoundInput(delta[None], torch.ones(1, dtype=torch.float64), [0], 1, [("x", 0, 2)])


@pytest.mark.parametrize(
    ("sets", "key"),
    [
        (["fed.server_opt=rmsprop"], "fed.server_opt"),
        (["fed.method=fedadam", "fed.server_opt=yogi"], "fed.server_opt"),
        (["fed.method=fedavgm"], "fed.server_momentum"),
        (["fed.server_tau=0"], "fed.server_tau"),
        (["fed.server_beta2=1"], "fed.server_beta2"),
    ],
)
def test_bad_server_optimiser_settings_name_the_key(sets, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, sets)
