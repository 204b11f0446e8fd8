"""FedAvg (McMahan et al. 2017): the sample-weighted mean of the client updates.

    w_{t+1} = w_t + η Σ_k (n_k / n) Δ_k

One matrix-vector product over the K x P updates; no Gram matrix, so no conflict statistics.
"""

from __future__ import annotations

from fedpose.fl.strategies.base import (
    Aggregation,
    RoundInput,
    Strategy,
    sample_weights,
    weighted_sum,
)


class FedAvg(Strategy):
    name = "fedavg"

    def __init__(self, server_lr: float = 1.0):
        self.server_lr = server_lr

    def aggregate(self, inputs: RoundInput, state: dict) -> Aggregation:
        p = sample_weights(inputs.counts)
        update = weighted_sum(inputs.deltas, self.server_lr * p)
        return Aggregation(update, dict(state), {"weights": p.tolist(), "conflict_share": None})
