"""Seeded model of a heterogeneous federation: client speed, bandwidth, latency, availability,
dropout, and the simulated clock they imply.

A client's round time = its local work ÷ speed + 2 × model bytes ÷ bandwidth (download and
upload) + latency. Every random draw is a pure function of (seed, round, client), so a run that
resumes from a checkpoint sees the same federation.
"""

from __future__ import annotations

import numpy as np

from fedpose import seeding
from fedpose.config import SystemConfig


def _spread(median: float, spread: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """n values log-uniform over a max/min ratio of `spread`, centred (geometrically) on median."""
    if spread <= 1.0 or n == 1:
        return np.full(n, median, dtype=float)
    half = np.log(spread) / 2
    # evenly spaced quantiles in a seeded order: the stated spread is met exactly
    values = median * np.exp(np.linspace(-half, half, n))
    return rng.permutation(values)


class SystemModel:
    def __init__(self, cfg: SystemConfig, num_clients: int, seed: int):
        self.cfg = cfg
        self.num_clients = num_clients
        self.seed = seed
        rng = seeding.stream(seed, seeding.SYSTEM_PROFILE)
        if cfg.speeds:
            if len(cfg.speeds) != num_clients:
                raise ValueError(
                    f"system.speeds has {len(cfg.speeds)} values for {num_clients} clients"
                )
            self.speed = np.asarray(cfg.speeds, dtype=float)
        else:
            self.speed = _spread(cfg.speed, cfg.speed_spread, num_clients, rng)
        self.bandwidth = _spread(cfg.bandwidth, cfg.bandwidth_spread, num_clients, rng)
        if (self.speed <= 0).any() or (self.bandwidth <= 0).any():
            raise ValueError("system speeds and bandwidths must be positive")

    def _draw(self, round_: int, client: int, stream: int) -> float:
        return float(seeding.stream(self.seed, stream, round_, client).random())

    def available(self, round_: int) -> list[int]:
        if self.cfg.availability >= 1.0:
            return list(range(self.num_clients))
        return [
            k
            for k in range(self.num_clients)
            if self._draw(round_, k, seeding.AVAILABILITY) < self.cfg.availability
        ]

    def drops(self, round_: int, client: int) -> bool:
        return (
            self.cfg.dropout > 0 and self._draw(round_, client, seeding.DROPOUT) < self.cfg.dropout
        )

    def round_time(self, client: int, samples: float, model_bytes: float) -> float:
        return (
            samples / self.speed[client]
            + 2 * model_bytes / self.bandwidth[client]
            + self.cfg.latency
        )
