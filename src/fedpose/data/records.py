"""The one record type every dataset loads into, the skeleton type, the dataset error, and the
input checks every loader shares."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fedpose.bounded import ParseError
from fedpose.bounded import read_json as read_bounded_json
from fedpose.config import DataConfig


class DatasetWarning(UserWarning):
    """Data that loads but looks wrong (the command line prints it as one `warning:` line)."""


class DatasetError(ValueError):
    """Malformed or missing pose data. The message names the file and, where known, the record."""

    def __init__(self, path: str | Path, problem: str, record: str | int | None = None):
        self.path = str(path)
        self.problem = problem
        self.record = record
        where = f"{self.path}" if record is None else f"{self.path} [record {record}]"
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Skeleton:
    """Joint names, left/right flip pairs, and how the dataset normalises PCK.

    normalizer: "torso" (distance between torso_joints), "head" (PCKh: 0.6 x head-box diagonal),
    or "bbox" (longest side of the person box).
    """

    name: str
    joints: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    normalizer: str = "torso"
    torso_joints: tuple[int, int] | None = None
    pck_alpha: float = 0.2
    # joints left out of the dataset's standard mean (MPII: pelvis and thorax)
    excluded_from_mean: tuple[int, ...] = ()
    # drawing: pairs of joint indices connected by a bone
    bones: tuple[tuple[int, int], ...] = ()

    @property
    def num_joints(self) -> int:
        return len(self.joints)

    def flip_permutation(self) -> list[int]:
        perm = list(range(self.num_joints))
        for a, b in self.flip_pairs:
            perm[a], perm[b] = b, a
        return perm


@dataclass
class PoseRecord:
    """One annotated person. Joints are 0-based pixel coordinates in the original image.

    scale follows the SimpleBaseline convention: person box size / 200 px, so the crop side is
    200 * scale pixels around `center`.
    """

    image: Path
    joints: np.ndarray  # (J, 2) float32, 0-based pixels
    visibility: np.ndarray  # (J,) float32: 1 = labelled (usable as target), 0 = unlabelled
    center: np.ndarray  # (2,) float32
    scale: float
    head_box: np.ndarray | None = None  # (4,) x1, y1, x2, y2
    person_box: np.ndarray | None = None  # (4,) x1, y1, x2, y2
    attributes: dict = field(default_factory=dict)
    record_id: str = ""

    @property
    def num_joints(self) -> int:
        return int(self.joints.shape[0])


LSP = Skeleton(
    name="lsp",
    joints=(
        "r_ankle",
        "r_knee",
        "r_hip",
        "l_hip",
        "l_knee",
        "l_ankle",
        "r_wrist",
        "r_elbow",
        "r_shoulder",
        "l_shoulder",
        "l_elbow",
        "l_wrist",
        "neck",
        "head_top",
    ),
    flip_pairs=((0, 5), (1, 4), (2, 3), (6, 11), (7, 10), (8, 9)),
    normalizer="torso",
    torso_joints=(9, 2),
    pck_alpha=0.2,
    bones=(
        (0, 1),
        (1, 2),
        (3, 4),
        (4, 5),
        (2, 3),
        (6, 7),
        (7, 8),
        (9, 10),
        (10, 11),
        (8, 12),
        (9, 12),
        (12, 13),
        (2, 8),
        (3, 9),
    ),
)

MPII = Skeleton(
    name="mpii",
    joints=(
        "r_ankle",
        "r_knee",
        "r_hip",
        "l_hip",
        "l_knee",
        "l_ankle",
        "pelvis",
        "thorax",
        "upper_neck",
        "head_top",
        "r_wrist",
        "r_elbow",
        "r_shoulder",
        "l_shoulder",
        "l_elbow",
        "l_wrist",
    ),
    flip_pairs=((0, 5), (1, 4), (2, 3), (10, 15), (11, 14), (12, 13)),
    normalizer="head",
    pck_alpha=0.5,
    excluded_from_mean=(6, 7),
    bones=(
        (0, 1),
        (1, 2),
        (2, 6),
        (3, 6),
        (3, 4),
        (4, 5),
        (6, 7),
        (7, 8),
        (8, 9),
        (10, 11),
        (11, 12),
        (12, 7),
        (13, 7),
        (13, 14),
        (14, 15),
    ),
)

COCO = Skeleton(
    name="coco",
    joints=(
        "nose",
        "l_eye",
        "r_eye",
        "l_ear",
        "r_ear",
        "l_shoulder",
        "r_shoulder",
        "l_elbow",
        "r_elbow",
        "l_wrist",
        "r_wrist",
        "l_hip",
        "r_hip",
        "l_knee",
        "r_knee",
        "l_ankle",
        "r_ankle",
    ),
    flip_pairs=((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)),
    normalizer="bbox",
    pck_alpha=0.2,
    bones=(
        (15, 13),
        (13, 11),
        (16, 14),
        (14, 12),
        (11, 12),
        (5, 11),
        (6, 12),
        (5, 6),
        (5, 7),
        (6, 8),
        (7, 9),
        (8, 10),
        (1, 2),
        (0, 1),
        (0, 2),
        (1, 3),
        (2, 4),
        (3, 5),
        (4, 6),
    ),
)

# The single-arm set: one arm, so there are no left/right pairs to flip. PCK is normalised by the
# person box: a limb length would shrink to nothing when the arm points at the camera.
ARM = Skeleton(
    name="synth-arm",
    joints=("shoulder", "elbow", "wrist"),
    flip_pairs=(),
    normalizer="bbox",
    pck_alpha=0.1,
    bones=((0, 1), (1, 2)),
)

SKELETONS = {s.name: s for s in (LSP, MPII, COCO, ARM)}


# --- what a dataset provides (data/__init__.py: DATASETS) -----------------------------------------
@dataclass(frozen=True)
class FileOptions:
    """What `load_files` may be told besides root and annotation file."""

    split: str = "all"  # lsp: train | test | all
    labels: str = "pc"  # lsp: pc | oc
    headboxes: str | Path | None = None  # mpii: gt_valid.mat
    # coco / synth-arm: filled with the annotations the loader passes over, by reason
    skipped: Counter | None = field(default=None, compare=False)


@dataclass(frozen=True)
class DatasetKind:
    """One registered dataset: its skeleton and its two loaders."""

    skeleton: Skeleton
    # the configured train or test split (DataConfig, "train" | "test") -> records, skeleton
    load_split: Callable[[DataConfig, str], tuple[list[PoseRecord], Skeleton]]
    # every record of the files as given (root, annotation file or None, options)
    load_files: Callable[[Path, str | Path | None, FileOptions], list[PoseRecord]]


# --- validation shared by the loaders -------------------------------------------------------------
# Joints may lie this far outside the image, as a share of its width/height, before the label is
# treated as broken. Real labels stray a little (LSP has joints up to 1 % outside its images).
OUTSIDE_TOLERANCE = 0.5


def read_json(path: str | Path) -> object:
    """Parse a JSON annotation file; a missing, unreadable or malformed file is a DatasetError."""
    path = Path(path)
    try:
        return read_bounded_json(path, object_pairs_hook=_no_duplicate_keys)
    except ParseError as e:
        raise DatasetError(path, str(e).removeprefix(f"{path}: ")) from None
    except FileNotFoundError:
        raise DatasetError(path, "file not found") from None
    except IsADirectoryError:
        raise DatasetError(path, "is a directory, not a file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(path, f"cannot read file: {e}") from None
    except json.JSONDecodeError as e:
        raise DatasetError(path, f"not valid JSON: {e}") from None
    except _DuplicateKey as e:
        raise DatasetError(path, f"key {e.args[0]!r} appears twice in one object") from None
    except RecursionError:
        raise DatasetError(path, "JSON nested too deeply") from None


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    # json keeps the last of two equal keys silently; two values for one key is a broken file
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def numbers(
    value: object,
    shape: tuple[int, ...] | None,
    what: str,
    source: str | Path,
    record: str | int | None = None,
) -> np.ndarray:
    """`value` as a float64 array of `shape` (None: any), refusing anything but JSON numbers.

    numpy would turn "12" into 12.0 and True into 1.0: numbers written as text or flags written as
    booleans are mistakes in the file, so they are errors, not conversions.
    """

    def leaves_ok(v: object, depth: int) -> bool:
        if isinstance(v, list | tuple):
            return depth < 4 and all(leaves_ok(x, depth + 1) for x in v)
        return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)

    if not leaves_ok(value, 0):
        raise DatasetError(source, f"{what} must be numbers, got {value!r:.80}", record)
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):  # ragged nesting
        raise DatasetError(source, f"{what}: ragged lists, got {value!r:.80}", record) from None
    if shape is not None and arr.shape != shape:
        got = "x".join(str(d) for d in arr.shape) or "a scalar"
        want = "x".join(str(d) for d in shape) or "a scalar"
        raise DatasetError(source, f"{what} must have shape {want}, got {got}", record)
    return arr


# A crop side (200 px x scale) longer than this many image sides is no person in that image.
MAX_CROP_IMAGE_SIDES = 4.0


def check_geometry(
    center: np.ndarray | None,
    scale: float | None,
    boxes: dict[str, np.ndarray | None],
    image_size: tuple[int, int],
    source: str | Path,
    record: str | int | None = None,
    tolerance: float = OUTSIDE_TOLERANCE,
) -> None:
    """Reject a centre, scale or box (x1, y1, x2, y2) that cannot belong to the real image: a
    person box of 1e30 would otherwise make every prediction count as correct."""
    w, h = image_size
    lo = -tolerance * np.array([w, h])
    hi = np.array([w - 1, h - 1]) + tolerance * np.array([w, h])
    for name, box in boxes.items():
        if box is None:
            continue
        b = np.asarray(box, dtype=np.float64)
        inside = (
            np.isfinite(b).all()
            and (b[:2] >= lo).all()
            and (b[2:] <= hi + 1).all()
            and b[2] > b[0]
            and b[3] > b[1]
        )
        if not inside:
            problem = (
                f"{name} {[round(float(v), 2) for v in b]} is empty or lies outside the "
                f"{w}x{h} image"
            )
            raise DatasetError(source, problem, record)
    if center is not None:
        c = np.asarray(center, dtype=np.float64)
        if not np.isfinite(c).all() or (c < lo).any() or (c > hi).any():
            problem = f"center {c.tolist()} lies outside the {w}x{h} image"
            raise DatasetError(source, problem, record)
    if scale is not None:
        limit = MAX_CROP_IMAGE_SIDES * max(w, h) / 200.0
        if not (np.isfinite(scale) and 0 < scale <= limit):
            problem = (
                f"scale {scale!r} is absurd for the {w}x{h} image "
                f"(allowed: 0 < scale <= {limit:.3g})"
            )
            raise DatasetError(source, problem, record)


def read_image_size(
    image: str | Path,
    source: str | Path,
    record: str | int | None = None,
    decode: bool = False,
) -> tuple[int, int]:
    """(width, height) of an image from its header alone (`decode`: after decoding every pixel,
    which finds truncated and corrupt files).

    A missing or unreadable image is reported against `source`, the annotation file naming it,
    because that is the file a user has to fix.
    """
    try:
        with Image.open(image) as im:
            if decode:
                im.load()
            if im.size[0] <= 0 or im.size[1] <= 0:
                raise DatasetError(source, f"image {image} has no pixels", record)
            return im.size
    except FileNotFoundError:
        raise DatasetError(source, f"image not found: {image}", record) from None
    except IsADirectoryError:
        raise DatasetError(source, f"image {image} is a directory", record) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # OSError includes PIL's UnidentifiedImageError and truncated files; PIL raises
        # ValueError / SyntaxError for some damaged headers
        raise DatasetError(source, f"cannot read image {image}: {e}", record) from None


def check_joints(
    joints: np.ndarray,
    visibility: np.ndarray,
    image_size: tuple[int, int],
    source: str | Path,
    record: str | int | None = None,
    names: tuple[str, ...] | None = None,
    tolerance: float = OUTSIDE_TOLERANCE,
) -> None:
    """Reject non-finite coordinates and labelled joints far outside the image."""
    bad = ~np.isfinite(joints).all(axis=1)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        problem = f"{_joint_label(j, names)} has a non-finite coordinate {joints[j].tolist()}"
        raise DatasetError(source, problem, record)
    w, h = image_size
    lo = -tolerance * np.array([w, h])
    hi = np.array([w - 1, h - 1]) + tolerance * np.array([w, h])
    far = (visibility > 0) & ((joints < lo) | (joints > hi)).any(axis=1)
    if far.any():
        j = int(np.flatnonzero(far)[0])
        x, y = (float(v) for v in joints[j])
        where = f"at ({x:.1f}, {y:.1f})"
        problem = f"{_joint_label(j, names)} {where} lies far outside the {w}x{h} image"
        raise DatasetError(source, problem, record)


def _joint_label(j: int, names: tuple[str, ...] | None) -> str:
    return f"joint {j} ({names[j]})" if names and j < len(names) else f"joint {j}"
