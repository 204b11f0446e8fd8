"""FedAW = FedAdp, "federated adaptive weighting" (Wu & Wang 2021).

With p_k = n_k/n and the FedAvg direction ḡ = Σ_j p_j Δ_j:

    θ_k   = arccos cos(Δ_k, ḡ)                       (π/2 when either vector is zero)
    θ̃_k  = running mean of θ_k over the rounds client k took part in (this one included)
    f(θ̃) = α (1 − exp(−exp(−α (θ̃ − 1))))           (Gompertz, α = 5 by default)
    ψ_k   = n_k e^{f(θ̃_k)} / Σ_j n_j e^{f(θ̃_j)}
    w_{t+1} = w_t + η Σ_k ψ_k Δ_k

The angles come from the Gram matrix G = D Dᵀ (⟨Δ_k, ḡ⟩ = (G p)_k, ‖ḡ‖² = pᵀ G p), so FedAW
costs one Gram matrix and one weighted sum, and gets the conflict share for free. The state is
JSON-friendly: {"theta": {str(client id): [running mean, rounds seen]}}.
"""

from __future__ import annotations

import math

import torch

from fedpose.fl.fedgh import conflict_share, cosine_from_gram, gram_matrix
from fedpose.fl.strategies.base import (
    Aggregation,
    RoundInput,
    Strategy,
    sample_weights,
    weighted_sum,
)


def gompertz(theta: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha * (1.0 - torch.exp(-torch.exp(-alpha * (theta - 1.0))))


def fedadp_weights(
    gram: torch.Tensor,
    counts: torch.Tensor,
    client_ids: list[int],
    theta_state: dict,
    alpha: float = 5.0,
) -> tuple[torch.Tensor, dict, list[float]]:
    """ψ (float64), the updated running means, and this round's angles θ_k."""
    counts = counts.to(torch.float64)
    p = sample_weights(counts)
    gp = gram @ p
    denom = gram.diagonal().clamp_min(0).sqrt() * math.sqrt(max(float(p @ gp), 0.0))
    cos = torch.where(denom > 0, gp / torch.where(denom > 0, denom, 1.0), 0.0).clamp(-1, 1)
    theta = torch.arccos(cos)
    new_state = dict(theta_state)
    smoothed = []
    for cid, th in zip(client_ids, theta.tolist(), strict=True):
        mean, seen = new_state.get(str(cid), [0.0, 0])
        seen += 1
        mean += (th - mean) / seen
        new_state[str(cid)] = [mean, seen]
        smoothed.append(mean)
    f = gompertz(torch.tensor(smoothed, dtype=torch.float64), alpha)
    if float(counts.sum()) <= 0:
        counts = torch.ones_like(counts)
    # n_k e^{f_k} normalised; shifting f by its max keeps exp finite for any alpha
    scores = counts * torch.exp(f - f.max())
    return scores / scores.sum(), new_state, theta.tolist()


class FedAW(Strategy):
    name = "fedaw"

    def __init__(self, alpha: float = 5.0, tau: float = 0.0, server_lr: float = 1.0):
        self.alpha = alpha
        self.tau = tau
        self.server_lr = server_lr

    def initial_state(self) -> dict:
        return {"theta": {}}

    def aggregate(self, inputs: RoundInput, state: dict) -> Aggregation:
        gram = gram_matrix(inputs.deltas)
        psi, theta_state, angles = fedadp_weights(
            gram, inputs.counts, inputs.client_ids, state.get("theta", {}), self.alpha)
        update = weighted_sum(inputs.deltas, self.server_lr * psi, inputs.add_to)
        diagnostics = {
            "weights": psi.tolist(),
            "conflict_share": conflict_share(cosine_from_gram(gram), self.tau),
            "angles": angles,
        }
        return Aggregation(update, {**state, "theta": theta_state}, diagnostics)
