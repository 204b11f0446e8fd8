"""Dynamic client selection: which of the clients available now train this round.

- random: a seeded uniform sample.
- deadline: only clients whose expected round time fits the deadline, then a seeded sample; when
  none fits, the single fastest client, so the federation never stalls.
- utility: Oort (Lai et al., OSDI 2021). A client's utility is its statistical utility
  |B_k| · sqrt(mean squared training loss), times (T / t_k)^α when its expected round time t_k
  exceeds the preferred round time T. Clients never seen come first (every client is tried
  once). Each of the m picks explores with probability ε (Binomial(m, ε) explorers, at most
  m − 1 when m > 1, so ε m on average and no fixed exploring slot), uniformly among the clients
  not exploited; the rest
  are drawn with probability ∝ utility among the candidates whose utility is at least `cutoff`
  (0.95) times the utility of the last client that a plain top-m cut would admit.

In asynchronous mode the server asks for exactly as many clients as it has free slots and passes
each client's last dispatch number: random and deadline then serve the clients that waited longest
(never-dispatched ones first, ties in seeded order), so every idle client gets its turn; utility
follows its ranking.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from fedpose import seeding
from fedpose.config import choice_problem

POLICIES = ("random", "deadline", "utility")  # the `fed.selection` names


def selection_problem(policy: str) -> str | None:
    """Why `fed.selection` names no selection policy (None when it does)."""
    return choice_problem("fed.selection", policy, POLICIES)


class Selector:
    def __init__(
        self,
        policy: str,
        per_round: int,
        seed: int,
        deadline: float = 0.0,
        explore: float = 0.1,
        round_time: float = 0.0,
        penalty: float = 2.0,
        cutoff: float = 0.95,
    ):
        problem = selection_problem(policy)
        if problem:
            raise ValueError(problem)
        self.policy = policy
        self.per_round = per_round
        self.seed = seed
        self.deadline = deadline
        self.explore = explore
        self.round_time = round_time
        self.penalty = penalty
        self.cutoff = cutoff
        self.last_loss: dict[int, float] = {}
        self.last_loss_sq: dict[int, float] = {}

    def state_dict(self) -> dict:
        return {
            "last_loss": {str(k): v for k, v in self.last_loss.items()},
            "last_loss_sq": {str(k): v for k, v in self.last_loss_sq.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.last_loss = {int(k): float(v) for k, v in state.get("last_loss", {}).items()}
        self.last_loss_sq = {int(k): float(v) for k, v in state.get("last_loss_sq", {}).items()}

    def observe(self, client: int, loss: float, loss_sq: float = math.nan) -> None:
        """Record a client's mean training loss and mean squared loss (NaN: not reported)."""
        if math.isfinite(loss):
            self.last_loss[client] = loss
            if math.isfinite(loss_sq):
                self.last_loss_sq[client] = loss_sq
            else:
                self.last_loss_sq.pop(client, None)

    def select(
        self,
        available: list[int],
        round_: int,
        sizes: list[int],
        expected_time: Callable[[int], float],
        m: int | None = None,
        last_turn: dict[int, int] | None = None,
    ) -> list[int]:
        """Up to m clients (default: per_round, 0 = all), in ascending id order.

        `last_turn` (asynchronous dispatch): client -> number of its last dispatch; random and
        deadline then prefer the clients that waited longest instead of a uniform sample.
        """
        rng = seeding.stream(self.seed, seeding.SELECTION, round_)
        pool = sorted(available)
        if m is None:
            m = len(pool) if self.per_round <= 0 else self.per_round
        m = min(m, len(pool))
        if m <= 0:
            return []
        if self.policy == "deadline" and self.deadline > 0:
            fits = [k for k in pool if expected_time(k) <= self.deadline]
            pool = fits or [min(pool, key=expected_time)]
            m = min(m, len(pool))
        if self.policy == "utility":
            return sorted(self._by_utility(pool, m, sizes, expected_time, rng))
        if last_turn is not None:
            tie = rng.permutation(len(pool))
            order = sorted(range(len(pool)), key=lambda i: (last_turn.get(pool[i], -1), tie[i]))
            return sorted(pool[i] for i in order[:m])
        return sorted(int(k) for k in rng.choice(pool, size=m, replace=False))

    # ------------------------------------------------------------------------------- Oort
    def preferred_time(self, pool: list[int], expected_time: Callable[[int], float]) -> float:
        """Oort's T: the configured round time, else the median expected time of the pool."""
        if self.round_time > 0:
            return self.round_time
        return float(np.median([expected_time(k) for k in pool])) if pool else 0.0

    def utility(
        self,
        client: int,
        sizes: list[int],
        expected_time: Callable[[int], float],
        round_time: float | None = None,
    ) -> float:
        """|B_k| · sqrt(mean squared loss) · (T / t_k)^α if t_k > T; inf for a client never seen.

        Without a reported mean squared loss, the squared mean loss stands in for it (a lower
        bound). T is `round_time`, else the configured one; T ≤ 0 means no speed penalty.
        """
        loss = self.last_loss.get(client)
        if loss is None:
            return math.inf
        loss_sq = self.last_loss_sq.get(client, loss * loss)
        value = sizes[client] * math.sqrt(max(loss_sq, 0.0))
        t_pref = self.round_time if round_time is None else round_time
        t_k = expected_time(client)
        if t_pref > 0 and t_k > t_pref:
            value *= (t_pref / t_k) ** self.penalty
        return value

    def _by_utility(
        self,
        pool: list[int],
        m: int,
        sizes: list[int],
        expected_time: Callable[[int], float],
        rng: np.random.Generator,
    ) -> list[int]:
        if self.explore <= 0:
            n_explore = 0
        elif m > 1:
            # each pick explores with probability ε (Binomial(m, ε) explorers, ε m on average),
            # keeping one exploited pick: a fixed explorer slot would make half of every
            # 2-client round random
            n_explore = min(m - 1, int(rng.binomial(m, self.explore)))
        else:
            n_explore = int(rng.random() < self.explore)
        n_exploit = m - n_explore

        unseen = [pool[i] for i in rng.permutation(len(pool)) if pool[i] not in self.last_loss]
        chosen = unseen[:n_exploit]
        need = n_exploit - len(chosen)
        seen = [k for k in pool if k in self.last_loss]
        if need > 0 and seen:
            t_pref = self.preferred_time(pool, expected_time)
            util = {k: self.utility(k, sizes, expected_time, t_pref) for k in seen}
            ranked = sorted(seen, key=lambda k: (-util[k], k))
            need = min(need, len(ranked))
            threshold = self.cutoff * util[ranked[need - 1]]
            candidates = [k for k in ranked if util[k] >= threshold]
            p = np.array([util[k] for k in candidates], dtype=float)
            p = p / p.sum() if np.count_nonzero(p) >= need else None
            picks = rng.choice(len(candidates), size=need, replace=False, p=p)
            chosen += [candidates[int(i)] for i in picks]

        rest = [k for k in pool if k not in chosen]
        n_explore = min(m - len(chosen), len(rest))
        if n_explore > 0:
            chosen += [int(k) for k in rng.choice(rest, size=n_explore, replace=False)]
        return chosen
