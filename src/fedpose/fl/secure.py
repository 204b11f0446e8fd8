"""Secure aggregation for every linear strategy, conflict-aware ones included: the server side.

Every strategy this module supports ends in one weighted sum Σ_k c_k Δ_k (fl/strategies/base.py),
and the conflict-aware ones (FedAW, FedGH, PCGrad = "fedgh-noaw") compute the c_k from the K x K
Gram matrix of the updates alone. So a round needs two things from the sites, neither of which is
one site's update:

  phase 1  each site k sends its sample count n_k and, for a conflict-aware method, a CountSketch
           y_k = S Δ_k of width m (fl/sketch.py; S keyed by a secret the sites share and the
           server never sees). The server estimates Ĝ = Y Yᵀ and runs the strategy's own
           coefficient code on it (`plan_round`): FedGH's `plan`, FedAW's `fedadp_weights`.
  phase 2  each site sends c_k Δ_k (and its share of the BatchNorm statistics; SCAFFOLD: also
           e_k (c_k⁺ − c_k), its control variate's change with e_k = 1/N) through secure
           aggregation; the server obtains only the sums (`SecureSum.secure_sum`) and finishes
           the step (`finish_round`: FedDyn's h, SCAFFOLD's c, a server optimiser; the server
           learning rate is already in c).

A site may drop out during phase 2 (Flower's SecAgg+ recovers the sum of the others). The sums
then cover the survivors only (`SecureTotals.kept`), and `finish_round` makes the step the
strategy takes on them: FedDyn and SCAFFOLD's control variate read plain sums over the round's
clients, so they take the survivors' sums as they are; every other step is the planned
combination, rescaled by Σ_all c / Σ_kept c. For FedAvg, FedProx and SCAFFOLD's model update
that is exactly the plain step over the survivors (Σ_kept n_k Δ_k / Σ_kept n_k); for FedAW and
FedGH it keeps the coefficients planned for all K (the sites applied them before the drop).

The server loop (fl/server.py) talks to the sites only through its transport: in secure mode the
transport's replies carry no update (`TrainReply.delta` is None, `TrainReply.sketch` is set) and
the transport answers `secure_sum`. In-process (engine/secure_local.py) the sites' updates stay in
a site-side store and the sum is exact; on Flower (engine/flower_secagg.py) it runs through
Flower's SecAgg+. Nothing here sees a Δ_k: `plan_round` gets the sketches and the counts,
`finish_round` the sums.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from fedpose.config import ConfigError
from fedpose.fl.gram import conflict_share, cosine_from_gram
from fedpose.fl.messages import TrainReply
from fedpose.fl.sketch import sketch_gram
from fedpose.fl.strategies import build_strategy
from fedpose.fl.strategies.base import Aggregation, RoundInput, Strategy, sample_weights
from fedpose.fl.strategies.fedavg import FedAvg
from fedpose.fl.strategies.fedaw import FedAW, fedadp_weights
from fedpose.fl.strategies.feddyn import FedDyn
from fedpose.fl.strategies.fedgh import FedGH
from fedpose.fl.strategies.scaffold import Scaffold, control_weights
from fedpose.fl.strategies.server_opt import STATE_KEY as OPT_STATE
from fedpose.fl.strategies.server_opt import WithServerOptimizer

# what runs under secure aggregation: a server step that is a weighted sum with coefficients from
# the counts or a Gram matrix (SCAFFOLD: two weighted sums), optionally followed by a server
# optimiser (fedavgm, fedadam, ...)
SECURE_KINDS = (
    "FedAvg, FedProx, FedBN, FedDyn, SCAFFOLD, FedAW, FedGH (and its ablations), server optimisers"
)


@dataclass
class SecureTotals:
    """What secure aggregation reveals of one round: sums over the clients in `kept`, nothing
    per client."""

    update: torch.Tensor  # Σ_{k ∈ kept} coef_k Δ_k, flat float32 (P,)
    averaged: dict[str, torch.Tensor]  # the kept clients' BatchNorm statistics, averaged
    kept: list[int]  # the clients whose vectors are in the sums: all asked, or the survivors
    control: torch.Tensor | None = None  # SCAFFOLD: Σ_{k ∈ kept} control_coef_k (c_k⁺ − c_k)
    diagnostics: dict = field(default_factory=dict)  # the transport's, for metrics.jsonl


class SecureSum(Protocol):
    """The sites' side of phase 2, as the server reaches it through its transport."""

    def secure_sum(
        self,
        client_ids: list[int],
        coef: list[float],
        avg_weights: list[float],
        control_coef: list[float] | None = None,
    ) -> SecureTotals:
        """The sums over the listed clients' updates of this round, which the transport holds
        site-side: Σ_k coef_k Δ_k, the BatchNorm statistics averaged by avg_weights and, with
        control_coef, Σ_k control_coef_k (c_k⁺ − c_k)."""
        ...


def secure_config_problems(fed) -> Iterator[str | None]:
    """What fed.secure asks of the other settings (the ranges are Config.validate's)."""
    if not fed.secure:
        return
    try:
        strategy = build_strategy(fed)
    except (ConfigError, ValueError):
        return  # an unknown method or option: its registry says so
    if not supported(strategy):
        yield (
            f"fed.secure: {fed.method} reads each update itself (clipping, medians, trimming) "
            f"and cannot run under secure aggregation; secure runs {SECURE_KINDS}"
        )
    if fed.mode != "sync":
        yield "fed.secure: secure aggregation runs synchronous rounds only (fed.mode = sync)"
    if needs_sketch(strategy):
        if fed.gh_per_layer or fed.gh_layer_stats:
            yield (
                "fed.secure: per-layer harmonization and per-layer statistics need one sketch "
                "per tensor; set fed.gh_per_layer and fed.gh_layer_stats to false"
            )
        if fed.gh_method != "gram":
            yield "fed.secure: FedGH's direct method reads the updates; use fed.gh_method = gram"


def _unwrapped(strategy: Strategy) -> Strategy:
    return strategy.inner if isinstance(strategy, WithServerOptimizer) else strategy


def needs_sketch(strategy: Strategy) -> bool:
    return isinstance(_unwrapped(strategy), FedAW | FedGH)


def supported(strategy: Strategy) -> bool:
    return isinstance(_unwrapped(strategy), FedAvg | FedDyn | Scaffold | FedAW | FedGH)


@dataclass
class SecurePlan:
    """Phase 1's outcome: site k (client_ids[k]) contributes coef[k] Δ_k, avg_weights[k] of its
    BatchNorm statistics and (SCAFFOLD) control_coef[k] (c_k⁺ − c_k) to the secure sums."""

    client_ids: list[int]
    coef: list[float]
    avg_weights: list[float]
    state: dict
    diagnostics: dict
    control_coef: list[float] | None = None
    optimizer_state: dict | None = None  # a server optimiser's, kept apart from the strategy's


def check_secure_reply(reply: TrainReply, width: int | None) -> tuple[str | None, float]:
    """(why the server cannot use this phase-1 reply, or None; the estimated update norm ‖y_k‖,
    NaN without a sketch). Sites check their own update's finiteness before sending it."""
    if reply.error:
        return reply.error, math.nan
    if reply.delta is not None:
        return "a secure reply must not carry the update itself", math.nan
    if reply.control_delta is not None:
        return "a secure reply must not carry its control variate change itself", math.nan
    if isinstance(reply.num_samples, bool) or not isinstance(reply.num_samples, int):
        return f"sample count {reply.num_samples!r} is not an integer", math.nan
    if reply.num_samples <= 0:
        return "no training samples", math.nan
    if width is None:
        return None, math.nan
    y = reply.sketch
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.numel() != width:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        return f"sketch of shape {got}, expected ({width},) (fed.sketch_width)", math.nan
    norm = float(torch.linalg.vector_norm(y.double()))
    if not math.isfinite(norm):
        return "non-finite values in the sketch", norm
    return None, norm


def plan_round(
    strategy: Strategy,
    sketches: torch.Tensor | None,
    p: int,
    counts: torch.Tensor,
    client_ids: list[int],
    num_clients: int,
    state: dict,
) -> SecurePlan:
    """The coefficients from the counts and (conflict-aware methods) the sketches, by the
    strategy's own code: the estimated Gram matrix stands where the exact one stood."""
    if isinstance(strategy, WithServerOptimizer):
        inner_state = {k: v for k, v in state.items() if k != OPT_STATE}
        plan = plan_round(strategy.inner, sketches, p, counts, client_ids, num_clients, inner_state)
        plan.optimizer_state = state.get(OPT_STATE, {})
        return plan
    k = len(client_ids)
    avg = sample_weights(counts).tolist()
    # the server holds no update: the strategies' Gram-space code reads only the Gram matrix
    no_updates = RoundInput(torch.empty(k, 0), counts, client_ids, num_clients, [])
    if isinstance(strategy, FedGH | FedAW):
        if sketches is None:
            raise ValueError(f"{strategy.name} under secure aggregation needs the sketches")
        gram = sketch_gram(sketches, p)
        if isinstance(strategy, FedGH):
            coef, new_state, diag = strategy.plan(gram[None], no_updates, state)
            diag["gram"] = {"path": "CountSketch estimate", "width": int(sketches.shape[1])}
            return SecurePlan(client_ids, coef[0].tolist(), avg, new_state, diag)
        psi, theta, angles = fedadp_weights(
            gram, counts, client_ids, state.get("theta", {}), strategy.alpha
        )
        diag = {
            "weights": psi.tolist(),
            "conflict_share": conflict_share(cosine_from_gram(gram), strategy.tau),
            "angles": angles,
            "gram": {"path": "CountSketch estimate", "width": int(sketches.shape[1])},
        }
        coef = (strategy.server_lr * psi).tolist()
        return SecurePlan(client_ids, coef, avg, {**state, "theta": theta}, diag)
    if isinstance(strategy, FedDyn):
        return SecurePlan(client_ids, [1.0] * k, avg, state, {})  # FedDyn reads Σ_k Δ_k
    w = sample_weights(counts)
    coef = (strategy.server_lr * w).tolist()
    if isinstance(strategy, Scaffold):  # and (1/N) Σ_k (c_k⁺ − c_k) for its control variate
        control = control_weights(k, num_clients).tolist()
        return SecurePlan(client_ids, coef, avg, state, {"weights": w.tolist()}, control)
    if isinstance(strategy, FedAvg):
        diag = {"weights": w.tolist(), "conflict_share": None}
        return SecurePlan(client_ids, coef, avg, dict(state), diag)
    raise ValueError(f"{strategy.name} cannot run under secure aggregation")


def finish_round(
    strategy: Strategy,
    plan: SecurePlan,
    totals: SecureTotals,
    num_clients: int,
) -> Aggregation:
    """The strategy's update from the secure sums (`totals.update` is reused); a site that
    dropped out during phase 2 is missing from them (module docstring)."""
    if isinstance(strategy, WithServerOptimizer):
        result = finish_round(strategy.inner, plan, totals, num_clients)
        update, opt_state = strategy.optimizer.step(result.update, plan.optimizer_state or {})
        diagnostics = {**result.diagnostics, "server_step_norm": float(update.norm())}
        return Aggregation(update, {**result.state, OPT_STATE: opt_state}, diagnostics)
    if isinstance(strategy, FedDyn):  # the survivors' FedDyn: their sum, their count
        return strategy.step(totals.update, len(totals.kept), num_clients, plan.state)
    total, diagnostics = totals.update, dict(plan.diagnostics)
    scale = survivor_scale(plan, totals.kept)
    if scale != 1.0:
        total.mul_(scale)
        diagnostics["survivor_scale"] = scale
    if isinstance(strategy, Scaffold):
        result = strategy.step(total, totals.control, diagnostics.pop("weights"), plan.state)
        result.diagnostics.update(diagnostics)
        return result
    return Aggregation(total, plan.state, diagnostics)


def survivor_scale(plan: SecurePlan, kept: list[int]) -> float:
    """Σ_all c / Σ_kept c: what brings the survivors' share of the planned combination to the
    planned size (1 when every site is in the sum, or the survivors' coefficients sum to 0)."""
    if len(kept) == len(plan.client_ids):
        return 1.0
    kept_set = set(kept)
    c_kept = math.fsum(c for k, c in zip(plan.client_ids, plan.coef, strict=True) if k in kept_set)
    return math.fsum(plan.coef) / c_kept if c_kept != 0 else 1.0
