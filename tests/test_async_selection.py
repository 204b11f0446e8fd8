"""Asynchronous dispatch, buffered replies, FedBuff staleness and Oort's utility selection.

These tests drive the server loop with a stand-in transport that returns fixed updates, so they
check the scheduling and weighting rules without training a model.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from fedpose.config import load_config
from fedpose.fl.messages import TrainReply, TrainRequest
from fedpose.fl.params import ModelLayout
from fedpose.fl.selection import Selector
from fedpose.fl.server import FederatedServer
from fedpose.fl.strategies import FedAvg, FedAW, FedGH
from fedpose.fl.strategies.base import RoundInput
from fedpose.fl.strategies.fedaw import fedadp_weights

P = 6
LAYOUT = ModelLayout(("w",), (), (), {"w": (P,)})


class FixedTransport:
    """Every client returns its own fixed update; records who was sent work, in order."""

    def __init__(self, deltas: dict[int, torch.Tensor], samples: int = 10):
        self.deltas = deltas
        self.samples = samples
        self.sent: list[int] = []
        self.requests: dict[int, TrainRequest] = {}

    def send(self, request: TrainRequest) -> None:
        self.sent.append(request.client_id)
        self.requests[request.client_id] = request

    def receive(self, client_id: int) -> TrainReply:
        request = self.requests.pop(client_id)
        return TrainReply(
            client_id=client_id,
            version=request.version,
            num_samples=self.samples,
            delta=self.deltas[client_id].clone(),
            train_loss=1.0 + client_id,
            train_loss_sq=(1.0 + client_id) ** 2,
        )

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _server(*overrides: str, strategy=None, num_clients: int = 4) -> FederatedServer:
    cfg = load_config(
        None,
        [f"fed.num_clients={num_clients}", "fed.local_steps=1", "train.batch_size=10", *overrides],
    )
    deltas = {k: torch.full((P,), 0.01 * (k + 1)) for k in range(num_clients)}
    return FederatedServer(
        cfg.fed,
        cfg.system,
        {"w": torch.zeros(P)},
        LAYOUT,
        strategy or FedAvg(),
        FixedTransport(deltas),
        [10] * num_clients,
        seed=cfg.seed,
        batch_size=cfg.train.batch_size,
    )


# ------------------------------------------------------------------------------- async dispatch
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_async_dispatch_gives_every_idle_client_its_turn(dropout):
    # 3 of 4 clients at work, speeds over 10x: lowest-ids-first dispatch never reaches client 3
    server = _server(
        "fed.mode=async",
        "fed.concurrency=3",
        "fed.buffer_size=2",
        "fed.rounds=30",
        "system.speed_spread=10",
        f"system.dropout={dropout}",
        "system.speed=1",
    )
    server.run()
    dispatched = Counter(job for job in server.transport.sent)
    assert set(dispatched) == {0, 1, 2, 3}, dispatched
    # every client waits at most for the others' turns: no client is dispatched less than a
    # third as often as the most served one, although the fastest would be re-dispatched at once
    assert min(dispatched.values()) * 3 >= max(dispatched.values()), dispatched


def test_async_dispatch_order_is_seeded_not_by_id():
    firsts = set()
    for seed in range(8):
        server = _server(
            "fed.mode=async",
            "fed.concurrency=1",
            "fed.buffer_size=1",
            "fed.rounds=1",
            f"seed={seed}",
        )
        server.run()
        firsts.add(server.transport.sent[0])
    assert len(firsts) > 1  # the first turn is not always client 0


def test_selector_truncates_by_ranking_not_by_id():
    s = Selector("utility", per_round=0, seed=0, explore=0.0)
    for k, loss in {0: 0.1, 1: 0.2, 2: 3.0, 3: 0.3}.items():
        s.observe(k, loss, loss * loss)
    # one free slot: it goes to the client of highest utility (2), not to the lowest id
    assert s.select([0, 1, 2, 3], 0, [100] * 4, lambda k: 1.0, m=1) == [2]
    assert s.select([0, 1, 2, 3], 0, [100] * 4, lambda k: 1.0, m=2)[0] == 2


# ------------------------------------------------------------------------------- buffered replies
def test_same_client_twice_in_a_buffer_gets_one_weight_per_reply():
    gram = torch.tensor([[1.0, 1.0, 0.2], [1.0, 1.0, 0.2], [0.2, 0.2, 1.0]], dtype=torch.float64)
    counts = torch.tensor([10.0, 10.0, 10.0], dtype=torch.float64)
    state = {"0": [0.3, 1], "1": [1.2, 3]}
    psi, new_state, _ = fedadp_weights(gram, counts, [0, 0, 1], state)
    # the two replies of client 0 are the same update: the same weight each
    assert psi[0].item() == psi[1].item()
    # one aggregation advances client 0's running mean once, by the mean of its two angles
    assert new_state["0"][1] == 2
    assert new_state["1"][1] == 4
    assert state == {"0": [0.3, 1], "1": [1.2, 3]}  # the caller's state is not mutated


@pytest.mark.parametrize("strategy", [FedAW(), FedGH(order="index")])
def test_duplicate_replies_weigh_alike_in_fedaw_and_fedgh(strategy):
    d = torch.tensor([[1.0, 0.0, 0.5], [1.0, 0.0, 0.5], [0.0, 1.0, -0.2]])
    inputs = RoundInput(
        deltas=d,
        counts=torch.tensor([5.0, 5.0, 5.0], dtype=torch.float64),
        client_ids=[0, 0, 1],
        num_clients=2,
        slices=[("w", 0, 3)],
    )
    state = {**strategy.initial_state(), "theta": {"0": [0.1, 2], "1": [0.9, 2]}}
    result = strategy.aggregate(inputs, state)
    w = result.diagnostics["weights"]
    assert w[0] == w[1]
    assert result.state["theta"]["0"][1] == 3


# ------------------------------------------------------------------------------- staleness
def _replies(staleness_versions: list[tuple[int, int]]) -> list[TrainReply]:
    return [
        TrainReply(
            client_id=k,
            version=v,
            num_samples=10 * (k + 1),
            delta=torch.full((P,), float(k + 1)),
            train_loss=1.0,
        )
        for k, v in staleness_versions
    ]


def test_staleness_weights_follow_fedbuff_without_renormalising():
    server = _server("fed.staleness_exponent=0.5")
    replies = _replies([(0, 0), (1, 0)])
    server.aggregate(replies, [3, 0])
    n = torch.tensor([10.0, 20.0], dtype=torch.float64)
    s = torch.tensor([(1 + 3) ** -0.5, 1.0], dtype=torch.float64)
    expected = float((n / n.sum() * s * torch.tensor([1.0, 2.0], dtype=torch.float64)).sum())
    assert server.weights["w"][0].item() == pytest.approx(expected, rel=1e-6)


def test_all_stale_buffer_moves_the_model_less():
    fresh, stale = _server(), _server()
    fresh.aggregate(_replies([(0, 0), (1, 0)]), [0, 0])
    stale.aggregate(_replies([(0, 0), (1, 0)]), [8, 8])
    ratio = stale.weights["w"][0].item() / fresh.weights["w"][0].item()
    assert ratio == pytest.approx(1 / 3, rel=1e-6)  # (1 + 8)^-0.5


def test_renormalised_staleness_is_an_option():
    server = _server("fed.staleness_renormalise=true")
    server.aggregate(_replies([(0, 0), (1, 0)]), [8, 8])
    # renormalised, equal staleness cancels: the FedAvg step of the two updates
    assert server.weights["w"][0].item() == pytest.approx((10 * 1 + 20 * 2) / 30, rel=1e-6)


def test_sync_rounds_are_unchanged_by_the_staleness_rule():
    server = _server()
    server.aggregate(_replies([(0, 0), (1, 0)]), [0, 0])
    assert server.weights["w"][0].item() == pytest.approx((10 * 1 + 20 * 2) / 30, rel=1e-6)


# ------------------------------------------------------------------------------- Oort utility
def test_oort_statistical_utility_and_speed_penalty():
    s = Selector("utility", per_round=2, seed=0, explore=0.0, round_time=10.0, penalty=2.0)
    s.observe(0, 1.0, 4.0)  # mean squared loss 4: utility |B| * 2
    s.observe(1, 1.0, 4.0)
    times = {0: 5.0, 1: 40.0}.__getitem__
    assert s.utility(0, [100, 100], times) == pytest.approx(200.0)
    # four times slower than the preferred round: (10 / 40)^2
    assert s.utility(1, [100, 100], times) == pytest.approx(200.0 / 16)


def test_oort_round_time_defaults_to_the_median_of_the_candidates():
    s = Selector("utility", per_round=1, seed=0, explore=0.0)
    for k in range(3):
        s.observe(k, 1.0, 1.0)
    times = {0: 1.0, 1: 2.0, 2: 8.0}.__getitem__
    assert s.preferred_time([0, 1, 2], times) == 2.0
    assert s.utility(2, [1, 1, 1], times, round_time=2.0) == pytest.approx((2.0 / 8.0) ** 2)


def test_oort_explores_an_epsilon_share_of_picks_not_a_fixed_slot():
    # two picks among ten clients, ε = 0.1: the exploited candidates are the top two (8, 9);
    # a fixed exploring slot put a client outside them into almost every round
    s = Selector("utility", per_round=2, seed=0, explore=0.1)
    for k in range(10):
        s.observe(k, float(k), float(k) ** 2)
    rounds = 2000
    outside = 0
    for r in range(rounds):
        picks = s.select(list(range(10)), r, [1] * 10, lambda k: 1.0)
        assert len(picks) == 2 and 9 in picks  # one pick is always exploited
        outside += bool(set(picks) - {8, 9})
    # P(at least one explorer) = 1 − 0.9² = 0.19, and an explorer misses {8, 9} 8 times in 9
    assert 0.10 < outside / rounds < 0.25
    # with many picks some rounds explore several clients, some none
    s4 = Selector("utility", per_round=4, seed=0, explore=0.3)
    for k in range(10):
        s4.observe(k, float(k), float(k) ** 2)
    beyond = {
        len(set(s4.select(list(range(10)), r, [1] * 10, lambda k: 1.0)) - {6, 7, 8, 9})
        for r in range(200)
    }
    assert {0, 1, 2} <= beyond


def test_oort_picks_probabilistically_among_near_top_candidates():
    s = Selector("utility", per_round=2, seed=0, explore=0.0)
    for k in range(6):
        s.observe(k, 1.0 + 0.01 * k, (1.0 + 0.01 * k) ** 2)  # utilities within 5 %
    picks = {tuple(sorted(s.select(list(range(6)), r, [1] * 6, lambda k: 1.0))) for r in range(30)}
    assert len(picks) > 1  # not always the two largest
    far = Selector("utility", per_round=2, seed=0, explore=0.0)
    for k in range(6):
        far.observe(k, 10.0**k, 100.0**k)  # far apart: the top two only
    assert {
        tuple(sorted(far.select(list(range(6)), r, [1] * 6, lambda k: 1.0))) for r in range(30)
    } == {(4, 5)}


def test_unseen_clients_come_first_under_utility():
    s = Selector("utility", per_round=2, seed=0, explore=0.0)
    s.observe(0, 5.0, 25.0)
    s.observe(1, 5.0, 25.0)
    assert set(s.select([0, 1, 2, 3], 0, [1] * 4, lambda k: 1.0)) == {2, 3}


def test_utility_falls_back_to_squared_mean_loss():
    s = Selector("utility", per_round=1, seed=0, explore=0.0)
    s.observe(0, 3.0)  # a transport that reports no mean squared loss
    assert s.utility(0, [4], lambda k: 1.0) == pytest.approx(4 * math.sqrt(9.0))


# ------------------------------------------------------------------------------- memory
def test_aggregation_takes_each_update_out_of_its_reply():
    # the updates move into the K x P matrix: the server never holds them twice
    server = _server()
    replies = _replies([(0, 0), (1, 0), (2, 0)])
    expected = sum(10 * (k + 1) * float(k + 1) for k in range(3)) / 60
    server.aggregate(replies, [0, 0, 0])
    assert all(r.delta is None for r in replies)
    assert torch.allclose(server.weights["w"], torch.full((P,), expected))
