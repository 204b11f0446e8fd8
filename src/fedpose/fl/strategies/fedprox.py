"""FedProx (Li et al. 2020): clients add (μ/2)‖w − w_t‖² to their loss; the server is FedAvg."""

from __future__ import annotations

from fedpose.config import FedConfig
from fedpose.fl.strategies.base import Strategy
from fedpose.fl.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    name = "fedprox"
    client_rule = "prox"

    def __init__(self, mu: float = 0.01, server_lr: float = 1.0):
        super().__init__(server_lr)
        self.mu = mu

    @classmethod
    def from_config(cls, fed: FedConfig, _seed: int) -> Strategy:
        return cls(mu=fed.prox_mu, server_lr=fed.server_lr)

    @property
    def client_coef(self) -> float:
        return self.mu
