"""Predict joint positions for records, in original-image pixels; put weights and the model where
they belong, cheaply enough for a client that does it every round."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from fedpose.data.dataset import PoseDataset
from fedpose.data.records import PoseRecord, Skeleton
from fedpose.model.decode import get_max_preds, heatmaps_to_image_coords, predict


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """model.load_state_dict(weights) (strict) in one flat loop of copies: the same copies into
    the same tensors, without load_state_dict's walk through every module, which for a small
    model costs ten times the copying. Any mismatch of names or shapes goes to load_state_dict,
    which raises its usual error."""
    own = model.state_dict()
    if own.keys() != weights.keys() or any(own[name].shape != weights[name].shape for name in own):
        model.load_state_dict(weights)
        return
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(weights[name])


def move_to(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """model.to(device), skipped when the model is there already: `.to` walks every module and
    tensor even when nothing moves, a cost a small client model pays every round."""
    first = next(model.parameters(), None)
    if first is None or first.device != torch.device(device):
        model.to(device)
    return model


def predict_records(
    model: torch.nn.Module,
    records: Sequence[PoseRecord],
    skeleton: Skeleton,
    input_size: int,
    flip_test: bool = True,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress=None,
    refine: str = "quarter",
    workers: int = 0,
    confidence: np.ndarray | None = None,
    on_heatmaps: Callable[[torch.Tensor, dict], None] | None = None,
) -> np.ndarray:
    """(N, J, 2) predictions for `records` in their original image pixels.

    confidence: an (N, J) array to fill with each joint's heatmap peak value, or None.
    on_heatmaps: called with each batch's predicted heatmaps and the batch (its "target" and
    "target_weight" included), e.g. to score heatmap accuracy.

    Moves the model to `device` and runs it in eval mode, restoring its train/eval mode after.
    progress: a rich.progress.Progress to report to (a task is added), or None.
    """
    device = resolve_device(device)
    dataset = PoseDataset(records, skeleton, input_size=input_size, train=False)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers
    )
    task = progress.add_task("predict", total=len(dataset)) if progress is not None else None
    was_training = model.training
    move_to(model, device).eval()
    out = np.zeros((len(dataset), skeleton.num_joints, 2), dtype=np.float64)
    try:
        with torch.inference_mode():
            for batch in loader:
                images = batch["image"].to(device, non_blocking=True)
                heatmaps = predict(model, images, skeleton.flip_pairs, flip_test=flip_test)
                coords = heatmaps_to_image_coords(
                    heatmaps, batch["center"], batch["scale"], input_size, refine=refine
                )
                out[batch["index"].numpy()] = coords
                if confidence is not None:
                    confidence[batch["index"].numpy()] = get_max_preds(heatmaps)[1][..., 0]
                if on_heatmaps is not None:
                    on_heatmaps(heatmaps, batch)
                if task is not None:
                    progress.advance(task, len(images))
    finally:
        model.train(was_training)
    return out


def predict_image(
    model: torch.nn.Module,
    image: str | Path,
    input_size: int,
    skeleton: Skeleton,
    flip_test: bool = True,
    center: tuple[float, float] | None = None,
    scale: float | None = None,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Joints (J, 2) in the image's pixels and their confidence (J,) (heatmap peak values).

    Without a centre and scale the whole image is the person box: a square crop of its longer
    side around its centre (no 1.25 margin: the image is taken to be framed already).
    """
    from PIL import Image

    with Image.open(image) as im:
        width, height = im.size
    if center is None:
        center = ((width - 1) / 2.0, (height - 1) / 2.0)
    if scale is None:
        scale = max(width, height) / 200.0
    j = skeleton.num_joints
    record = PoseRecord(
        image=Path(image),
        joints=np.zeros((j, 2), np.float32),
        visibility=np.zeros(j, np.float32),
        center=np.asarray(center, np.float32),
        scale=float(scale),
    )
    item = PoseDataset([record], skeleton, input_size=input_size)[0]
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    move_to(model, device).eval()
    try:
        with torch.inference_mode():
            heatmaps = predict(
                model, item["image"][None].to(device), skeleton.flip_pairs, flip_test=flip_test
            )
    finally:
        model.train(was_training)
    joints = heatmaps_to_image_coords(
        heatmaps, item["center"][None], item["scale"][None], input_size
    )[0]
    _, maxvals = get_max_preds(heatmaps)
    return joints, maxvals[0, :, 0].astype(np.float64)
