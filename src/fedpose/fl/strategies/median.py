"""Coordinate-wise median (Yin, Chen, Ramchandran & Bartlett 2018, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates", Option I).

    w_{t+1}[j] = w_t[j] + η · med{Δ_1[j], …, Δ_K[j]}     for every coordinate j

The median of an even number of values is the mean of the two middle ones. Sample counts play no
part (the estimator is unweighted, as in the paper): each coordinate of the result lies between
the smallest and the largest honest value as long as fewer than half of the K updates are
Byzantine, whatever those send. The price is statistical efficiency: with honest but
heterogeneous (non-IID) clients the median is a noisier and biased estimate of the mean.
"""

from __future__ import annotations

import torch

from fedpose.fl.strategies.base import Aggregation, RoundInput, Strategy


def coordinate_median(deltas: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """The median of every column, and each row's share of the result (see `rank_shares`)."""
    k = deltas.shape[0]
    ordered, rows = deltas.sort(dim=0)
    if k % 2:
        return ordered[k // 2].clone(), rank_shares(rows, k // 2, k // 2 + 1)
    median = (ordered[k // 2 - 1] + ordered[k // 2]) * 0.5
    return median, rank_shares(rows, k // 2 - 1, k // 2 + 1)


def rank_shares(rows: torch.Tensor, first: int, stop: int) -> list[float]:
    """How much each client contributes when, in every column, the values ranked first..stop-1
    are averaged: its weight in that mean, averaged over the columns (the shares sum to 1). An
    outlier that is always cut gets 0; the diagnostic stands in for FedAvg's n_k / n."""
    k, p = rows.shape
    kept = rows[first:stop].reshape(-1)
    counts = torch.bincount(kept, minlength=k).double()
    return (counts / max(kept.numel(), 1)).tolist() if p else [1.0 / k] * k


class CoordinateMedian(Strategy):
    name = "median"

    def __init__(self, server_lr: float = 1.0):
        self.server_lr = server_lr

    def aggregate(self, inputs: RoundInput, state: dict) -> Aggregation:
        median, shares = coordinate_median(inputs.deltas)
        return Aggregation(
            median * self.server_lr,
            dict(state),
            {"weights": shares, "conflict_share": None},
        )
