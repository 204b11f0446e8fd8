"""`fedpose score`: a predictions file scored with the dataset's standard metric, like the
benchmarks' official scripts (LSP PCK@0.2 torso, MPII PCKh@0.5, COCO PCK@0.2 of the person box).

PRED.json maps image file name -> [[x, y], ...] (0-based pixels, the dataset's joint order), or
-> a list of such lists, one per person in annotation order. For COCO it may instead be a COCO
keypoint results file (a list of {image_id, category_id, keypoints, score}); COCO data also gets
pycocotools' keypoint AP (fedpose.metrics.coco_ap).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.table import Table

from fedpose.data import FileOptions, load_files
from fedpose.data.records import (
    DatasetError,
    PoseRecord,
    Skeleton,
    numbers,
    read_image_size,
    read_json,
)
from fedpose.metrics.coco_ap import (
    has_keypoint_ap,
    image_ids_by_path,
    is_results_list,
    keypoint_ap,
    load_ground_truth,
    match_results,
    predictions_ap,
    read_results,
)
from fedpose.metrics.pck import PCKResult, grouped_table, score


@dataclass
class ScoredFile:
    """A predictions file scored: PCK, the skeleton, the number of records scored, and for COCO
    data the keypoint AP (AP, AP50, AP75, APm, APl, AR; empty for other datasets)."""

    result: PCKResult
    skeleton: Skeleton
    num_records: int
    ap: dict[str, float] = field(default_factory=dict)


def match_predictions(
    pred_file: str | Path, records: list[PoseRecord], num_joints: int
) -> np.ndarray:
    """One (J, 2) prediction per record, in record order; raises DatasetError on gaps."""
    pred_file = Path(pred_file)
    preds = read_json(pred_file)
    if not isinstance(preds, dict):
        raise DatasetError(pred_file, "expected an object mapping image file name -> joints")
    seen: dict[str, int] = defaultdict(int)
    out = np.zeros((len(records), num_joints, 2), dtype=np.float64)
    for i, rec in enumerate(records):
        name = Path(rec.image).name
        if name not in preds:
            raise DatasetError(pred_file, "no prediction for this image", name)
        arr = numbers(preds[name], None, "predicted joints", pred_file, name)
        if not np.isfinite(arr).all():
            raise DatasetError(pred_file, "predicted joints must be finite numbers", name)
        if arr.ndim == 2:
            arr = arr[None]
        person = seen[name]
        seen[name] += 1
        if arr.ndim != 3 or arr.shape[1:] != (num_joints, 2):
            raise DatasetError(
                pred_file,
                f"expected {num_joints} [x, y] pairs per person, got shape {list(arr.shape)}",
                name,
            )
        if person >= arr.shape[0]:
            raise DatasetError(
                pred_file, f"{arr.shape[0]} people predicted, the annotation has more", name
            )
        out[i] = arr[person]
    return out


def score_file(
    dataset: str,
    root: str | Path,
    pred_file: str | Path,
    ann: str | Path | None = None,
    options: FileOptions | None = None,
    alpha: float | None = None,
) -> ScoredFile:
    """Score a predictions file against a dataset's labels. alpha: the PCK threshold (None: the
    dataset's standard one)."""
    records, skeleton = load_files(dataset, root, ann, options)
    if not records:
        raise DatasetError(ann or root, "zero records: nothing to score")
    # every scored image decodes: a zero-byte or truncated image means the labels were scored
    # against a picture nobody can have predicted on
    for image in sorted({r.image for r in records}):
        read_image_size(image, ann or root, Path(image).name, decode=True)
    ap: dict[str, float] = {}
    if dataset == "coco" and is_results_list(pred_file):
        ground_truth = load_ground_truth(ann)
        results = read_results(pred_file, ground_truth)
        ids = image_ids_by_path(ground_truth, root)
        preds = match_results(records, results, ids, skeleton)
        ap = keypoint_ap(ground_truth, results)
    else:
        preds = match_predictions(pred_file, records, skeleton.num_joints)
        if dataset == "coco" and has_keypoint_ap(skeleton):
            ap = predictions_ap(records, preds, None, ann, root)
    return ScoredFile(score(preds, records, skeleton, alpha=alpha), skeleton, len(records), ap)


def score_table(
    result: PCKResult, skeleton: Skeleton, num_records: int, alpha: float | None = None
) -> Table:
    """The per-part PCK of a scored file, as the official scripts group it."""
    table = Table(
        title=f"{skeleton.name}: {num_records} records, "
        f"{'PCKh' if skeleton.normalizer == 'head' else 'PCK'}"
        f"@{alpha or skeleton.pck_alpha:g}"
    )
    table.add_column("part")
    table.add_column("PCK (%)", justify="right")
    for part, value in grouped_table(result, skeleton):
        table.add_row(part, f"{value:.2f}")
    return table
