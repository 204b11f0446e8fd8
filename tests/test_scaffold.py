"""SCAFFOLD against a closed-form reference on quadratics: the client's corrected steps and
control variates (option II), the server's averages, and the fixed point FedAvg misses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedpose.fl.client import SCAFFOLD_FLAT, SCAFFOLD_KEY, ScaffoldCorrection
from fedpose.fl.messages import TrainRequest
from fedpose.fl.params import model_layout
from fedpose.fl.strategies import FedAvg, Scaffold
from fedpose.fl.strategies.base import RoundInput

DIM, CLIENTS, STEPS, LR = 3, 4, 5, 0.05


def _problems() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Client k's loss ½‖A_k w − b_k‖²: different curvatures and optima (non-IID)."""
    rng = np.random.default_rng(0)
    a = [np.diag(rng.uniform(0.5, 3.0, DIM)) + 0.3 * rng.normal(size=(DIM, DIM)) for _ in range(4)]
    b = [rng.normal(scale=2.0, size=DIM) for _ in range(CLIENTS)]
    return a, b


class _Point(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(DIM, dtype=torch.float32))


def _client_round(
    model, layout, a, b, w, control, state
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """What local_train does with rule "scaffold": K plain-SGD steps from w, the correction
    applied between backward and the optimiser step."""
    with torch.no_grad():
        model.w.copy_(w)
    request = TrainRequest(0, 0, 0, {}, 0, rule="scaffold", control=control)
    correction = ScaffoldCorrection(state, request, layout, "cpu")
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    at, bt = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    for _ in range(STEPS):
        opt.zero_grad()
        loss = 0.5 * ((at @ model.w - bt) ** 2).sum()
        loss.backward()
        correction(params)
        opt.step()
    entry, control_delta = correction.finish()
    return model.w.detach().clone() - w, control_delta, {SCAFFOLD_KEY: entry}


def _reference(a, b, rounds: int, sampled: list[list[int]]) -> list[np.ndarray]:
    """SCAFFOLD exactly as Karimireddy et al. 2020 write it (Algorithm 1, option II, η_g = 1),
    in float64: the model after every round."""
    x, c = np.zeros(DIM), np.zeros(DIM)
    ck = [np.zeros(DIM) for _ in range(CLIENTS)]
    out = []
    for r in range(rounds):
        dy, dc = [], []
        for k in sampled[r]:
            y = x.copy()
            for _ in range(STEPS):
                y = y - LR * (a[k].T @ (a[k] @ y - b[k]) - ck[k] + c)
            new = ck[k] - c + (x - y) / (STEPS * LR)
            dy.append(y - x)
            dc.append(new - ck[k])
            ck[k] = new
        x = x + np.mean(dy, axis=0)
        c = c + len(sampled[r]) / CLIENTS * np.mean(dc, axis=0)
        out.append(x.copy())
    return out


def _run(strategy, a, b, rounds: int, sampled: list[list[int]]) -> list[torch.Tensor]:
    model = _Point()
    layout = model_layout(model)
    w = torch.zeros(DIM)
    server_state: dict = strategy.initial_state()
    client_states: dict[int, dict] = {}
    out = []
    for r in range(rounds):
        deltas, controls = [], []
        for k in sampled[r]:
            delta, dc, client_states[k] = _client_round(
                model,
                layout,
                a[k],
                b[k],
                w,
                strategy.client_control(server_state),
                client_states.get(k, {}),
            )
            deltas.append(delta)
            controls.append(dc)
        inputs = RoundInput(
            deltas=torch.stack(deltas),
            counts=torch.ones(len(deltas), dtype=torch.float64),  # equal n_k: the paper's mean
            client_ids=sampled[r],
            num_clients=CLIENTS,
            slices=layout.slices,
            controls=torch.stack(controls) if strategy.client_rule == "scaffold" else None,
        )
        result = strategy.aggregate(inputs, server_state)
        server_state = result.state
        w = w + result.update
        out.append(w.clone())
    return out


def test_scaffold_follows_algorithm_1_with_partial_participation():
    a, b = _problems()
    rng = np.random.default_rng(1)
    rounds = 12
    sampled = [sorted(int(k) for k in rng.choice(CLIENTS, 2, replace=False)) for _ in range(rounds)]
    ours = _run(Scaffold(), a, b, rounds, sampled)
    ref = _reference(a, b, rounds, sampled)
    for r, (x_ours, x_ref) in enumerate(zip(ours, ref, strict=True)):
        np.testing.assert_allclose(
            x_ours.numpy(), x_ref, rtol=1e-4, atol=1e-5, err_msg=f"round {r}"
        )


@pytest.mark.slow  # seconds of work: make test-slow
def test_scaffold_reaches_the_global_optimum_that_fedavg_misses():
    a, b = _problems()
    optimum = np.linalg.solve(
        sum(x.T @ x for x in a), sum(x.T @ y for x, y in zip(a, b, strict=True))
    )
    everyone = [list(range(CLIENTS))] * 300
    scaffold = _run(Scaffold(), a, b, 300, everyone)[-1].numpy()
    fedavg = _run(FedAvg(), a, b, 300, everyone)[-1].numpy()
    # FedAvg with several local steps settles where the clients' drifts balance, not at the
    # optimum of the sum; SCAFFOLD's control variates remove the drift
    assert np.linalg.norm(scaffold - optimum) < 1e-3
    assert np.linalg.norm(fedavg - optimum) > 100 * np.linalg.norm(scaffold - optimum)


def test_control_variate_is_option_two_under_sgd():
    # c_k⁺ as the mean raw gradient equals c_k − c + (w_t − w_k)/(K η_l) for plain SGD
    a, b = _problems()
    model = _Point()
    layout = model_layout(model)
    w = torch.tensor([0.5, -1.0, 2.0])
    c = torch.tensor([0.1, 0.2, -0.3])
    state = {SCAFFOLD_KEY: {SCAFFOLD_FLAT: torch.tensor([-0.2, 0.0, 0.4])}}
    delta, dc, new_state = _client_round(model, layout, a[0], b[0], w, c, state)
    c_k = state[SCAFFOLD_KEY][SCAFFOLD_FLAT]
    option2 = c_k - c - delta / (STEPS * LR)
    torch.testing.assert_close(
        new_state[SCAFFOLD_KEY][SCAFFOLD_FLAT], option2, rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(dc, option2 - c_k, rtol=1e-4, atol=1e-5)
