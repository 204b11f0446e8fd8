"""Server aggregation strategies, one module each, and `build_strategy` to pick one by name."""

from __future__ import annotations

from fedpose.config import FedConfig
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
from fedpose.fl.strategies.trimmed_mean import TrimmedMean

STRATEGY_NAMES = (
    "fedavg",
    "fedprox",
    "fedbn",
    "feddyn",
    "fedaw",
    "fedgh",
    "fedgh-noproj",
    "fedgh-noaw",
    "fedavg-clip",
    "median",
    "trimmed-mean",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "scaffold",
)


def build_strategy(fed_cfg: FedConfig, seed: int = 0) -> Strategy:
    """The strategy named by `fed_cfg.method`, configured from `fed_cfg`, followed by the server
    optimiser `fed.server_opt` asks for (fl/server_opt.py; none for plain SGD).

    `seed` seeds FedGH's random projection order (together with the round number).
    """
    from fedpose.fl.server_opt import with_server_optimizer

    return with_server_optimizer(_build_strategy(fed_cfg, seed), fed_cfg)


def _build_strategy(fed_cfg: FedConfig, seed: int) -> Strategy:
    f = fed_cfg
    name = f.method.strip().lower()
    lr = f.server_lr
    if name == "fedavg":
        return FedAvg(server_lr=lr)
    if name in ("fedavgm", "fedadam", "fedyogi", "fedadagrad"):  # FedAvg + a server optimiser
        return FedAvg(server_lr=lr)
    if name == "fedprox":
        return FedProx(mu=f.prox_mu, server_lr=lr)
    if name == "fedbn":
        return FedBN(server_lr=lr)
    if name == "feddyn":
        return FedDyn(alpha=f.dyn_alpha, server_lr=lr)
    if name == "fedaw":
        return FedAW(alpha=f.aw_alpha, tau=f.gh_tau, server_lr=lr)
    if name in ("fedgh", "fedgh-noproj", "fedgh-noaw"):
        return FedGH(
            alpha=f.aw_alpha,
            tau=f.gh_tau,
            variant=f.gh_variant,
            order=f.gh_order,
            per_layer=f.gh_per_layer,
            rescale=f.gh_rescale,
            method=f.gh_method,
            server_lr=lr,
            seed=seed,
            adaptive=name != "fedgh-noaw",
            project=name != "fedgh-noproj",
            layer_stats=f.gh_layer_stats,
            name=name,
        )
    if name == "scaffold":
        return Scaffold(server_lr=lr)
    if name == "fedavg-clip":
        return ClippedFedAvg(clip_norm=f.clip_norm, server_lr=lr)
    if name == "median":
        return CoordinateMedian(server_lr=lr)
    if name == "trimmed-mean":
        return TrimmedMean(trim_ratio=f.trim_ratio, server_lr=lr)
    raise ValueError(f"unknown fed.method {f.method!r}; valid: {', '.join(STRATEGY_NAMES)}")


__all__ = [
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
]
