"""Stand-in sites for the secure aggregation tests: seeded updates instead of training, so a
plain and a secure server loop can be fed the very same replies (tests/test_secure.py,
tests/test_flower_secure.py)."""

from __future__ import annotations

import torch
from torch import nn

from fedpose.config import Config, load_config
from fedpose.fl.messages import TrainReply, TrainRequest
from fedpose.fl.params import ModelLayout, model_layout
from fedpose.fl.server import FederatedServer
from fedpose.fl.strategies import build_strategy

NUM_CLIENTS = 4
ROUNDS = 2

# every averaging strategy secure aggregation runs, with the options that change its server step
AVERAGING = {
    "fedavg": ["fed.method=fedavg", "fed.server_lr=0.8"],
    "fedprox": ["fed.method=fedprox", "fed.prox_mu=0.1"],
    "feddyn": ["fed.method=feddyn", "fed.dyn_alpha=0.1"],
    "fedavgm": ["fed.method=fedavgm", "fed.server_momentum=0.9"],
    "fedadam": ["fed.method=fedadam", "fed.server_lr=0.1"],
    "fedyogi": ["fed.method=fedyogi", "fed.server_lr=0.1"],
    "fedprox+server_opt": ["fed.method=fedprox", "fed.server_opt=adagrad", "fed.server_lr=0.1"],
    "feddyn+server_opt": ["fed.method=feddyn", "fed.server_opt=adam", "fed.server_lr=0.1"],
    "scaffold": ["fed.method=scaffold"],
    "scaffold+server_opt": ["fed.method=scaffold", "fed.server_momentum=0.5"],
}


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))


def layout() -> ModelLayout:
    return model_layout(tiny_net())


def config(*overrides: str) -> Config:
    """Four clients, three of them a round, two synchronous rounds (the second reads the state
    the first left: FedDyn's h, SCAFFOLD's c, the optimiser's moments)."""
    return load_config(
        None,
        [
            f"fed.num_clients={NUM_CLIENTS}",
            "fed.clients_per_round=3",
            f"fed.rounds={ROUNDS}",
            "fed.local_steps=1",
            *overrides,
        ],
    )


class SeededSites:
    """The in-process Transport of sites whose update, BatchNorm statistics and (SCAFFOLD)
    control variate change are seeded by (round, client): what a site replies does not depend
    on the model it is sent, so every server loop that selects the same clients sees the same
    replies."""

    def __init__(self, layout: ModelLayout):
        self.layout = layout
        self.requests: dict[int, TrainRequest] = {}

    def send(self, request: TrainRequest) -> None:
        self.requests[request.client_id] = request

    def receive(self, client_id: int) -> TrainReply:
        request = self.requests.pop(client_id)
        return site_reply(request, self.layout)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def site_reply(request: TrainRequest, layout: ModelLayout) -> TrainReply:
    k, t = request.client_id, request.round
    gen = torch.Generator().manual_seed(1000 * t + k)
    p = layout.slices[-1][2]
    averaged = {}
    for name in layout.avg_names:
        sent = request.weights[name]
        if sent.is_floating_point():
            averaged[name] = sent + 0.05 * torch.randn(sent.shape, generator=gen)
        else:  # BatchNorm's batch counter
            averaged[name] = sent + 2
    control = 0.05 * torch.randn(p, generator=gen) if request.rule == "scaffold" else None
    return TrainReply(
        client_id=k,
        version=request.version,
        num_samples=10 + 7 * k,
        delta=0.02 * torch.randn(p, generator=gen) + 0.01 * (k - 1.5),
        averaged=averaged,
        train_loss=1.0 + k,
        train_loss_sq=(1.0 + k) ** 2,
        steps=2,
        control_delta=control,
    )


def server(cfg: Config, transport) -> FederatedServer:
    """The server loop over `transport` for the tiny net, as the engines build it."""
    net = tiny_net()
    layout = model_layout(net)
    weights = {n: t.clone() for n, t in net.state_dict().items()}
    return FederatedServer(
        cfg.fed,
        cfg.system,
        weights,
        layout,
        build_strategy(cfg.fed, cfg.seed),
        transport,
        [10 + 7 * k for k in range(cfg.fed.num_clients)],
        seed=cfg.seed,
    )
