"""Dynamic client selection: which of the clients available now train this round.

- random: a seeded uniform sample.
- deadline: only clients whose expected round time fits the deadline, then a seeded sample; when
  none fits, the single fastest client, so the federation never stalls.
- utility (Oort-style, Lai et al. 2021): utility_k = last training loss_k × √n_k; the top
  (1 − ε) share of picks by utility, the rest explored uniformly among the others. Clients never
  seen have infinite utility, so every client is tried once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from fedpose import seeding


class Selector:
    def __init__(self, policy: str, per_round: int, seed: int, deadline: float = 0.0,
                 explore: float = 0.1):
        if policy not in ("random", "deadline", "utility"):
            raise ValueError(f"unknown selection {policy!r}: use random, deadline or utility")
        self.policy = policy
        self.per_round = per_round
        self.seed = seed
        self.deadline = deadline
        self.explore = explore
        self.last_loss: dict[int, float] = {}

    def state_dict(self) -> dict:
        return {"last_loss": {str(k): v for k, v in self.last_loss.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.last_loss = {int(k): float(v) for k, v in state.get("last_loss", {}).items()}

    def observe(self, client: int, loss: float) -> None:
        if math.isfinite(loss):
            self.last_loss[client] = loss

    def select(self, available: list[int], round_: int, sizes: list[int],
               expected_time: Callable[[int], float]) -> list[int]:
        rng = seeding.stream(self.seed, seeding.SELECTION, round_)
        pool = sorted(available)
        m = len(pool) if self.per_round <= 0 else min(self.per_round, len(pool))
        if not pool:
            return []
        if self.policy == "deadline" and self.deadline > 0:
            fits = [k for k in pool if expected_time(k) <= self.deadline]
            pool = fits or [min(pool, key=expected_time)]
            m = min(m, len(pool))
        if self.policy == "utility":
            return sorted(self._by_utility(pool, m, sizes, rng))
        return sorted(int(k) for k in rng.choice(pool, size=m, replace=False))

    def _by_utility(self, pool: list[int], m: int, sizes: list[int],
                    rng: np.random.Generator) -> list[int]:
        def utility(k: int) -> float:
            loss = self.last_loss.get(k)
            return math.inf if loss is None else loss * math.sqrt(sizes[k])

        n_explore = int(round(self.explore * m)) if m > 1 else 0
        ranked = sorted(pool, key=lambda k: (-utility(k), k))
        chosen = ranked[: m - n_explore]
        rest = [k for k in pool if k not in chosen]
        if n_explore and rest:
            chosen += [int(k) for k in rng.choice(rest, size=min(n_explore, len(rest)),
                                                  replace=False)]
        return chosen
