"""SimpleBaseline's heatmap loss."""

from __future__ import annotations

import torch
from torch import nn


class JointsMSELoss(nn.Module):
    """0.5 x mean squared error per joint, averaged over joints.

    With use_target_weight, prediction and target are both multiplied by the joint's weight, so
    unlabelled joints (weight 0) contribute nothing. Summing SimpleBaseline's per-joint
    MSELoss(mean) terms and dividing by J is the same as one mean over all elements.
    """

    def __init__(self, use_target_weight: bool = True):
        super().__init__()
        self.use_target_weight = use_target_weight

    def forward(
        self, output: torch.Tensor, target: torch.Tensor, target_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        n, j = output.shape[:2]
        pred = output.reshape(n, j, -1)
        gt = target.reshape(n, j, -1)
        if self.use_target_weight:
            if target_weight is None:
                raise ValueError("JointsMSELoss(use_target_weight=True) needs target_weight")
            w = target_weight.reshape(n, j, 1)
            pred, gt = pred * w, gt * w
        return 0.5 * torch.mean((pred - gt) ** 2)
