"""The strategy interface: a pure function of the round's client updates and the strategy state.

Every strategy sees the selected clients' updates stacked as one float32 matrix `deltas` (K x P,
row k = w_k - w_base(k) over the aggregated trainable tensors, rows in ascending client id), their
aggregation counts (n_k, already multiplied by any staleness discount), and the state it returned
last time. It returns the global update (length P) that the server adds to the global weights, its
new state, and diagnostics for metrics.jsonl. Strategies never touch BatchNorm running statistics
(the server averages those by n_k) and know nothing of transports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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


class Strategy:
    """Base class. Subclasses set the class attributes and implement `aggregate`."""

    name: str = "base"
    client_rule: str = "plain"  # plain | prox | dyn: the local objective clients minimise
    keep_bn_local: bool = False  # FedBN: BatchNorm modules never leave the client

    def initial_state(self) -> dict:
        return {}

    def aggregate(self, inputs: RoundInput, state: dict) -> Aggregation:
        raise NotImplementedError
