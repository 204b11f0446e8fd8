"""Seeded fault injection: clients that crash, send garbage or never answer, on purpose.

`system.faults` lists the kinds to inject and `system.fault_rate` the probability that one
dispatched client (per round and client) is faulty; the kind is drawn among the listed ones. Like
every draw of the simulated system, both are pure functions of (seed, round, client), so a run
with faults is reproducible and the faulty (round, client) pairs are known in advance: a run with
faults can be compared with a run that simply omitted those clients.

A faulty client does no training (its state does not change), and its reply is:
- exception: the client raises;
- nan: an update full of NaN;
- wrong_shape: an update one element short;
- exploding_norm: a finite update of norm ~1e30;
- timeout: no reply within the server's timeout.
"""

from __future__ import annotations

import numpy as np
import torch

from fedpose.config import FAULT_KINDS, SystemConfig
from fedpose.fl.messages import TrainReply, TrainRequest

_STREAM = 9101  # the random stream of fault draws, apart from availability and dropout


class InjectedFault(RuntimeError):
    """The exception an `exception` fault raises inside the client."""


class FaultPlan:
    def __init__(self, cfg: SystemConfig, seed: int):
        self.kinds = tuple(cfg.faults)
        self.rate = cfg.fault_rate
        self.seed = seed

    def fault(self, round_: int, client: int) -> str | None:
        """The fault of this client in this round (the dispatch number in async mode), or None."""
        if not self.kinds or self.rate <= 0:
            return None
        rng = np.random.default_rng([self.seed, _STREAM, round_, client])
        if rng.random() >= self.rate:
            return None
        return self.kinds[int(rng.integers(len(self.kinds)))]

    def faulty_reply(
        self,
        kind: str,
        request: TrainRequest,
        num_params: int,
        averaged: dict[str, torch.Tensor],
        num_samples: int,
    ) -> TrainReply:
        """The reply a client with this fault sends (or raises InjectedFault)."""
        if kind == "exception":
            raise InjectedFault(
                f"injected fault in client {request.client_id}, round {request.round}"
            )
        reply = TrainReply(
            client_id=request.client_id,
            version=request.version,
            num_samples=num_samples,
            averaged=averaged,
            train_loss=0.0,
            steps=1,
        )
        if kind == "timeout":
            reply.error = "timeout: no reply within the server's timeout"
        elif kind == "nan":
            reply.delta = torch.full((num_params,), float("nan"))
        elif kind == "wrong_shape":
            reply.delta = torch.zeros(max(num_params - 1, 0))
        elif kind == "exploding_norm":
            reply.delta = torch.full((num_params,), 1e30 / max(num_params, 1) ** 0.5)
        else:
            raise ValueError(f"unknown fault {kind!r}; use one of {', '.join(FAULT_KINDS)}")
        return reply
