"""One optimisation step of the heatmap model, shared by every caller that trains: centralized
training, in-process federated clients and the Flower ClientApp.

On CUDA the step runs the forward pass under bf16 autocast, in channels_last memory format and,
on request, through `torch.compile`; the loss is always computed in float32. On the CPU it is the
plain float32 step (channels_last only when asked for). Batches may carry uint8 images, which
are normalised on the device (a quarter of the bytes to copy).

CPU threads: two busy processes with two threads each on two cores run 5-10x slower than one,
so `cpu_threads` never gives a process more than its share of the cores.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

import torch
from torch import nn

from fedpose.data.dataset import normalize_images
from fedpose.model.loss import JointsMSELoss

_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_threads(requested: int = 0, processes: int = 1) -> int:
    """Intra-op threads for one of `processes` busy processes.

    requested > 0: that many, but never more than the cores. requested = 0 (auto): the cores
    divided among the processes, and never more than torch would use by itself (so
    OMP_NUM_THREADS and an explicit `torch.set_num_threads` still lower it).
    """
    cores = available_cores()
    if requested > 0:
        return min(requested, cores)
    return max(1, min(torch.get_num_threads(), cores // max(processes, 1)))


def set_cpu_threads(requested: int = 0, processes: int = 1) -> int:
    """Apply `cpu_threads` to this process; returns the thread count now in use."""
    threads = cpu_threads(requested, processes)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads


class TrainStep:
    """`step(batch)` trains `model` on one batch and returns the (detached, float32) loss.

    after_backward() runs between backward and the optimiser step: the federated client adds
    its closed-form regulariser gradients there. The returned loss is a tensor on the device, so
    a caller that does not print it every step never waits for the GPU.
    threads (train.threads) on the CPU: applied with `set_cpu_threads(threads, processes)`,
    processes being how many busy processes share the cores; None leaves the threads alone.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device | str = "cpu",
        amp: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        after_backward: Callable[[], None] | None = None,
        threads: int | None = None,
        processes: int = 1,
    ):
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        if threads is not None and not on_cuda:
            set_cpu_threads(threads, processes)
        self.model = model
        self.optimizer = optimizer
        self.amp = amp and on_cuda
        self.channels_last = channels_last
        self.after_backward = after_backward
        self.criterion = JointsMSELoss(use_target_weight=True)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.forward = _compiled_forward(model) if compile and on_cuda else model

    def images(self, batch: dict) -> torch.Tensor:
        images = batch["image"].to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = normalize_images(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def __call__(self, batch: dict) -> torch.Tensor:
        images = self.images(batch)
        target = batch["target"].to(self.device, non_blocking=True)
        weight = batch["target_weight"].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.forward(images)
        loss = self.criterion(out.float(), target, weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.after_backward is not None:
            self.after_backward()
        self.optimizer.step()
        return loss.detach()


def _compiled_forward(model: nn.Module) -> Callable:
    """One compiled wrapper per model, so clients that reuse the model reuse its compilation."""
    compiled = _compiled.get(model)
    if compiled is None:
        compiled = torch.compile(model)
        _compiled[model] = compiled
    return compiled
