"""Robust aggregation: norm-clipped FedAvg, coordinate-wise median and trimmed mean, against hand
computations and against one malicious client."""

from __future__ import annotations

import pytest
import torch
from fedtiny import tiny_config

from fedpose.config import FedConfig
from fedpose.engine.runner import run_federation
from fedpose.fl.strategies import build_strategy
from fedpose.fl.strategies.base import RoundInput
from fedpose.metrics.log import read_jsonl


def _inputs(deltas, counts=None) -> RoundInput:
    deltas = torch.as_tensor(deltas, dtype=torch.float32)
    k, p = deltas.shape
    counts = torch.ones(k) if counts is None else counts
    return RoundInput(
        deltas=deltas,
        counts=torch.as_tensor(counts, dtype=torch.float64),
        client_ids=list(range(k)),
        num_clients=k,
        slices=[("w", 0, p)],
    )


def _honest(k: int = 6, p: int = 200, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.01 * torch.randn(k, p, generator=gen) + 0.02


def _aggregate(method: str, deltas, counts=None, **fed) -> torch.Tensor:
    strategy = build_strategy(FedConfig(method=method, **fed))
    return strategy.aggregate(_inputs(deltas, counts), strategy.initial_state()).update


def test_median_and_trimmed_mean_by_hand():
    d = [[1.0, -4.0], [3.0, 0.0], [2.0, 8.0], [10.0, 1.0]]
    assert _aggregate("median", d).tolist() == [2.5, 0.5]  # even K: mean of the middle two
    assert _aggregate("median", d[:3]).tolist() == [2.0, 0.0]
    # K = 4, beta = 0.25: drop one value at each end of every coordinate
    assert _aggregate("trimmed-mean", d, trim_ratio=0.25).tolist() == [2.5, 0.5]
    # beta = 0 is the plain unweighted mean, whatever the sample counts
    plain = _aggregate("trimmed-mean", d, counts=[1, 100, 1, 1], trim_ratio=0.0)
    assert torch.allclose(plain, torch.tensor([4.0, 1.25]))
    half = _aggregate("median", d, server_lr=0.5)
    assert half.tolist() == [1.25, 0.25]


@pytest.mark.parametrize("method", ["median", "trimmed-mean"])
@pytest.mark.parametrize("attack", [1e30, -1e30, 1e6])
def test_one_huge_update_stays_inside_the_honest_range(method, attack):
    honest = _honest()
    malicious = torch.full((1, honest.shape[1]), attack)
    deltas = torch.cat([honest, malicious])  # 7 clients, one Byzantine
    # the attacker also claims a huge sample count: these estimators ignore counts
    counts = [10.0] * 6 + [1e9]
    update = _aggregate(method, deltas, counts, trim_ratio=0.15)  # b = floor(1.05) = 1
    low, high = honest.min(dim=0).values, honest.max(dim=0).values
    assert torch.isfinite(update).all()
    assert bool(((update >= low) & (update <= high)).all())
    # the mean, by contrast, is dragged outside by the attacker
    mean = _aggregate("trimmed-mean", deltas, trim_ratio=0.0)
    assert not bool(((mean >= low) & (mean <= high)).all())


def test_trimmed_mean_without_anything_to_trim_is_not_robust():
    # K = 3 and beta = 0.1: b = 0, so the attacker is averaged in (and the diagnostics say b)
    deltas = torch.cat([_honest(k=2), torch.full((1, 200), 1e6)])
    strategy = build_strategy(FedConfig(method="trimmed-mean", trim_ratio=0.1))
    result = strategy.aggregate(_inputs(deltas), {})
    assert result.diagnostics["trimmed"] == 0
    assert float(result.update.max()) > 1e5


def test_clipping_bounds_every_update_norm():
    gen = torch.Generator().manual_seed(3)
    deltas = torch.randn(5, 300, generator=gen)
    deltas[2] *= 1e6  # a boosted update (model replacement)
    counts = torch.tensor([30.0, 10.0, 25.0, 5.0, 30.0])
    clip = 2.0
    strategy = build_strategy(FedConfig(method="fedavg-clip", clip_norm=clip))
    result = strategy.aggregate(_inputs(deltas, counts), {})
    p = counts.double() / counts.sum()
    norms = deltas.double().norm(dim=1)
    clipped = deltas.double() * torch.clamp(clip / norms, max=1.0)[:, None]
    assert bool((clipped.norm(dim=1) <= clip * (1 + 1e-9)).all())
    assert torch.allclose(result.update.double(), (p[:, None] * clipped).sum(0), atol=1e-6)
    assert result.diagnostics["clipped"] == int((norms > clip).sum())
    # the boosted client moves the model by at most its weight times the clipping norm
    without = strategy.aggregate(
        _inputs(torch.cat([deltas[:2], deltas[3:]]), torch.cat([counts[:2], counts[3:]])), {}
    ).update
    rescaled = without.double() * float(counts.sum() - counts[2]) / float(counts.sum())
    assert float((result.update.double() - rescaled).norm()) <= float(p[2]) * clip * (1 + 1e-5)


def test_clipping_leaves_small_updates_alone():
    deltas = _honest(k=4, p=50)
    counts = [3.0, 1.0, 2.0, 4.0]
    clipped = _aggregate("fedavg-clip", deltas, counts, clip_norm=1e3)
    assert torch.equal(clipped, _aggregate("fedavg", deltas, counts))


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="clip_norm"):
        build_strategy(FedConfig(method="fedavg-clip", clip_norm=0.0))
    with pytest.raises(ValueError, match="trim_ratio"):
        build_strategy(FedConfig(method="trimmed-mean", trim_ratio=0.5))


def test_shares_show_who_was_cut():
    deltas = torch.cat([_honest(k=4), torch.full((1, 200), 1e6)])
    for method in ("median", "trimmed-mean"):
        strategy = build_strategy(FedConfig(method=method, trim_ratio=0.2))
        shares = strategy.aggregate(_inputs(deltas), {}).diagnostics["weights"]
        assert sum(shares) == pytest.approx(1.0)
        assert shares[4] == 0.0  # the outlier is cut in every coordinate


@pytest.mark.parametrize("method", ["fedavg-clip", "median", "trimmed-mean"])
def test_robust_methods_run_a_federation(tmp_path, synth_dir, method):
    cfg = tiny_config(
        tmp_path,
        synth_dir,
        f"fed.method={method}",
        "fed.rounds=1",
        "fed.clip_norm=0.05",
        "fed.trim_ratio=0.25",
    )
    server = run_federation(cfg)
    assert all(torch.isfinite(t).all() for t in server.weights.values() if t.is_floating_point())
    (row,) = read_jsonl(cfg.run_dir / "metrics.jsonl")
    assert row["aggregated"] == [0, 1, 2, 3]
    assert sum(row["weights"]) == pytest.approx(1.0)
