"""Norm-clipped FedAvg: every client update is scaled down to an L2 norm of at most M before the
weighted mean (Sun, Kairouz, Suresh & McMahan 2019, "Can You Really Backdoor Federated
Learning?", norm-difference clipping; the same per-update clipping that DP-FedAvg uses,
McMahan et al. 2018).

    Δ̃_k    = Δ_k / max(1, ‖Δ_k‖₂ / M)
    w_{t+1} = w_t + η Σ_k (n_k / n) Δ̃_k

M = `fed.clip_norm`. One client can then move the model by at most η (n_k / n) M, however large
its update: a boosted (model-replacement) update loses its boost. Honest updates with norm ≤ M
pass unchanged, so M should sit above the typical honest norm (the `update_norms` diagnostic of a
clean run shows it). No noise is added here: for differential privacy see docs/privacy.md.
"""

from __future__ import annotations

import torch

from fedpose.config import FedConfig
from fedpose.fl.strategies.base import (
    Aggregation,
    RoundInput,
    Strategy,
    sample_weights,
    weighted_sum,
)


def clip_factors(deltas: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale min(1, M / ‖Δ_k‖) (float64) and the row norms before clipping."""
    norms = torch.linalg.vector_norm(deltas.double(), dim=1)
    factors = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-300), 1.0)
    return factors, norms


class ClippedFedAvg(Strategy):
    name = "fedavg-clip"

    def __init__(self, clip_norm: float, server_lr: float = 1.0):
        if not clip_norm > 0:
            raise ValueError(f"fed.clip_norm must be > 0, got {clip_norm}")
        self.clip_norm = clip_norm
        self.server_lr = server_lr

    @classmethod
    def from_config(cls, fed: FedConfig, _seed: int) -> Strategy:
        return cls(clip_norm=fed.clip_norm, server_lr=fed.server_lr)

    def aggregate(self, inputs: RoundInput, state: dict) -> Aggregation:
        p = sample_weights(inputs.counts)
        factors, norms = clip_factors(inputs.deltas, self.clip_norm)
        # scaling the weights instead of the rows keeps it one pass over the K x P matrix
        update = weighted_sum(inputs.deltas, self.server_lr * p * factors)
        diagnostics = {
            "weights": p.tolist(),
            "conflict_share": None,
            "update_norms": norms.tolist(),
            "clipped": int((factors < 1).sum()),
        }
        return Aggregation(update, dict(state), diagnostics)
