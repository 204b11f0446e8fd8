"""The in-process engine under secure aggregation: the sites' half of fl/secure.py's protocol.

`SecureLocalTransport` stands between the server loop and the in-process clients. Everything
left of it is the server; everything right of it is the sites:

    server loop ──receive()──►  TrainReply: counts, losses, the CountSketch — delta is None
                ──secure_sum()─► Σ_k c_k Δ_k and Σ_k a_k · BN statistics_k, nothing per site
    sites       SiteStore: each site's Δ_k and BN statistics, never handed to the server

In-process the sum is exact (the same `weighted_sum` and `weighted_average` the plain path
runs), so an experiment measures what the sketch costs, not SecAgg+'s quantisation; on Flower
the same sum runs through SecAgg+ (engine/flower_secagg.py).
"""

from __future__ import annotations

import torch

from fedpose.engine.local import LocalTransport
from fedpose.fl.gram import weighted_sum
from fedpose.fl.messages import TrainReply, TrainRequest
from fedpose.fl.params import ModelLayout, weighted_average
from fedpose.fl.sketch import count_sketch


class SiteStore:
    """The sites' own memory of their last update: what secure aggregation keeps private."""

    def __init__(self) -> None:
        self._updates: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}

    def keep(self, client_id: int, delta: torch.Tensor, averaged: dict[str, torch.Tensor]) -> None:
        self._updates[client_id] = (delta, averaged)

    def sum(
        self, client_ids: list[int], coef: list[float], avg_weights: list[float], names
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """What secure aggregation reveals: the two sums, computed as the plain path does."""
        rows = [self._updates.pop(k) for k in client_ids]
        self._updates.clear()  # updates of clients left out of the sum die with the round
        deltas = torch.stack([d for d, _ in rows])
        total = weighted_sum(deltas, torch.tensor(coef, dtype=torch.float64))
        averaged = weighted_average([a for _, a in rows], names, avg_weights)
        return total, averaged


class SecureLocalTransport:
    """LocalTransport for `fed.secure = true`: see the module docstring."""

    def __init__(self, inner: LocalTransport, layout: ModelLayout, width: int | None, secret: str):
        if width is not None and not secret:
            raise ValueError(
                "fed.secure with a conflict-aware method needs the sites' sketch secret: "
                "set fed.sketch_secret (in-process) or each SuperNode's sketch-secret (Flower)"
            )
        self._sites = LocalSites(inner, width, secret)
        self.local = inner  # the sites' own transport (the engine hands it its observer)
        self.layout = layout

    def send(self, request: TrainRequest) -> None:
        self._sites.send(request)

    def receive(self, client_id: int) -> TrainReply:
        return self._sites.receive(client_id)

    def secure_sum(
        self, client_ids: list[int], coef: list[float], avg_weights: list[float]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._sites.store.sum(client_ids, coef, avg_weights, self.layout.avg_names)

    def state_dict(self) -> dict:
        return self._sites.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._sites.inner.load_state_dict(state)


class LocalSites:
    """The sites: they train (LocalTransport), keep their update, and send only its sketch."""

    def __init__(self, inner: LocalTransport, width: int | None, secret: str):
        self.inner = inner
        self.width = width
        self.secret = secret
        self.store = SiteStore()

    def send(self, request: TrainRequest) -> None:
        self.inner.send(request)

    def receive(self, client_id: int) -> TrainReply:
        reply = self.inner.receive(client_id)
        # a site checks its own update: the server cannot see a non-finite value in a sum
        problem = reply.problem()
        if problem:
            return TrainReply(client_id=client_id, version=reply.version, error=problem)
        self.store.keep(client_id, reply.delta, reply.averaged)
        sketch = None if self.width is None else count_sketch(reply.delta, self.width, self.secret)
        return TrainReply(
            client_id=reply.client_id,
            version=reply.version,
            num_samples=reply.num_samples,
            sketch=sketch,
            train_loss=reply.train_loss,
            train_loss_sq=reply.train_loss_sq,
            steps=reply.steps,
            seconds=reply.seconds,
        )
