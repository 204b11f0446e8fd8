"""SCAFFOLD (Karimireddy et al., ICML 2020), server side, with option II control variates.

Clients step along g − c_k + c and return Δ_k and c_k⁺ − c_k (client rule "scaffold",
fl/client.py). With S the clients of this round and N all clients, the server keeps c (P,),
starting at 0:

    w_{t+1} = w_t + η Σ_{k∈S} p_k Δ_k
    c       ← c + (1/N) Σ_{k∈S} (c_k⁺ − c_k)        (= c + (|S|/N) · mean of the changes)

p_k = n_k / n as in FedAvg (the paper's unweighted mean where the n_k are equal), so with every
control at 0 a round is FedAvg's. c lives in the strategy state (and the checkpoint) and goes to
the clients with every training request.
"""

from __future__ import annotations

import torch

from fedpose.fl.strategies.base import (
    Aggregation,
    RoundInput,
    Strategy,
    sample_weights,
    weighted_sum,
)


class Scaffold(Strategy):
    name = "scaffold"
    client_rule = "scaffold"

    def __init__(self, server_lr: float = 1.0):
        self.server_lr = server_lr

    def client_control(self, state: dict) -> torch.Tensor | None:
        return state.get("c")

    def aggregate(self, inputs: RoundInput, state: dict) -> Aggregation:
        p = sample_weights(inputs.counts)
        update = weighted_sum(inputs.deltas, self.server_lr * p)
        change = None
        if inputs.controls is not None:
            change = weighted_sum(
                inputs.controls, control_weights(inputs.controls.shape[0], inputs.num_clients)
            )
        return self.step(update, change, p.tolist(), state)

    def step(
        self,
        update: torch.Tensor,
        change: torch.Tensor | None,
        weights: list[float],
        state: dict,
    ) -> Aggregation:
        """The server step from the two sums SCAFFOLD reads: `update` = η Σ_k p_k Δ_k and
        `change` = (1/N) Σ_k (c_k⁺ − c_k), or None without control changes (the secure path
        passes the securely aggregated sums; fl/secure.py)."""
        c = state.get("c")
        if change is not None:
            c = change if c is None else c + change
        diagnostics = {
            "weights": weights,
            "conflict_share": None,
            "c_norm": None if c is None else float(c.norm()),
        }
        return Aggregation(update, {**state, **({"c": c} if c is not None else {})}, diagnostics)


def control_weights(k: int, num_clients: int) -> torch.Tensor:
    """The weight 1/N of each of the round's k control changes in c's update."""
    return torch.full((k,), 1.0 / num_clients, dtype=torch.float64)
