"""MPII Human Pose in the SimpleBaseline/HRNet JSON layout, with gt_valid.mat head boxes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from fedpose.data.records import (
    MPII,
    DatasetError,
    PoseRecord,
    check_geometry,
    check_joints,
    numbers,
    read_image_size,
    read_json,
)

NUM_JOINTS = 16
# Joints of the annotation file and of gt_valid.mat's pos_gt_src further apart than this (px)
# mean the head boxes belong to another set or another order.
ORDER_TOLERANCE = 2.0


def load_mpii(
    ann_file: str | Path, image_dir: str | Path, headboxes: str | Path | None = None
) -> list[PoseRecord]:
    """Load a SimpleBaseline/HRNet MPII JSON (a list of {image, center, scale, joints, joints_vis}).

    Coordinates are 1-based in the file and 0-based in the records. Centre and scale get
    SimpleBaseline's adjustment so crops do not cut limbs: the centre moves down by 15 * scale px
    and the scale grows by 1.25 (skipped where the centre is the -1 placeholder). A file without
    joints (the official test set) gives records with every joint unlabelled.

    headboxes: gt_valid.mat of the official evaluation, in the same order as the JSON; sets
    record.head_box (0-based x1, y1, x2, y2) for PCKh.
    """
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    entries = read_json(ann_file)
    if not isinstance(entries, list):
        raise DatasetError(ann_file, "expected a JSON list of person entries")
    sizes: dict[Path, tuple[int, int]] = {}
    records = [_record(ann_file, image_dir, entry, i, sizes) for i, entry in enumerate(entries)]
    if not records:
        raise DatasetError(ann_file, "zero records: the list of person entries is empty")
    if headboxes is not None:
        _attach_headboxes(records, Path(headboxes), ann_file)
    return records


def load_mpii_headboxes(path: str | Path) -> np.ndarray:
    """Head boxes of gt_valid.mat as an (N, 4) float32 array of 0-based x1, y1, x2, y2."""
    path = Path(path)
    return _headboxes(path, _read_mat(path))


def _record(
    ann_file: Path, image_dir: Path, entry: object, index: int, sizes: dict[Path, tuple[int, int]]
) -> PoseRecord:
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
        raise DatasetError(ann_file, "entry must be an object with an 'image' name", index)
    record_id = f"{entry['image']}#{index}"

    def field(key: str, shape: tuple[int, ...], problem: str) -> np.ndarray:
        return _array(entry.get(key), shape, problem, ann_file, record_id)

    center = field("center", (2,), "center must be [x, y]")
    scale = float(field("scale", (), "scale must be a number"))
    if not np.isfinite(center).all() or not (np.isfinite(scale) and scale > 0):
        problem = f"center {center.tolist()} and scale {scale} must be finite, scale > 0"
        raise DatasetError(ann_file, problem, record_id)

    if "joints" in entry or "joints_vis" in entry:
        joints = field("joints", (NUM_JOINTS, 2), "joints must be 16 [x, y] pairs")
        vis = field("joints_vis", (NUM_JOINTS,), "joints_vis must be 16 flags")
        joints = joints - 1.0  # 1-based MATLAB pixels
        if not np.isin(vis, (0, 1)).all():
            raise DatasetError(
                ann_file, f"joints_vis flags must be 0 or 1, got {vis.tolist()}", record_id
            )
        visibility = (vis > 0).astype(np.float32)
    else:
        joints = np.zeros((NUM_JOINTS, 2))
        visibility = np.zeros(NUM_JOINTS, dtype=np.float32)

    image = image_dir / entry["image"]
    if image not in sizes:
        sizes[image] = read_image_size(image, ann_file, record_id)
    check_joints(joints, visibility, sizes[image], ann_file, record_id, MPII.joints)
    # -1 is the file's "no centre" placeholder
    check_geometry(
        None if center[0] == -1 else center - 1.0, scale, {}, sizes[image], ann_file, record_id
    )

    # SimpleBaseline's adjustment, on the raw 1-based centre: -1 marks "no centre"
    if center[0] != -1:
        center[1] += 15 * scale
        scale *= 1.25
    center = center - 1.0
    return PoseRecord(
        image=image,
        joints=joints.astype(np.float32),
        visibility=visibility,
        center=center.astype(np.float32),
        scale=scale,
        record_id=record_id,
    )


def _array(
    value: object, shape: tuple[int, ...], problem: str, path: Path, record: str
) -> np.ndarray:
    try:
        arr = numbers(value, None, problem.split(" ")[0], path, record)
    except DatasetError:
        raise DatasetError(path, f"{problem}, got {value!r:.80}", record) from None
    if arr.shape != shape:
        got = "x".join(str(d) for d in arr.shape) or "a scalar"
        raise DatasetError(path, f"{problem}, got shape {got}", record)
    return arr


def _read_mat(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(path, "file not found")
    try:
        return scipy.io.loadmat(path)
    # loadmat raises a zoo of types for damaged files (ValueError, MatReadError, OSError, ...)
    except Exception as e:
        raise DatasetError(path, f"not a readable MATLAB file: {e}") from None


def _headboxes(path: Path, mat: dict) -> np.ndarray:
    if "headboxes_src" not in mat:
        raise DatasetError(path, "no variable 'headboxes_src' (expected MPII's gt_valid.mat)")
    src = np.asarray(mat["headboxes_src"])
    if not np.issubdtype(src.dtype, np.number) or src.ndim != 3 or src.shape[:2] != (2, 2):
        shape = "x".join(str(d) for d in src.shape)
        raise DatasetError(path, f"'headboxes_src' must be a numeric 2x2xN array, not {shape}")
    # [corner, xy, n]: corner 0 is the top-left (x1, y1), corner 1 the bottom-right (x2, y2)
    boxes = np.concatenate([src[0].T, src[1].T], axis=1).astype(np.float64) - 1.0
    bad = np.flatnonzero(~np.isfinite(boxes).all(axis=1))
    if bad.size:
        raise DatasetError(path, "head box has a non-finite coordinate", int(bad[0]))
    return boxes.astype(np.float32)


def _attach_headboxes(records: list[PoseRecord], path: Path, ann_file: Path) -> None:
    mat = _read_mat(path)
    boxes = _headboxes(path, mat)
    if len(boxes) != len(records):
        raise DatasetError(
            path, f"has {len(boxes)} head boxes but {ann_file.name} has {len(records)} entries"
        )
    _check_same_order(records, mat, path, ann_file)
    for index, (record, box) in enumerate(zip(records, boxes, strict=True)):
        w, h = read_image_size(record.image, ann_file, record.record_id)
        check_geometry(None, None, {"head box": box}, (w, h), path, index)
        record.head_box = box


def _check_same_order(records: list[PoseRecord], mat: dict, path: Path, ann_file: Path) -> None:
    """gt_valid.mat repeats the joints (pos_gt_src); they must agree with the JSON, or the head
    boxes would silently be paired with other people. Single stray labels are tolerated."""
    gt = mat.get("pos_gt_src")
    if gt is None or np.shape(gt) != (NUM_JOINTS, 2, len(records)):
        return
    gt = np.asarray(gt, dtype=np.float64) - 1.0
    missing = np.asarray(mat.get("jnt_missing", np.zeros((NUM_JOINTS, len(records)))))
    compared = disagree = 0
    for i, record in enumerate(records):
        both = (record.visibility > 0) & np.isfinite(gt[:, :, i]).all(axis=1)
        if missing.shape == (NUM_JOINTS, len(records)):
            both &= missing[:, i] == 0
        if not both.any():
            continue
        compared += 1
        if np.abs(record.joints[both] - gt[both, :, i]).max() > ORDER_TOLERANCE:
            disagree += 1
    if compared and disagree > compared / 2:
        raise DatasetError(
            path,
            f"pos_gt_src disagrees with the joints of {ann_file.name} for {disagree} of "
            f"{compared} entries: the head boxes are for another set or another order",
        )
