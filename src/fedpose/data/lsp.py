"""Leeds Sports Pose: 2000 images, 14 joints, person-centric or observer-centric labels."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import scipy.io

from fedpose.data.records import (
    LSP,
    DatasetError,
    DatasetWarning,
    PoseRecord,
    check_joints,
    read_image_size,
)

LABEL_FILES = {"pc": "joints.mat", "oc": "joints_OC.mat"}
NUM_TRAIN = 1000
NUM_IMAGES = 2000
# SimpleBaseline convention: the crop is 1.25 x the person's extent, with scale in units of 200 px.
BOX_PADDING = 1.25
PIXEL_STD = 200.0


def load_lsp(root: str | Path, split: str = "train", labels: str = "pc") -> list[PoseRecord]:
    """Load LSP from `root` (holding images/ and joints.mat / joints_OC.mat).

    split: "train" (im0001-im1000), "test" (im1001-im2000) or "all" (every image in the file).
    labels: "pc" (joints.mat, person-centric) or "oc" (joints_OC.mat, observer-centric).
    Every LSP joint is labelled, so visibility is 1 throughout; the file's occlusion flags go to
    attributes["occluded"] (bool array), since LSP's PCK scores occluded joints too.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"LSP split must be train, test or all, not {split!r}")
    if labels not in LABEL_FILES:
        raise ValueError(f"LSP labels must be pc or oc, not {labels!r}")
    root = Path(root)
    mat_path = root / LABEL_FILES[labels]
    joints = _read_joints_mat(mat_path)
    n = joints.shape[2]
    if n == 0:
        raise DatasetError(mat_path, "zero records: 'joints' holds no person")
    images = sum(1 for _ in (root / "images").glob("im*.jpg"))
    if images != n:
        # labels of another copy of LSP (or images of another): loading the first n images may
        # pair joints with the wrong pictures, so it is said, not silently done
        warnings.warn(
            DatasetWarning(
                f"{mat_path}: {n} records, but {root / 'images'} holds {images} im*.jpg images; "
                f"the labels and the images may not belong together"
            ),
            stacklevel=2,
        )
    if split == "all":
        indices = range(n)
    elif n != NUM_IMAGES:
        raise DatasetError(
            mat_path, f"the standard {split} split needs {NUM_IMAGES} images; the file has {n}"
        )
    else:
        indices = range(NUM_TRAIN) if split == "train" else range(NUM_TRAIN, NUM_IMAGES)
    return [_record(root, mat_path, joints[:, :, i], i) for i in indices]


def _read_joints_mat(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(path, "file not found")
    try:
        mat = scipy.io.loadmat(path)
    # loadmat raises a zoo of types for damaged files (ValueError, MatReadError, OSError, ...)
    except Exception as e:
        raise DatasetError(path, f"not a readable MATLAB file: {e}") from None
    if "joints" not in mat:
        raise DatasetError(path, "no variable 'joints' in the file")
    joints = mat["joints"]
    if not np.issubdtype(joints.dtype, np.number):
        raise DatasetError(path, f"'joints' must be numeric, not {joints.dtype}")
    if joints.ndim != 3 or joints.shape[:2] != (3, 14):
        shape = "x".join(str(d) for d in joints.shape)
        raise DatasetError(path, f"'joints' must have shape 3x14xN (x, y, occluded), not {shape}")
    return joints.astype(np.float64)


def _record(root: Path, mat_path: Path, columns: np.ndarray, index: int) -> PoseRecord:
    name = f"im{index + 1:04d}.jpg"
    image = root / "images" / name
    xy = columns[:2].T - 1.0  # MATLAB pixels are 1-based
    flags = columns[2]
    visibility = np.ones(len(xy), dtype=np.float32)
    check_joints(xy, visibility, read_image_size(image, mat_path, name), mat_path, name, LSP.joints)
    if not np.isin(flags, (0, 1)).all():
        raise DatasetError(mat_path, f"occlusion flags must be 0 or 1, got {flags.tolist()}", name)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    side = float((hi - lo).max())
    if side <= 0:
        raise DatasetError(mat_path, "all joints at one point: no extent to size a crop", name)
    return PoseRecord(
        image=image,
        joints=xy.astype(np.float32),
        visibility=visibility,
        center=((lo + hi) / 2).astype(np.float32),
        scale=BOX_PADDING * side / PIXEL_STD,
        person_box=np.concatenate([lo, hi]).astype(np.float32),
        attributes={"occluded": flags.astype(bool)},
        record_id=name,
    )
