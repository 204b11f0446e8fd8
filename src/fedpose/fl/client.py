"""Local training on one client: the same code under every transport.

The client rule comes from the strategy: plain (FedAvg, FedBN, FedAW, FedGH), prox (FedProx:
+ μ/2 ‖w − w_t‖²) or dyn (FedDyn: − ⟨g_k, w⟩ + α/2 ‖w − w_t‖², with g_k the client's running
linear term). Client state (FedBN's BatchNorm tensors, FedDyn's g_k) stays with the client.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from fedpose.config import Config
from fedpose.data.dataset import PoseDataset, make_loader
from fedpose.fl.messages import TrainReply, TrainRequest
from fedpose.fl.params import ModelLayout, flatten
from fedpose.model.loss import JointsMSELoss


def client_seed(seed: int, round_: int, client_id: int) -> int:
    """A seed per (run seed, round, client): reproducible without carrying RNG state."""
    return int(np.random.SeedSequence([seed, round_, client_id]).generate_state(1)[0])


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay
        )
    raise ValueError(f"unknown optimizer {t.optimizer!r}: use adam or sgd")


def local_train(
    model: nn.Module,
    dataset: PoseDataset,
    request: TrainRequest,
    client_state: dict,
    cfg: Config,
    rule: str,
    layout: ModelLayout,
    device: torch.device | str = "cpu",
) -> tuple[TrainReply, dict]:
    """Train from the request's weights; return the update and the client's new state."""
    started = time.perf_counter()
    state = {n: t.clone() for n, t in request.weights.items()}
    if layout.local_names and "local" in client_state:
        state.update(client_state["local"])
    model.load_state_dict(state)
    model.to(device).train()
    params = dict(model.named_parameters())
    base = {n: state[n].to(device) for n in layout.agg_names}
    dyn_grad = client_state.get("dyn_grad") if rule == "dyn" else None
    if dyn_grad is not None:
        dyn_grad = {n: g.to(device) for n, g in dyn_grad.items()}

    optimizer = make_optimizer(model, cfg)
    criterion = JointsMSELoss(use_target_weight=True)
    fed = cfg.fed
    losses: list[float] = []
    steps = 0
    max_steps = fed.local_steps if fed.local_steps > 0 else None
    epoch = 0
    while True:
        dataset.set_epoch(request.round * max(fed.local_epochs, 1) + epoch)
        loader = make_loader(
            dataset, cfg.train.batch_size, shuffle=True, seed=request.seed, epoch=epoch,
            workers=cfg.data.workers,
            # a trailing batch of one breaks BatchNorm in training mode
            drop_last=len(dataset) % cfg.train.batch_size == 1 and len(dataset) > 1,
        )
        for batch in loader:
            images = batch["image"].to(device)
            loss = criterion(model(images), batch["target"].to(device),
                             batch["target_weight"].to(device))
            losses.append(float(loss.detach()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if rule in ("prox", "dyn"):
                _add_regularizer_grads(params, base, dyn_grad, layout,
                                       fed.prox_mu if rule == "prox" else fed.dyn_alpha)
            optimizer.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        epoch += 1
        if max_steps is not None and steps >= max_steps:
            break
        if max_steps is None and epoch >= fed.local_epochs:
            break
        if steps == 0:  # an empty loader would loop forever
            break

    trained = {n: t.detach().cpu() for n, t in model.state_dict().items()}
    delta = flatten(trained, layout.agg_names) - flatten(request.weights, layout.agg_names)
    new_state = dict(client_state)
    if layout.local_names:
        new_state["local"] = {n: trained[n].clone() for n in layout.local_names}
    if rule == "dyn":
        # FedDyn's first-order condition: g_k <- g_k - α (w_k - w_t)
        old = client_state.get("dyn_grad")
        new_grad = {}
        for name, start, end in layout.slices:
            d = delta[start:end].view(layout.shapes[name])
            prev = old[name] if old is not None else torch.zeros_like(d)
            new_grad[name] = prev - fed.dyn_alpha * d
        new_state["dyn_grad"] = new_grad
    reply = TrainReply(
        client_id=request.client_id,
        version=request.version,
        num_samples=len(dataset),
        delta=delta,
        # clones: on the CPU .cpu() aliases the model's buffers, which the next client overwrites
        averaged={n: trained[n].clone() for n in layout.avg_names},
        train_loss=float(np.mean(losses)) if losses else math.nan,
        steps=steps,
        seconds=time.perf_counter() - started,
    )
    return reply, new_state


@torch.no_grad()
def _add_regularizer_grads(params: dict, base: dict, linear: dict | None, layout: ModelLayout,
                           coef: float) -> None:
    """Add the gradient of coef/2 ‖w − w_t‖² (− ⟨g_k, w⟩ for FedDyn) to each parameter's grad.

    Adding the closed-form gradient after backward() is the same optimisation as putting the
    terms in the loss, without building a graph over every parameter at every step.
    """
    for name in layout.agg_names:
        p = params[name]
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.add_(p - base[name], alpha=coef)
        if linear is not None:
            p.grad.sub_(linear[name])
