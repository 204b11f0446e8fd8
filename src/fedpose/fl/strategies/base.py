"""The strategy interface: a pure function of the round's client updates and the strategy state.

Every strategy sees the selected clients' updates stacked as one float32 matrix `deltas` (K x P,
row k = w_k - w_base(k) over the aggregated trainable tensors, rows in ascending client id), their
aggregation counts (n_k, already multiplied by any staleness discount), and the state it returned
last time. It returns the global update (length P) that the server adds to the global weights, its
new state, and diagnostics for metrics.jsonl. The update already includes the server learning rate
(`fed.server_lr`): the server adds it as is. Strategies never touch BatchNorm running statistics
(the server averages those by n_k) and know nothing of transports.

Every strategy ends in one weighted sum over the rows of `deltas` (`weighted_sum`, fl/gram.py), a
single pass over the K x P matrix in a fixed order. The server adds the returned update to the
global weights tensor by tensor (after scaling it by any staleness step), so a strategy never
sees the global weights. Given the same updates, every strategy returns the same bits on every
machine: weights and other scalars are computed in float64 with correctly rounded operations and
exactly rounded or fixed-order sums, never with a BLAS or a vectorised reduction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fedpose.config import FedConfig
from fedpose.fl.gram import weighted_sum


@dataclass
class Aggregation:
    update: torch.Tensor  # (P,) added to the global weights
    state: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)  # JSON-serialisable


@dataclass
class RoundInput:
    deltas: torch.Tensor  # (K, P) float32
    counts: torch.Tensor  # (K,) float64 effective sample counts
    client_ids: list[int]
    num_clients: int  # clients in the federation (FedDyn's m)
    slices: list[tuple[str, int, int]]  # (tensor name, start, end) in P, for per-layer options
    # SCAFFOLD: (K, P) float32 rows c_k⁺ − c_k of the replies (None when no client sent one)
    controls: torch.Tensor | None = None


class Strategy:
    """Base class. Subclasses set the class attributes and implement `aggregate`."""

    name: str = "base"
    client_rule: str = "plain"  # plain | prox | dyn: the local objective clients minimise
    client_coef: float = 0.0  # its coefficient, sent to the clients with every request
    keep_bn_local: bool = False  # FedBN: BatchNorm modules never leave the client

    @classmethod
    def from_config(cls, fed: FedConfig, _seed: int) -> Strategy:
        """The strategy with its options taken from `fed` (the `fed.*` settings): by default
        only the server learning rate. The second argument, the run's seed, seeds any randomness
        of the rule (FedGH's). A strategy with options of its own overrides this, beside its
        constructor."""
        return cls(server_lr=fed.server_lr)

    def initial_state(self) -> dict:
        return {}

    def client_control(self, state: dict) -> torch.Tensor | None:
        """What the server sends with every training request besides the weights (SCAFFOLD's
        control variate c); None for most strategies."""
        del state  # most strategies send nothing else
        return None

    def aggregate(self, inputs: RoundInput, state: dict) -> Aggregation:
        raise NotImplementedError


def sample_weights(counts: torch.Tensor) -> torch.Tensor:
    """n_k / n in float64; equal weights when every count is zero."""
    counts = counts.to(torch.float64)
    total = math.fsum(counts.tolist())  # exactly rounded: staleness makes counts fractional
    if total <= 0:
        return torch.full_like(counts, 1.0 / max(len(counts), 1))
    return counts / total


__all__ = ["Aggregation", "RoundInput", "Strategy", "sample_weights", "weighted_sum"]
