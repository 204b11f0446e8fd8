"""Evaluating a model: predict every test record, score with the dataset's PCK. The one evaluator
of centralized training, federated runs and `fedpose eval`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedpose.config import Config
from fedpose.data.records import PoseRecord, Skeleton
from fedpose.metrics.pck import score
from fedpose.model.inference import predict_records


def evaluate_model(model: nn.Module, records: Sequence[PoseRecord], skeleton: Skeleton,
                   cfg: Config, device: torch.device) -> dict:
    """{"pck_mean", "pck_per_joint"} (what metrics.jsonl records) and "result" (the PCKResult)."""
    preds = predict_records(model, records, skeleton, cfg.data.input_size,
                            flip_test=cfg.train.flip_test, device=device)
    result = score(preds, records, skeleton)
    return {"pck_mean": result.mean, "pck_per_joint": result.per_joint, "result": result}
