"""Coordinate-wise trimmed mean (Yin, Chen, Ramchandran & Bartlett 2018, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates", Option II).

For every coordinate j, sort Δ_1[j], …, Δ_K[j], drop the b = ⌊β K⌋ largest and the b smallest,
and average the K − 2b left:

    w_{t+1}[j] = w_t[j] + η · 1/(K − 2b) Σ_{k ∈ U_j} Δ_k[j]

β = `fed.trim_ratio` in [0, 0.5). Unweighted, as in the paper. With at most b Byzantine updates
every coordinate of the result lies within the honest range; β = 0 is the plain unweighted mean.
When K is too small to drop anything (b = 0) the result is not robust: the diagnostics report b.
"""

from __future__ import annotations

import math

import torch

from fedpose.config import FedConfig
from fedpose.fl.strategies.base import Aggregation, RoundInput, Strategy
from fedpose.fl.strategies.median import rank_shares


def trimmed_count(num_updates: int, ratio: float) -> int:
    """b = ⌊β K⌋, capped so that at least one value per coordinate is left."""
    return min(math.floor(ratio * num_updates), (num_updates - 1) // 2)


def coordinate_trimmed_mean(deltas: torch.Tensor, ratio: float) -> tuple[torch.Tensor, list[float]]:
    """The trimmed mean of every column, and each row's share of the result (`rank_shares`)."""
    k = deltas.shape[0]
    b = trimmed_count(k, ratio)
    if b == 0:
        return deltas.mean(dim=0), [1.0 / k] * k
    ordered, rows = deltas.sort(dim=0)
    return ordered[b : k - b].mean(dim=0), rank_shares(rows, b, k - b)


class TrimmedMean(Strategy):
    name = "trimmed-mean"

    def __init__(self, trim_ratio: float = 0.1, server_lr: float = 1.0):
        if not 0 <= trim_ratio < 0.5:
            raise ValueError(f"fed.trim_ratio must be in [0, 0.5), got {trim_ratio}")
        self.trim_ratio = trim_ratio
        self.server_lr = server_lr

    @classmethod
    def from_config(cls, fed: FedConfig, _seed: int) -> Strategy:
        return cls(trim_ratio=fed.trim_ratio, server_lr=fed.server_lr)

    def aggregate(self, inputs: RoundInput, state: dict) -> Aggregation:
        mean, shares = coordinate_trimmed_mean(inputs.deltas, self.trim_ratio)
        update = mean * self.server_lr
        diagnostics = {
            "weights": shares,
            "conflict_share": None,
            "trimmed": trimmed_count(inputs.deltas.shape[0], self.trim_ratio),
        }
        return Aggregation(update, dict(state), diagnostics)
