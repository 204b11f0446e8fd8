"""The simulated federation and the client selectors."""

from __future__ import annotations

import math

import pytest

from fedpose.config import SystemConfig
from fedpose.fl.selection import Selector
from fedpose.fl.system import SystemModel


def test_speed_spread_is_exact_and_seeded():
    a = SystemModel(SystemConfig(speed=100, speed_spread=10), 8, seed=0)
    assert a.speed.max() / a.speed.min() == pytest.approx(10)
    assert math.sqrt(a.speed.max() * a.speed.min()) == pytest.approx(100)
    b = SystemModel(SystemConfig(speed=100, speed_spread=10), 8, seed=0)
    assert (a.speed == b.speed).all()
    c = SystemModel(SystemConfig(speed=100, speed_spread=10), 8, seed=1)
    assert not (a.speed == c.speed).all()


def test_round_time_formula():
    m = SystemModel(SystemConfig(speeds=[10.0, 20.0], bandwidth=1000, latency=0.5), 2, seed=0)
    assert m.round_time(0, samples=100, model_bytes=500) == pytest.approx(10 + 1 + 0.5)
    assert m.round_time(1, samples=100, model_bytes=500) == pytest.approx(5 + 1 + 0.5)
    with pytest.raises(ValueError, match="3 clients"):
        SystemModel(SystemConfig(speeds=[1.0, 2.0]), 3, seed=0)


def test_dropout_rate_and_determinism():
    m = SystemModel(SystemConfig(dropout=0.2), 10, seed=3)
    draws = [m.drops(r, k) for r in range(200) for k in range(10)]
    assert 0.15 < sum(draws) / len(draws) < 0.25
    assert draws == [m.drops(r, k) for r in range(200) for k in range(10)]
    assert not any(SystemModel(SystemConfig(dropout=0.0), 10, 3).drops(r, 0) for r in range(50))


def test_random_selection_is_seeded_and_sized():
    s = Selector("random", per_round=3, seed=0)
    picks = [s.select(list(range(10)), r, [1] * 10, lambda k: 1.0) for r in range(20)]
    assert all(len(p) == 3 and p == sorted(p) for p in picks)
    assert len({tuple(p) for p in picks}) > 5
    again = Selector("random", per_round=3, seed=0)
    assert picks == [again.select(list(range(10)), r, [1] * 10, lambda k: 1.0) for r in range(20)]
    assert s.select([4, 7], 0, [1] * 10, lambda k: 1.0) == [4, 7]


def test_deadline_skips_slow_clients_but_never_stalls():
    times = {0: 1.0, 1: 5.0, 2: 2.0, 3: 9.0}
    s = Selector("deadline", per_round=0, seed=0, deadline=3.0)
    assert s.select([0, 1, 2, 3], 0, [1] * 4, times.__getitem__) == [0, 2]
    assert s.select([1, 3], 0, [1] * 4, times.__getitem__) == [1]  # the fastest of the slow


def test_utility_explores_unseen_then_prefers_high_loss_times_samples():
    s = Selector("utility", per_round=2, seed=0, explore=0.0)
    sizes = [100, 100, 400, 100]
    first = s.select([0, 1, 2, 3], 0, sizes, lambda k: 1.0)
    assert len(first) == 2  # all unseen: infinite utility, ties broken by id
    for k, loss in {0: 0.5, 1: 2.0, 2: 0.6, 3: 0.1}.items():
        s.observe(k, loss)
    # Oort's |B_k| · sqrt(mean loss²), the squared mean standing in: 50, 200, 240, 10
    assert s.select([0, 1, 2, 3], 1, sizes, lambda k: 1.0) == [1, 2]
    s.observe(3, float("nan"))  # a NaN loss is ignored, not stored
    assert s.last_loss[3] == 0.1


def test_utility_exploration_share():
    s = Selector("utility", per_round=4, seed=0, explore=0.5)
    sizes = [1] * 10
    for k in range(10):
        s.observe(k, float(k))
    for r in range(20):
        picks = s.select(list(range(10)), r, sizes, lambda k: 1.0)
        assert 9 in picks  # at least one pick is exploited, and the top utility wins it
        assert len(picks) == 4


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="use one of random, deadline, utility"):
        Selector("fastest", 1, 0)
