"""FedAW = FedAdp, "federated adaptive weighting" (Wu & Wang 2021).

With p_k = n_k/n and the FedAvg direction ḡ = Σ_j p_j Δ_j:

    θ_k   = arccos cos(Δ_k, ḡ)                       (π/2 when either vector is zero)
    θ̃_k  = running mean of θ_k over the rounds client k took part in (this one included)
    f(θ̃) = α (1 − exp(−exp(−α (θ̃ − 1))))           (Gompertz, α = 5 by default)
    ψ_k   = n_k e^{f(θ̃_k)} / Σ_j n_j e^{f(θ̃_j)}
    w_{t+1} = w_t + η Σ_k ψ_k Δ_k

The angles come from the Gram matrix G = D Dᵀ (⟨Δ_k, ḡ⟩ = (G p)_k, ‖ḡ‖² = pᵀ G p), so FedAW
costs one Gram matrix and one weighted sum, and gets the conflict share for free. Everything
after the Gram matrix is scalar float64 arithmetic with exactly rounded sums (math.fsum) and
exactly computed acos/exp (fl/gram.py), so ψ has the same bits on every machine. The state is
JSON-friendly: {"theta": {str(client id): [running mean, rounds seen]}}.

One weight per reply: an asynchronous buffer can hold several replies of one client. Each reply
keeps its own row (its own Δ_k and n_k), but the running mean advances once per aggregation, by
the mean of that client's angles in it, and every reply of the client uses the resulting θ̃_k. So
equal replies get equal weights, and the order of replies inside a buffer does not matter.
"""

from __future__ import annotations

import math

import torch

from fedpose.config import FedConfig
from fedpose.fl.gram import (
    conflict_share,
    cosine_from_gram,
    det_acos,
    det_exp,
    gram_matrix,
    gram_record,
)
from fedpose.fl.strategies.base import (
    Aggregation,
    RoundInput,
    Strategy,
    sample_weights,
    weighted_sum,
)


def gompertz(theta: float, alpha: float) -> float:
    return alpha * (1.0 - det_exp(-det_exp(-alpha * (theta - 1.0))))


def fedadp_weights(
    gram: torch.Tensor,
    counts: torch.Tensor,
    client_ids: list[int],
    theta_state: dict,
    alpha: float = 5.0,
) -> tuple[torch.Tensor, dict, list[float]]:
    """ψ (float64), the updated running means, and this round's angles θ_k."""
    g = gram.to(torch.float64).tolist()
    n = counts.to(torch.float64).tolist()
    p = sample_weights(counts).tolist()
    gp = [math.fsum(gkj * pj for gkj, pj in zip(row, p, strict=True)) for row in g]
    mean_norm = math.sqrt(max(math.fsum(pk * v for pk, v in zip(p, gp, strict=True)), 0.0))
    theta = []
    for k, v in enumerate(gp):
        denom = math.sqrt(max(g[k][k], 0.0)) * mean_norm
        cos = min(max(v / denom, -1.0), 1.0) if denom > 0 else 0.0
        theta.append(det_acos(cos))
    angles: dict[str, list[float]] = {}
    for cid, th in zip(client_ids, theta, strict=True):
        angles.setdefault(str(cid), []).append(th)
    new_state = dict(theta_state)
    for key, values in angles.items():
        mean, seen = new_state.get(key, [0.0, 0])
        seen += 1
        mean += (math.fsum(values) / len(values) - mean) / seen
        new_state[key] = [mean, seen]
    smoothed = [new_state[str(cid)][0] for cid in client_ids]
    f = [gompertz(th, alpha) for th in smoothed]
    if math.fsum(n) <= 0:
        n = [1.0] * len(n)
    # n_k e^{f_k} normalised; shifting f by its max keeps exp finite for any alpha
    top = max(f)
    scores = [nk * det_exp(fk - top) for nk, fk in zip(n, f, strict=True)]
    total = math.fsum(scores)
    return torch.tensor([s / total for s in scores], dtype=torch.float64), new_state, theta


class FedAW(Strategy):
    name = "fedaw"

    def __init__(self, alpha: float = 5.0, tau: float = 0.0, server_lr: float = 1.0):
        self.alpha = alpha
        self.tau = tau
        self.server_lr = server_lr

    @classmethod
    def from_config(cls, fed: FedConfig, _seed: int) -> Strategy:
        return cls(alpha=fed.aw_alpha, tau=fed.gh_tau, server_lr=fed.server_lr)

    def initial_state(self) -> dict:
        return {"theta": {}}

    def aggregate(self, inputs: RoundInput, state: dict) -> Aggregation:
        gram = gram_matrix(inputs.deltas)
        psi, theta_state, angles = fedadp_weights(
            gram, inputs.counts, inputs.client_ids, state.get("theta", {}), self.alpha
        )
        update = weighted_sum(inputs.deltas, self.server_lr * psi)
        diagnostics = {
            "weights": psi.tolist(),
            "conflict_share": conflict_share(cosine_from_gram(gram), self.tau),
            "angles": angles,
            "gram": gram_record(inputs.deltas.shape[1]),
        }
        return Aggregation(update, {**state, "theta": theta_state}, diagnostics)
