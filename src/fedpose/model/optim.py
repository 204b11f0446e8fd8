"""The optimizer named by the training config, for centralized and client training alike."""

from __future__ import annotations

import torch
from torch import nn

from fedpose.config import TrainConfig


def make_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    if train.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    if train.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=train.lr,
            momentum=train.momentum,
            weight_decay=train.weight_decay,
        )
    raise ValueError(f"unknown optimizer {train.optimizer!r}: use adam or sgd")
