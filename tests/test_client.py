"""Client-side objectives: FedProx's proximal term and FedDyn's linear term act as defined."""

from __future__ import annotations

import torch
from fedtiny import tiny_config

from fedpose.engine.federation import build_federation
from fedpose.fl.client import dyn_grad_by_name, local_batches, local_train
from fedpose.fl.messages import TrainRequest


def _train(fed, cfg, weights, rule, state=None):
    coef = {"plain": 0.0, "prox": cfg.fed.prox_mu, "dyn": cfg.fed.dyn_alpha}[rule]
    request = TrainRequest(
        client_id=0, version=0, round=0, weights=weights, seed=3, rule=rule, coef=coef
    )
    dataset = fed.client_dataset(0)
    return local_train(
        fed.model,
        local_batches(dataset, request, cfg.fed, cfg.train.batch_size, cfg.data.workers),
        request,
        state or {},
        cfg.train,
        fed.layout,
        num_samples=len(dataset),
    )


def test_prox_term_pulls_towards_the_global_model(tmp_path, synth_dir):
    cfg = tiny_config(
        tmp_path,
        synth_dir,
        "fed.local_steps=4",
        "fed.prox_mu=1000",
        "train.optimizer=sgd",
        "train.lr=0.0005",
        "train.momentum=0",
    )
    fed = build_federation(cfg)
    w0 = fed.initial_weights()  # local_train trains fed.model in place: keep the start apart
    plain, _ = _train(fed, cfg, w0, "plain")
    prox, _ = _train(fed, cfg, w0, "prox")
    assert prox.delta.norm() < 0.8 * plain.delta.norm()


def test_dyn_linear_term_shifts_one_sgd_step_by_lr_times_g(tmp_path, synth_dir):
    lr = 0.01
    cfg = tiny_config(
        tmp_path,
        synth_dir,
        "fed.local_steps=1",
        "fed.dyn_alpha=0.5",
        "train.optimizer=sgd",
        f"train.lr={lr}",
        "train.momentum=0",
    )
    fed = build_federation(cfg)
    w0 = fed.initial_weights()
    plain, _ = _train(fed, cfg, w0, "plain")
    assert torch.equal(_train(fed, cfg, w0, "plain")[0].delta, plain.delta)  # deterministic
    g = {n: torch.full(fed.layout.shapes[n], 0.25) for n in fed.layout.agg_names}
    dyn, state = _train(fed, cfg, w0, "dyn", {"dyn_grad": g})
    # one step from w_t: the proximal part is zero, the linear part adds +lr * g to the update
    assert torch.allclose(
        dyn.delta - plain.delta, torch.full_like(plain.delta, lr * 0.25), atol=1e-6
    )
    # and the client's term follows g_k <- g_k - alpha * (w_k - w_t)
    first = fed.layout.agg_names[0]
    end = fed.layout.slices[0][2]
    expected = 0.25 - 0.5 * dyn.delta[:end].view(fed.layout.shapes[first])
    assert torch.allclose(dyn_grad_by_name(state, fed.layout)[first], expected)
