"""Server optimisers (FedOpt, Reddi et al. ICLR 2021; FedAvgM, Hsu et al. 2019), applied to the
aggregate update of any strategy.

A strategy turns the round's client updates into one aggregate Δ (FedAvg's weighted mean, FedGH's
harmonised sum, FedDyn's corrected mean, ...). Without a server optimiser the server adds η Δ
(η = `fed.server_lr`), which the strategy does itself. With one, the strategy runs at η = 1 and
its Δ goes through one optimiser step, so FedGH + Adam or PCGrad + momentum is a configuration:

    sgd      m ← β m + Δ                                  w ← w + η m        (FedAvgM; β = 0: SGD)
    adam     m ← β₁ m + (1 − β₁) Δ,  v ← β₂ v + (1 − β₂) Δ²       w ← w + η̂_t m / (√v + τ)
    yogi     m as adam,  v ← v − (1 − β₂) Δ² sign(v − Δ²)          w ← w + η m / (√v + τ)
    adagrad  m as adam,  v ← v + Δ²                               w ← w + η m / (√v + τ)

m and v start at 0. Adam's step is bias-corrected as Flower 1.42's FedAdam does it,
η̂_t = η √(1 − β₂^(t+1)) / (1 − β₁^(t+1)) for the t-th server step (t = 1, 2, ...); Yogi and
Adagrad are not corrected (Flower's FedYogi and FedAdagrad). The arithmetic is Flower's, checked
against its strategy classes in tests/test_server_opt.py. The optimiser sees the trainable
floating-point tensors only; BatchNorm running statistics are averaged as always.

The optimiser's state (m, v and the step count t) lives in the strategy state under
`server_opt`, so it goes into every checkpoint (safetensors) and a resumed run continues it.
Every operation is elementwise and rounded once (no fused multiply-add): the same bits on every
machine.
"""

from __future__ import annotations

import math

import torch

from fedpose.config import SERVER_OPT_METHODS, SERVER_OPTS, FedConfig
from fedpose.fl.strategies.base import Aggregation, RoundInput, Strategy

STATE_KEY = "server_opt"


def resolved_server_opt(fed: FedConfig) -> str:
    """The optimiser a config asks for: the method's own (fedadam, ...) or `fed.server_opt`."""
    return SERVER_OPT_METHODS.get(fed.method.strip().lower(), fed.server_opt)


def uses_server_opt(fed: FedConfig) -> bool:
    """False for plain SGD without momentum: the strategy then applies `fed.server_lr` itself,
    exactly as without this module."""
    name = fed.method.strip().lower()
    return name in SERVER_OPT_METHODS or fed.server_opt != "sgd" or fed.server_momentum > 0


class ServerOptimizer:
    """One optimiser step on the aggregate update; state is a dict of tensors and ints."""

    def __init__(
        self,
        kind: str = "sgd",
        lr: float = 1.0,
        momentum: float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ):
        if kind not in SERVER_OPTS:
            raise ValueError(f"unknown server optimiser {kind!r}; use {', '.join(SERVER_OPTS)}")
        self.kind = kind
        self.lr = lr
        self.momentum = momentum
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau

    def step(self, delta: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """(the update to add to the weights, the new state); `delta` is not modified."""
        t = int(state.get("t", 0)) + 1
        m = state.get("m")
        if self.kind == "sgd":
            # Flower's FedAvgM: the first momentum is the first update itself (β · 0 + Δ)
            m = delta.clone() if m is None else m * self.momentum + delta
            return m * self.lr, {"t": t, "m": m}
        m = torch.zeros_like(delta) if m is None else m
        m = m * self.beta1 + delta * (1.0 - self.beta1)
        v = state.get("v")
        v = torch.zeros_like(delta) if v is None else v
        sq = delta * delta
        if self.kind == "adam":
            v = v * self.beta2 + sq * (1.0 - self.beta2)
            lr = self.lr * math.sqrt(1.0 - self.beta2 ** (t + 1)) / (1.0 - self.beta1 ** (t + 1))
        elif self.kind == "yogi":
            v = v - sq * (1.0 - self.beta2) * torch.sign(v - sq)
            lr = self.lr
        else:  # adagrad
            v = v + sq
            lr = self.lr
        update = m * lr / (torch.sqrt(v) + self.tau)
        return update, {"t": t, "m": m, "v": v}


class WithServerOptimizer(Strategy):
    """`inner` (built with η = 1) followed by a server optimiser step on its update. It behaves
    as `inner` towards clients (same client rule, coefficient, local BatchNorm)."""

    def __init__(self, inner: Strategy, optimizer: ServerOptimizer, name: str | None = None):
        self.inner = inner
        self.optimizer = optimizer
        self.name = name or f"{inner.name}+{optimizer.kind}"
        self.client_rule = inner.client_rule
        self.client_coef = inner.client_coef
        self.keep_bn_local = inner.keep_bn_local

    def initial_state(self) -> dict:
        return self.inner.initial_state()

    def client_control(self, state: dict) -> torch.Tensor | None:
        return self.inner.client_control(state)

    def aggregate(self, inputs: RoundInput, state: dict) -> Aggregation:
        inner_state = {k: v for k, v in state.items() if k != STATE_KEY}
        result = self.inner.aggregate(inputs, inner_state)
        update, opt_state = self.optimizer.step(result.update, state.get(STATE_KEY, {}))
        diagnostics = dict(result.diagnostics)
        diagnostics["server_step_norm"] = float(update.norm())
        return Aggregation(update, {**result.state, STATE_KEY: opt_state}, diagnostics)


def with_server_optimizer(strategy: Strategy, fed: FedConfig) -> Strategy:
    """`strategy` as configured, wrapped in the server optimiser `fed` asks for (if any).

    The inner strategy's own server lr is set to 1: the optimiser applies `fed.server_lr`."""
    if not uses_server_opt(fed):
        return strategy
    if hasattr(strategy, "server_lr"):
        strategy.server_lr = 1.0
    optimizer = ServerOptimizer(
        resolved_server_opt(fed),
        lr=fed.server_lr,
        momentum=fed.server_momentum,
        beta1=fed.server_beta1,
        beta2=fed.server_beta2,
        tau=fed.server_tau,
    )
    method = fed.method.strip().lower()
    return WithServerOptimizer(
        strategy, optimizer, name=method if method in SERVER_OPT_METHODS else None
    )


__all__ = [
    "SERVER_OPTS",
    "SERVER_OPT_METHODS",
    "ServerOptimizer",
    "WithServerOptimizer",
    "resolved_server_opt",
    "uses_server_opt",
    "with_server_optimizer",
]
