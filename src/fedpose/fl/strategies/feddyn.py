"""FedDyn (Acar et al. 2021), server side.

Clients minimise L_k(w) − ⟨∇L_k(w_k^{t−1}), w⟩ + (α/2)‖w − w_t‖² (client rule "dyn"). The
server keeps h (P,), starting at 0, and with S the clients of this round and m all clients:

    h ← h − α (1/m) Σ_{k∈S} Δ_k
    w_{t+1} = (1/|S|) Σ_{k∈S} w_k − h/α,   i.e.  update = (1/|S|) Σ_{k∈S} Δ_k − h/α

(the mean is unweighted, as in the paper; η = server_lr scales the whole update). The state
holds h as a tensor; it lives in the server checkpoint.
"""

from __future__ import annotations

import torch

from fedpose.config import FedConfig
from fedpose.fl.strategies.base import Aggregation, RoundInput, Strategy, weighted_sum


class FedDyn(Strategy):
    name = "feddyn"
    client_rule = "dyn"

    def __init__(self, alpha: float = 0.01, server_lr: float = 1.0):
        if alpha <= 0:
            raise ValueError(f"FedDyn needs alpha > 0, got {alpha}")
        self.alpha = alpha
        self.server_lr = server_lr

    @classmethod
    def from_config(cls, fed: FedConfig, _seed: int) -> Strategy:
        return cls(alpha=fed.dyn_alpha, server_lr=fed.server_lr)

    @property
    def client_coef(self) -> float:
        return self.alpha

    def aggregate(self, inputs: RoundInput, state: dict) -> Aggregation:
        deltas = inputs.deltas
        k = len(deltas)
        total = weighted_sum(deltas, torch.ones(k, dtype=torch.float64))  # Σ_k Δ_k
        return self.step(total, k, inputs.num_clients, state)

    def step(
        self,
        total: torch.Tensor,
        k: int,
        num_clients: int,
        state: dict,
    ) -> Aggregation:
        """The server step from the plain sum Σ_k Δ_k of the round's k updates (all FedDyn's
        server reads; the secure path passes the securely aggregated sum). `total` is reused."""
        h = state.get("h")
        h = torch.zeros_like(total) if h is None else h.clone()
        # separate multiplies and adds, each rounded once: an add with alpha may be fused into
        # one multiply-add on some instruction sets and not on others
        h.sub_(total * (self.alpha / num_clients))
        update = total.mul_(self.server_lr / k).sub_(h * (self.server_lr / self.alpha))
        diagnostics = {"weights": [1.0 / k] * k, "conflict_share": None, "h_norm": float(h.norm())}
        return Aggregation(update, {**state, "h": h}, diagnostics)
