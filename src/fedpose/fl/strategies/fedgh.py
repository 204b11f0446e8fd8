"""FedGH, federated gradient harmonization: this project's reading of Ni et al. (Sensors 2025).

Each round, with client updates Δ_k (rows of D) and sample counts n_k:
  1. discrepancy: the pairwise cosine matrix of the Δ_k and the share of pairs with cos < τ;
  2. adaptive weights: FedAW's ψ_k (see fedaw.py);
  3. projection correction: ĝ_k = PCGrad(Δ_k) (or Zhang et al.'s symmetric rule), see
     fl/harmonize.py;
  4. reconstruction: w_{t+1} = w_t + η Σ_k ψ_k ĝ_k.
Options: per-layer harmonization (each tensor's columns harmonized on their own, same ψ and visit
order) and rescaling the result to the norm of Σ ψ_k Δ_k (per harmonized group). Ablations:
"fedgh-noproj" (ĝ_k = Δ_k: exactly FedAW) and "fedgh-noaw" (ψ_k = n_k/n: plain PCGrad).

Everything except the final weighted sum comes from one Gram matrix per group, so the whole step
costs one Gram pass plus one FedAvg-like pass over D (method "gram"); method "direct" runs the
plain vector loop instead (the reference, K² passes). The Gram matrices, the K x K arithmetic and
the weighted sum are bit-reproducible across machines (fl/gram.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedpose.config import FedConfig
from fedpose.fl.gram import (
    conflict_share,
    cosine_from_gram,
    exact_dot,
    gram_matrix,
    gram_record,
    ordered_sum,
    weighted_sum,
)
from fedpose.fl.harmonize import check_options, harmonize, projection_coefficients
from fedpose.fl.strategies.base import Aggregation, RoundInput, Strategy, sample_weights
from fedpose.fl.strategies.fedaw import fedadp_weights
from fedpose.seeding import fedgh_order_seed


def column_groups(slices: list[tuple[str, int, int]], p: int) -> list[tuple[int, int]]:
    """The (start, end) column ranges of the tensors, with any uncovered columns as extra groups."""
    groups, at = [], 0
    for _, start, end in sorted(slices, key=lambda s: s[1]):
        if start > at:
            groups.append((at, start))
        if end > start:
            groups.append((start, end))
        at = max(at, end)
    if at < p:
        groups.append((at, p))
    return groups


@dataclass
class FedGH(Strategy):
    """The options are the `fed.gh_*` settings (see FedConfig); `from_config` maps them."""

    alpha: float = 5.0  # FedAW's Gompertz steepness (fed.aw_alpha)
    tau: float = 0.0  # cosine below which two updates conflict
    variant: str = "pcgrad"  # pcgrad | symmetric
    order: str = "random"  # random | index: the projection visit order
    per_layer: bool = False  # harmonize each tensor's columns on their own
    rescale: bool = False  # rescale to the norm of Σ ψ_k Δ_k
    method: str = "gram"  # gram | direct (the reference vector loop)
    server_lr: float = 1.0
    seed: int = 0  # with the round number, seeds the random visit order
    adaptive: bool = True  # False: ψ_k = n_k / n ("fedgh-noaw")
    project: bool = True  # False: no projection ("fedgh-noproj")
    layer_stats: bool = False  # log each tensor's conflict share (costs a second Gram pass)
    name: str = "fedgh"

    @classmethod
    def from_config(
        cls, fed: FedConfig, seed: int, *, adaptive: bool = True, project: bool = True
    ) -> Strategy:
        """FedGH from the `fed.*` settings; the ablations register with adaptive=False
        ("fedgh-noaw") or project=False ("fedgh-noproj")."""
        return cls(
            alpha=fed.aw_alpha,
            tau=fed.gh_tau,
            variant=fed.gh_variant,
            order=fed.gh_order,
            per_layer=fed.gh_per_layer,
            rescale=fed.gh_rescale,
            method=fed.gh_method,
            server_lr=fed.server_lr,
            seed=seed,
            adaptive=adaptive,
            project=project,
            layer_stats=fed.gh_layer_stats,
        )

    def __post_init__(self) -> None:
        check_options(self.variant, self.order, self.method)

    def initial_state(self) -> dict:
        return {"theta": {}, "round": 0}

    def aggregate(self, inputs: RoundInput, state: dict) -> Aggregation:
        deltas = inputs.deltas
        p = deltas.shape[1]
        groups = column_groups(inputs.slices, p) if self.per_layer else [(0, p)]
        grams = torch.stack([gram_matrix(deltas[:, s:e]) for s, e in groups])  # (G, K, K)
        if self.method == "direct" and self.project:
            psi, new_state, diagnostics = self._weights(grams, inputs, state)
            seed = fedgh_order_seed(self.seed, state.get("round", 0))
            update = self._direct(deltas, psi, grams, groups, seed)
        else:
            coef, new_state, diagnostics = self.plan(grams, inputs, state)
            update = self._combine(deltas, coef, groups)
        diagnostics["gram"] = gram_record(max((e - s for s, e in groups), default=0))
        if self.layer_stats:
            diagnostics["layer_conflict"] = layer_conflicts(deltas, inputs.slices, self.tau)
        return Aggregation(update, new_state, diagnostics)

    def plan(
        self, grams: torch.Tensor, inputs: RoundInput, state: dict
    ) -> tuple[torch.Tensor, dict, dict]:
        """(coefficients (G, K) on the raw Δ_k, new state, diagnostics) from the groups' Gram
        matrices alone: the update is Σ_k coef[g, k] Δ_k on group g's columns. `inputs.deltas`
        is not read, which is what lets the secure path (fl/secure.py) run FedGH on estimated
        Gram matrices and a securely aggregated sum."""
        psi, new_state, diagnostics = self._weights(grams, inputs, state)
        seed = fedgh_order_seed(self.seed, state.get("round", 0))
        coef = self._coefficients(psi, grams, seed)  # (G, K): weights on the raw Δ_k
        if len(grams) == 1:
            diagnostics["coefficients"] = coef[0].tolist()
        return coef, new_state, diagnostics

    def _weights(
        self, grams: torch.Tensor, inputs: RoundInput, state: dict
    ) -> tuple[torch.Tensor, dict, dict]:
        """ψ, the new state and the round's diagnostics from the groups' Gram matrices."""
        # the groups partition the columns: their sum (in group order) is the whole-model Gram
        gram = torch.from_numpy(ordered_sum(grams.numpy(), axis=0))
        cosine = cosine_from_gram(gram)
        theta_state = state.get("theta", {})
        if self.adaptive:
            psi, theta_state, _ = fedadp_weights(
                gram, inputs.counts, inputs.client_ids, theta_state, self.alpha
            )
        else:
            psi = sample_weights(inputs.counts)
        diagnostics = {
            "weights": psi.tolist(),
            "conflict_share": conflict_share(cosine, self.tau),
            "cosine": cosine.tolist(),
            "update_norms": np.sqrt(np.maximum(np.diagonal(gram.numpy()), 0.0)).tolist(),
        }
        new_state = {**state, "theta": theta_state, "round": state.get("round", 0) + 1}
        return psi, new_state, diagnostics

    def _coefficients(self, psi: torch.Tensor, grams: torch.Tensor, seed: int) -> torch.Tensor:
        g = grams.numpy()
        w = psi.numpy()
        if self.project:
            c = projection_coefficients(
                grams, variant=self.variant, order=self.order, seed=seed
            ).numpy()
            coef = ordered_sum(w[None, :, None] * c, axis=1)  # (ψᵀ C_g)_j, group by group
        else:
            coef = np.broadcast_to(w, (len(g), len(w))).copy()
        if self.rescale:
            # ‖Σ_k c_k Δ_k‖² = cᵀ G c: the norms come from the Gram matrices, not from the data
            target = _quadratic_form(g, np.broadcast_to(w, coef.shape))
            have = _quadratic_form(g, coef)
            scale = np.where(have > 0, np.sqrt(target / np.where(have > 0, have, 1.0)), 1.0)
            coef = coef * scale[:, None]
        return torch.from_numpy(coef * self.server_lr)

    @staticmethod
    def _combine(deltas, coef, groups) -> torch.Tensor:
        if len(groups) == 1:
            return weighted_sum(deltas, coef[0])
        out = torch.zeros(deltas.shape[1], dtype=deltas.dtype, device=deltas.device)
        for (s, e), c in zip(groups, coef, strict=True):
            weighted_sum(deltas[:, s:e], c, out[s:e])
        return out

    def _direct(self, deltas, psi, grams, groups, seed) -> torch.Tensor:
        """The reference path: the vector loop of fl/harmonize.py, group by group."""
        out = torch.zeros(deltas.shape[1], dtype=deltas.dtype, device=deltas.device)
        for (s, e), g in zip(groups, grams.numpy(), strict=True):
            part = harmonize(
                deltas[:, s:e],
                psi,
                variant=self.variant,
                order=self.order,
                seed=seed,
                method="direct",
            )
            scale = self.server_lr
            if self.rescale:
                target = float(_quadratic_form(g[None], psi.numpy()[None])[0])
                have = exact_dot(part, part)
                scale *= math.sqrt(target / have) if have > 0 else 1.0
            out[s:e] = part.mul_(scale)
        return out


def layer_conflicts(
    deltas: torch.Tensor, slices: list[tuple[str, int, int]], tau: float
) -> dict[str, dict]:
    """{tensor name: {"conflict_share": share of client pairs whose updates of that tensor
    conflict, "norms": each client's ‖Δ_k‖ on it}}: where in the model the clients disagree, and
    how hard they push."""
    out = {}
    for name, start, end in slices:
        if end <= start:
            continue
        gram = gram_matrix(deltas[:, start:end])
        norms = np.sqrt(np.maximum(np.diagonal(gram.numpy()), 0.0))
        share = conflict_share(cosine_from_gram(gram), tau)
        out[name] = {"conflict_share": share, "norms": norms.tolist()}
    return out


def _quadratic_form(grams: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """c_gᵀ G_g c_g for every group g, summed in a fixed order."""
    inner = ordered_sum(grams * coef[:, None, :], axis=2)  # (G c)_k
    return ordered_sum(inner * coef, axis=1)
