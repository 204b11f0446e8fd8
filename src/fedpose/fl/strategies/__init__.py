"""Server aggregation strategies, one module each, and the registry that names them.

`STRATEGIES` is the one list of methods: `fed.method` name -> builder (FedConfig, seed) ->
Strategy. A builder is the strategy's own `from_config`, which takes its options from the `fed.*`
settings beside its constructor. A new strategy is one file and one line here
(docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from fedpose.config import ConfigError, FedConfig, choice_problem
from fedpose.fl.strategies.base import Aggregation, RoundInput, Strategy
from fedpose.fl.strategies.clipped import ClippedFedAvg
from fedpose.fl.strategies.fedavg import FedAvg
from fedpose.fl.strategies.fedaw import FedAW
from fedpose.fl.strategies.fedbn import FedBN
from fedpose.fl.strategies.feddyn import FedDyn
from fedpose.fl.strategies.fedgh import FedGH
from fedpose.fl.strategies.fedprox import FedProx
from fedpose.fl.strategies.median import CoordinateMedian
from fedpose.fl.strategies.scaffold import Scaffold
from fedpose.fl.strategies.server_opt import with_server_optimizer
from fedpose.fl.strategies.trimmed_mean import TrimmedMean

STRATEGIES: dict[str, Callable[[FedConfig, int], Strategy]] = {
    "fedavg": FedAvg.from_config,
    "fedprox": FedProx.from_config,
    "fedbn": FedBN.from_config,
    "feddyn": FedDyn.from_config,
    "fedaw": FedAW.from_config,
    "fedgh": FedGH.from_config,
    "fedgh-noproj": partial(FedGH.from_config, project=False),
    "fedgh-noaw": partial(FedGH.from_config, adaptive=False),
    "fedavg-clip": ClippedFedAvg.from_config,
    "median": CoordinateMedian.from_config,
    "trimmed-mean": TrimmedMean.from_config,
    "scaffold": Scaffold.from_config,
    # FedAvg followed by a server optimiser (server_opt.py; build_strategy applies it)
    "fedavgm": FedAvg.from_config,
    "fedadam": FedAvg.from_config,
    "fedyogi": FedAvg.from_config,
    "fedadagrad": FedAvg.from_config,
}
STRATEGY_NAMES = tuple(STRATEGIES)


def method_problem(method: str) -> str | None:
    """Why `fed.method` names no registered strategy (None when it does)."""
    return choice_problem("fed.method", method, STRATEGY_NAMES)


def build_strategy(fed_cfg: FedConfig, seed: int = 0) -> Strategy:
    """The strategy registered as `fed_cfg.method`, configured from `fed_cfg`.

    `seed` seeds any randomness of the rule (FedGH's projection order, with the round number).
    """
    problem = method_problem(fed_cfg.method)
    if problem:
        raise ConfigError(problem)
    strategy = STRATEGIES[fed_cfg.method](fed_cfg, seed)
    # the registered name is what metrics.jsonl records, also for a class under several names
    strategy.name = fed_cfg.method
    # the server optimiser `fed.server_opt` asks for, if any (none for plain SGD)
    return with_server_optimizer(strategy, fed_cfg)


__all__ = [
    "STRATEGIES",
    "STRATEGY_NAMES",
    "Aggregation",
    "ClippedFedAvg",
    "CoordinateMedian",
    "FedAW",
    "FedAvg",
    "FedBN",
    "FedDyn",
    "FedGH",
    "FedProx",
    "RoundInput",
    "Scaffold",
    "Strategy",
    "TrimmedMean",
    "build_strategy",
    "method_problem",
]
