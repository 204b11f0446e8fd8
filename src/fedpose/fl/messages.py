"""What the server sends a client and what the client sends back, independent of transport."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# the local objectives a strategy can ask of its clients (see fl/client.py)
CLIENT_RULES = ("plain", "prox", "dyn", "scaffold")


@dataclass
class TrainRequest:
    client_id: int
    version: int  # the global model version the client trains from
    round: int  # the server round (sync) or aggregation count (async) at sending time
    weights: dict[str, torch.Tensor]  # the full global state dict
    seed: int  # drives the client's data order and augmentation
    rule: str = "plain"  # the client's objective: plain | prox | dyn | scaffold
    coef: float = 0.0  # its coefficient: FedProx's mu, FedDyn's alpha
    # SCAFFOLD: the server's control variate c, flat (P,) float32 over the aggregated tensors
    control: torch.Tensor | None = None


@dataclass
class TrainReply:
    client_id: int
    version: int  # the base version this update was computed against
    num_samples: int = 0
    delta: torch.Tensor | None = None  # flat (P,) float32: w_client - w_base over layout.agg_names
    averaged: dict[str, torch.Tensor] = field(default_factory=dict)  # layout.avg_names values
    train_loss: float = float("nan")
    # mean of the squared batch losses: Oort's statistical utility sqrt(mean loss²) without
    # keeping per-sample losses
    train_loss_sq: float = float("nan")
    steps: int = 0
    seconds: float = 0.0  # wall-clock compute time on the client
    error: str | None = None  # set when the client failed; the server drops the reply
    # secure aggregation (fl/secure.py): the update's CountSketch (m,) float64; `delta` is None
    sketch: torch.Tensor | None = None
    # SCAFFOLD: the change of the client's control variate, c_k⁺ − c_k, flat (P,) float32
    control_delta: torch.Tensor | None = None
    # set by the server's reply check (fl/reply_check.py): `averaged` as one float64 vector,
    # packed once for both the finiteness check and the weighted average; never sent
    averaged_flat: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def problem(self) -> str | None:
        """Why the server must not use this reply, or None when it is sound."""
        if self.error:
            return self.error
        if self.delta is None:
            return "no update"
        if not bool(torch.isfinite(self.delta).all()):
            return "non-finite values in the update"
        if self.control_delta is not None and not bool(torch.isfinite(self.control_delta).all()):
            return "non-finite values in the control variate"
        floats = [t.reshape(-1) for t in self.averaged.values() if t.is_floating_point()]
        # one check over all of them first: dozens of tiny checks cost more than the data
        if floats and bool(torch.isfinite(torch.cat(floats)).all()):
            floats = []
        for name, t in self.averaged.items() if floats else ():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"non-finite values in {name}"
        if self.num_samples <= 0:
            return "no training samples"
        return None
