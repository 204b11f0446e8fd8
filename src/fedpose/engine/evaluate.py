"""Evaluating a model: predict every test record (model/inference.py), score with the dataset's
PCK (metrics/). The one evaluator of centralized training, federated runs and `fedpose eval`; it
sits above model/ and metrics/, which know nothing of each other."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from fedpose.data.records import PoseRecord, Skeleton
from fedpose.metrics.heatmap import heatmap_hits
from fedpose.metrics.pck import pck_counts, score_counts
from fedpose.model.inference import predict_records


def evaluate_model(
    model: nn.Module,
    records: Sequence[PoseRecord],
    skeleton: Skeleton,
    device: torch.device,
    *,
    input_size: int,
    flip_test: bool,
) -> dict:
    """{"pck_mean", "pck_per_joint", "heatmap_acc"} (what metrics.jsonl records), "result" (the
    PCKResult), "preds" (N, J, 2) and "confidence" (N, J), the heatmap peaks (for COCO keypoint
    AP).

    heatmap_acc: SimpleBaseline's heatmap accuracy in %, the mean over joints of the share of
    visible joints whose predicted heatmap peak lies within a twentieth of the heatmap side of
    the target's (metrics/heatmap.py), on the same (flip-tested) heatmaps as the predictions.
    """
    hits = np.zeros((2, skeleton.num_joints), dtype=np.int64)

    def count(heatmaps: torch.Tensor, batch: dict) -> None:
        h, c = heatmap_hits(heatmaps, batch["target"], mask=batch["target_weight"][..., 0])
        hits[0] += h
        hits[1] += c

    preds, confidence = predict_with_confidence(
        model, records, skeleton, device, count, input_size=input_size, flip_test=flip_test
    )
    result = score_counts(*pck_counts(preds, records, skeleton), skeleton)
    counted = hits[1] > 0
    per_joint = hits[0][counted] / hits[1][counted]
    heatmap_acc = float(per_joint.mean() * 100) if counted.any() else 0.0
    return {
        "pck_mean": result.mean,
        "pck_per_joint": result.per_joint,
        "heatmap_acc": heatmap_acc,
        "result": result,
        "preds": preds,
        "confidence": confidence,
    }


def evaluate_counts(
    model: nn.Module,
    records: Sequence[PoseRecord],
    skeleton: Skeleton,
    device: torch.device,
    *,
    input_size: int,
    flip_test: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-joint (correct, counted) counts of the model on the records. Counts of disjoint
    record sets (the sites of a federation) add up to the counts of their union."""
    preds, _ = predict_with_confidence(
        model, records, skeleton, device, input_size=input_size, flip_test=flip_test
    )
    return pck_counts(preds, records, skeleton)


def predict_with_confidence(
    model: nn.Module,
    records: Sequence[PoseRecord],
    skeleton: Skeleton,
    device: torch.device,
    on_heatmaps: Callable[[torch.Tensor, dict], None] | None = None,
    *,
    input_size: int,
    flip_test: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Predictions (N, J, 2) in image pixels and each joint's heatmap peak (N, J), at that
    input size (data.input_size), flip-tested or not (train.flip_test); `on_heatmaps` as in
    `predict_records`."""
    confidence = np.zeros((len(records), skeleton.num_joints))
    if not records:
        return np.zeros((0, skeleton.num_joints, 2)), confidence
    preds = predict_records(
        model,
        records,
        skeleton,
        input_size,
        flip_test=flip_test,
        device=device,
        confidence=confidence,
        on_heatmaps=on_heatmaps,
    )
    return preds, confidence
