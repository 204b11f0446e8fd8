"""Local training on one client: the same code under every transport.

The training request says which objective the client minimises (the strategy's client rule and
its coefficient, as Flower's FedProx sends its mu): plain (FedAvg, FedBN, FedAW, FedGH), prox
(FedProx: + μ/2 ‖w − w_t‖²), dyn (FedDyn: − ⟨g_k, w⟩ + α/2 ‖w − w_t‖², with g_k the client's
running linear term) or scaffold (SCAFFOLD: gradients corrected by c − c_k). Client state
(FedBN's BatchNorm tensors, FedDyn's g_k, SCAFFOLD's c_k) stays with the client.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from fedpose.config import FedConfig, TrainConfig
from fedpose.data.dataset import PoseDataset, make_loader
from fedpose.fl.messages import CLIENT_RULES, TrainReply, TrainRequest
from fedpose.fl.params import ModelLayout, flatten
from fedpose.model.inference import load_weights, move_to
from fedpose.model.optim import make_optimizer
from fedpose.model.train_step import TrainStep

DYN_GRAD_FLAT = "flat"  # client_state["dyn_grad"][DYN_GRAD_FLAT]: g_k over layout.agg_names
SCAFFOLD_KEY, SCAFFOLD_FLAT = "scaffold", "flat"  # client_state["scaffold"]["flat"]: c_k


def local_batches(
    dataset: PoseDataset,
    request: TrainRequest,
    fed: FedConfig,
    batch_size: int,
    workers: int = 0,
) -> Iterator[dict]:
    """The batches of one round of local work: `fed.local_steps` batches when set (across local
    epochs as needed), else `fed.local_epochs` epochs, of `batch_size` (train.batch_size) records
    loaded by `workers` processes (data.workers). Shuffled by the request's seed, augmented by the
    global round, so a client's work is a function of the request alone."""
    max_steps = fed.local_steps if fed.local_steps > 0 else None
    steps, epoch = 0, 0
    while True:
        dataset.set_epoch(request.round * max(fed.local_epochs, 1) + epoch)
        loader = make_loader(
            dataset,
            batch_size,
            shuffle=True,
            seed=request.seed,
            epoch=epoch,
            workers=workers,
            # a trailing batch of one breaks BatchNorm in training mode
            drop_last=len(dataset) % batch_size == 1 and len(dataset) > 1,
        )
        for batch in loader:
            yield batch
            steps += 1
            if max_steps is not None and steps >= max_steps:
                return
        epoch += 1
        if (max_steps is None and epoch >= fed.local_epochs) or steps == 0:
            return  # done, or an empty loader that would loop forever


def local_train(
    model: nn.Module,
    batches: Iterable[dict],
    request: TrainRequest,
    client_state: dict,
    train: TrainConfig,
    layout: ModelLayout,
    device: torch.device | str = "cpu",
    *,
    num_samples: int,
    update_out: torch.Tensor | None = None,
) -> tuple[TrainReply, dict]:
    """Train from the request's weights on `batches` (see local_batches) with the objective the
    request names; return the update and the client's new state. num_samples: the client's
    dataset size, the weight of its update. update_out: a (P,) float32 tensor the update is
    written into (the in-process transport gives a row of the round's update matrix)."""
    if request.rule not in CLIENT_RULES:
        raise ValueError(f"unknown client rule {request.rule!r}: use {', '.join(CLIENT_RULES)}")
    started = time.perf_counter()
    reply, new_state = _train(
        model, batches, request, client_state, train, layout, device, num_samples, update_out
    )
    # the clock stops once the training's own objects (the optimizer and its per-parameter
    # buffers, the step's dictionaries) are released, as it ran while they were made
    reply.seconds = time.perf_counter() - started
    return reply, new_state


def _train(
    model: nn.Module,
    batches: Iterable[dict],
    request: TrainRequest,
    client_state: dict,
    train: TrainConfig,
    layout: ModelLayout,
    device: torch.device | str,
    num_samples: int,
    update_out: torch.Tensor | None,
) -> tuple[TrainReply, dict]:
    state = dict(request.weights)  # load_weights copies: the request's tensors stay as sent
    if layout.local_names and "local" in client_state:
        state.update(client_state["local"])
    load_weights(model, state)
    move_to(model, device).train()
    params = dict(model.named_parameters())
    base = {n: state[n].to(device) for n in layout.agg_names}
    dyn_grad = dyn_grad_by_name(client_state, layout) if request.rule == "dyn" else None
    if dyn_grad is not None:
        dyn_grad = {n: g.to(device) for n, g in dyn_grad.items()}
    scaffold = (
        ScaffoldCorrection(client_state, request, layout, device)
        if request.rule == "scaffold"
        else None
    )

    def regularize() -> None:
        if scaffold is not None:
            scaffold(params)
        else:
            _add_regularizer_grads(params, base, dyn_grad, layout, request.coef)

    step = TrainStep(
        model,
        make_optimizer(model, train),
        device,
        amp=train.amp,
        channels_last=train.channels_last,
        compile=train.compile,
        after_backward=regularize if request.rule != "plain" else None,
        threads=train.threads,
    )
    # losses stay on the device until the end: no wait for the GPU after every step
    losses = [float(loss) for loss in [step(batch) for batch in batches]]

    trained = {n: t.detach().cpu() for n, t in model.state_dict().items()}
    delta = torch.sub(
        flatten(trained, layout.agg_names),
        flatten(request.weights, layout.agg_names),
        out=update_out,
    )
    new_state = _next_client_state(client_state, trained, delta, request, layout)
    control_delta = None
    if scaffold is not None:
        new_state[SCAFFOLD_KEY], control_delta = scaffold.finish()
    reply = TrainReply(
        client_id=request.client_id,
        version=request.version,
        num_samples=num_samples,
        delta=delta,
        # clones: on the CPU .cpu() aliases the model's buffers, which the next client overwrites
        averaged={n: trained[n].clone() for n in layout.avg_names},
        train_loss=float(np.mean(losses)) if losses else math.nan,
        train_loss_sq=float(np.mean(np.square(losses))) if losses else math.nan,
        steps=len(losses),
        control_delta=control_delta,
    )
    return reply, new_state


class ScaffoldCorrection:
    """SCAFFOLD's client side (Karimireddy et al. 2020): every local step uses the corrected
    gradient g − c_k + c, and afterwards the client's control variate becomes

        c_k⁺ = (1/K) Σ_{i<K} g_i,   the mean of the K raw minibatch gradients of this round.

    With plain SGD at learning rate η_l that is exactly option II, c_k⁺ = c_k − c +
    (w_t − w_k)/(K η_l): the K corrected steps move w by −η_l Σ (g_i − c_k + c). Written as the
    mean gradient it stays in gradient units under Adam, where (w_t − w_k)/(K η_l) does not.
    c_k starts at 0 and is client state (`client_state["scaffold"]["flat"]`), kept like
    FedDyn's."""

    def __init__(
        self, client_state: dict, request: TrainRequest, layout: ModelLayout, device
    ) -> None:
        size = layout.slices[-1][2] if layout.slices else 0
        stored = client_state.get(SCAFFOLD_KEY, {}).get(SCAFFOLD_FLAT)
        self.c_k = stored.to(torch.float32) if stored is not None else torch.zeros(size)
        c = request.control if request.control is not None else torch.zeros(size)
        correction = (c - self.c_k).to(device)  # − c_k + c, added to every step's gradient
        self.grad_sum = torch.zeros(size, dtype=torch.float32, device=device)
        self.layout = layout
        self.correction = {n: correction[a:b].view(layout.shapes[n]) for n, a, b in layout.slices}
        self.sums = {n: self.grad_sum[a:b].view(layout.shapes[n]) for n, a, b in layout.slices}
        self.steps = 0

    @torch.no_grad()
    def __call__(self, params: dict) -> None:
        for name in self.layout.agg_names:
            p = params[name]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self.sums[name].add_(p.grad)
            p.grad.add_(self.correction[name])
        self.steps += 1

    def finish(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(the client's new state entry {flat: c_k⁺}, c_k⁺ − c_k for the server)."""
        if self.steps == 0:  # no local step: nothing learnt about the client's gradient
            return {SCAFFOLD_FLAT: self.c_k}, torch.zeros_like(self.c_k)
        new = (self.grad_sum / self.steps).cpu()
        return {SCAFFOLD_FLAT: new}, new - self.c_k


def dyn_grad_by_name(client_state: dict, layout: ModelLayout) -> dict[str, torch.Tensor] | None:
    """FedDyn's g_k per aggregated tensor (views of the flat vector the client keeps), or None
    before the client's first FedDyn round."""
    flat = _dyn_grad_flat(client_state, layout)
    if flat is None:
        return None
    return {name: flat[start:end].view(layout.shapes[name]) for name, start, end in layout.slices}


def _dyn_grad_flat(client_state: dict, layout: ModelLayout) -> torch.Tensor | None:
    stored = client_state.get("dyn_grad")
    if not stored:
        return None
    flat = stored.get(DYN_GRAD_FLAT)
    if flat is None:  # kept per tensor, as older checkpoints hold it
        flat = flatten(stored, layout.agg_names)
    return flat


def _next_client_state(
    client_state: dict,
    trained: dict[str, torch.Tensor],
    delta: torch.Tensor,
    request: TrainRequest,
    layout: ModelLayout,
) -> dict:
    new_state = dict(client_state)
    if layout.local_names:
        new_state["local"] = {n: trained[n].clone() for n in layout.local_names}
    if request.rule == "dyn":
        # FedDyn's first-order condition: g_k <- g_k - α (w_k - w_t), kept as one flat vector
        # (one tensor to store per client, not one per layer)
        prev = _dyn_grad_flat(client_state, layout)
        if prev is None:
            prev = torch.zeros_like(delta)
        new_state["dyn_grad"] = {DYN_GRAD_FLAT: prev - request.coef * delta}
    return new_state


@torch.no_grad()
def _add_regularizer_grads(
    params: dict, base: dict, linear: dict | None, layout: ModelLayout, coef: float
) -> None:
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
