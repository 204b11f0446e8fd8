"""The comparison statistic, fixed before looking at results, and paired confidence intervals.

A run's score is the mean of its evaluations in the last `TAIL` (20 %) of its configured rounds,
never the best round: single rounds move by several PCK points, and picking the best of many
noisy rounds favours the noisiest method. Two methods are compared on paired seeds (the same seed
gives both the same data order, partition and initial model), by the mean of the per-seed
differences with a Student-t 95 % interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TAIL = 0.2


def tail_window(total_rounds: int, tail: float = TAIL) -> tuple[int, int]:
    """The first and last round of the scored window: the last ⌈tail · R⌉ of R rounds."""
    width = max(1, math.ceil(tail * total_rounds - 1e-9))
    return total_rounds - width + 1, total_rounds


def tail_rows(
    rows: list[dict], total_rounds: int, key: str = "pck_mean", tail: float = TAIL
) -> list[dict]:
    """The evaluated rows inside the window (the last evaluated one when none falls inside)."""
    first, last = tail_window(total_rounds, tail)
    evaluated = [r for r in rows if r.get(key) is not None]
    inside = [r for r in evaluated if first <= r["round"] <= last]
    return inside or evaluated[-1:]


def tail_mean(
    rows: list[dict], total_rounds: int, key: str = "pck_mean", tail: float = TAIL
) -> float | None:
    picked = tail_rows(rows, total_rounds, key, tail)
    return float(np.mean([r[key] for r in picked])) if picked else None


@dataclass
class PairedDifference:
    n: int  # paired seeds
    mean: float  # mean of (a − b) over the seeds
    std: float  # sample standard deviation of the differences (nan for n < 2)
    low: float  # 95 % interval (nan for n < 2)
    high: float

    @property
    def resolved(self) -> bool:
        """The interval excludes zero."""
        return self.n >= 2 and (self.low > 0 or self.high < 0)


def paired_difference(
    a: dict[int, float], b: dict[int, float], confidence: float = 0.95
) -> PairedDifference | None:
    """a − b over the seeds both have, with a paired Student-t interval; None without a pair."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = np.array([a[s] - b[s] for s in seeds], dtype=float)
    mean = float(d.mean())
    if len(d) < 2:
        return PairedDifference(1, mean, math.nan, math.nan, math.nan)
    sd = float(d.std(ddof=1))
    from scipy import stats  # a second to import: only the interval needs it

    half = float(stats.t.ppf(0.5 + confidence / 2, len(d) - 1)) * sd / math.sqrt(len(d))
    return PairedDifference(len(d), mean, sd, mean - half, mean + half)


def paired_p_value(a: dict[int, float], b: dict[int, float]) -> float:
    """Two-sided p-value of the paired t-test of a − b over the seeds both have (nan for fewer
    than two pairs, 1 when every difference is the same zero)."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return math.nan
    d = np.array([a[s] - b[s] for s in seeds], dtype=float)
    sd = float(d.std(ddof=1))
    if sd == 0:
        return 1.0 if float(d.mean()) == 0 else 0.0
    from scipy import stats

    t = float(d.mean()) / (sd / math.sqrt(len(d)))
    return float(2 * stats.t.sf(abs(t), len(d) - 1))


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values of a family of comparisons (Holm 1979): sorted
    ascending, the i-th (from 0) is multiplied by (m − i), made monotone and capped at 1. A
    comparison is resolved at family-wise level α when its adjusted p-value is below α."""
    if any(math.isnan(p) for p in p_values.values()):
        raise ValueError("Holm's correction needs every p-value; got nan")  # sorts arbitrarily
    ordered = sorted(p_values, key=lambda k: p_values[k])
    m = len(ordered)
    out: dict[str, float] = {}
    running = 0.0
    for i, key in enumerate(ordered):
        running = max(running, min(1.0, (m - i) * p_values[key]))
        out[key] = running
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for fewer than two values)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan
