"""The in-process engine under secure aggregation: the sites' half of fl/secure.py's protocol.

`SecureLocalTransport` stands between the server loop and the in-process clients. Everything
left of it is the server; everything right of it is the sites:

    server loop ──receive()──►  TrainReply: counts, losses, the CountSketch — delta and
                                control_delta are None
                ──secure_sum()─► Σ_k c_k Δ_k, Σ_k a_k · BN statistics_k (SCAFFOLD: and
                                Σ_k e_k (c_k⁺ − c_k)), nothing per site
    sites       SiteStore: each site's Δ_k, BN statistics and control variate change, never
                handed to the server

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
from fedpose.fl.secure import SecureTotals
from fedpose.fl.sketch import count_sketch


class SiteStore:
    """The sites' own memory of their last update: what secure aggregation keeps private."""

    def __init__(self) -> None:
        self._updates: dict[int, TrainReply] = {}

    def keep(self, reply: TrainReply) -> None:
        """Keep the reply's update, BatchNorm statistics and control variate change."""
        self._updates[reply.client_id] = reply

    def sum(
        self,
        client_ids: list[int],
        coef: list[float],
        avg_weights: list[float],
        names: tuple[str, ...],
        control_coef: list[float] | None = None,
    ) -> SecureTotals:
        """What secure aggregation reveals: the sums, computed as the plain path does."""
        rows = [self._updates.pop(k) for k in client_ids]
        self._updates.clear()  # updates of clients left out of the sum die with the round
        total = weighted_sum(
            torch.stack([r.delta for r in rows]), torch.tensor(coef, dtype=torch.float64)
        )
        averaged = weighted_average([r.averaged for r in rows], names, avg_weights)
        control = None
        if control_coef is not None:  # SCAFFOLD; a reply without a change counts as zeros
            changes = torch.stack(
                [
                    torch.zeros_like(r.delta) if r.control_delta is None else r.control_delta
                    for r in rows
                ]
            )
            control = weighted_sum(changes, torch.tensor(control_coef, dtype=torch.float64))
        return SecureTotals(total, averaged, list(client_ids), control)


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
        self,
        client_ids: list[int],
        coef: list[float],
        avg_weights: list[float],
        control_coef: list[float] | None = None,
    ) -> SecureTotals:
        return self._sites.store.sum(
            client_ids, coef, avg_weights, self.layout.avg_names, control_coef
        )

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
        self.store.keep(reply)
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
