"""Evaluating a model: predict every test record, score with the dataset's PCK. The one evaluator
of centralized training, federated runs and `fedpose eval`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fedpose.config import Config
from fedpose.data.records import PoseRecord, Skeleton
from fedpose.metrics.pck import pck_counts, score_counts
from fedpose.model.inference import predict_records


def evaluate_model(model: nn.Module, records: Sequence[PoseRecord], skeleton: Skeleton,
                   cfg: Config, device: torch.device) -> dict:
    """{"pck_mean", "pck_per_joint"} (what metrics.jsonl records) and "result" (the PCKResult)."""
    result = score_counts(*evaluate_counts(model, records, skeleton, cfg, device), skeleton)
    return {"pck_mean": result.mean, "pck_per_joint": result.per_joint, "result": result}


def evaluate_counts(model: nn.Module, records: Sequence[PoseRecord], skeleton: Skeleton,
                    cfg: Config, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Per-joint (correct, counted) counts of the model on the records. Counts of disjoint
    record sets (the sites of a federation) add up to the counts of their union."""
    if not records:
        zeros = np.zeros(skeleton.num_joints, dtype=np.int64)
        return zeros, zeros.copy()
    preds = predict_records(model, records, skeleton, cfg.data.input_size,
                            flip_test=cfg.train.flip_test, device=device)
    return pck_counts(preds, records, skeleton)
