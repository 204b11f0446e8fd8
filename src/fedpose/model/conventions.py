"""What a model file must say so that another tool can use the weights without fedpose.

A pose network's heatmaps mean nothing without the conventions around it: which joint each map
is, which maps swap when the image is mirrored, how the person crop was cut and normalised, and
how a heatmap peak becomes an image coordinate. `describe_model` writes them as plain strings
(JSON where structured), the form both safetensors' header metadata and ONNX's `metadata_props`
hold; `model.safetensors` and the exported ONNX file carry the same keys.

Paths are never absolute: a model travels, and a path of the machine that trained it tells the
next machine nothing but that machine's directory layout. `portable_config` rewrites them relative
to the working directory the file was written from (or drops them when no relative path exists).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path

from fedpose.config import Config
from fedpose.data.dataset import HEATMAP_STRIDE, IMAGENET_MEAN, IMAGENET_STD
from fedpose.data.records import Skeleton
from fedpose.data.transforms import PIXEL_STD
from fedpose.version import fedpose_version

# config keys that hold paths, (section or None, key)
PATH_KEYS = (
    (None, "out_dir"),
    ("data", "root"),
    ("data", "train_root"),
    ("data", "test_root"),
    ("data", "ann"),
    ("data", "test_ann"),
    ("data", "headboxes"),
    ("model", "pretrained"),
)

CROP_RULE = (
    "top-down, one person per crop: a square of side 200 * scale px around the person's centre "
    "(COCO/own data: the bbox centre, scale = 1.25 * max(w, h) / 200; LSP: the same from the "
    "labelled joints' box; MPII: the file's centre and scale, SimpleBaseline's adjustment), "
    "mapped by one affine warp onto input_size x input_size pixels, bilinear, no rotation at "
    "test time; pixel i covers [i - 0.5, i + 0.5], so the centre lands on "
    "((S - 1) / 2, (S - 1) / 2)"
)
DECODE_RULE = (
    "per joint: the argmax (x, y) of its heatmap (0 where the maximum is not positive), moved a "
    "quarter pixel per axis toward the higher neighbour (SimpleBaseline); crop pixel u = "
    "(h + 0.5) * heatmap_stride - 0.5; image pixel = inverse of the crop's affine warp; the "
    "joint's confidence is the heatmap maximum. Flip test (when flip_test is true): average with "
    "the heatmaps of the mirrored crop, mirrored back and with flip_pairs swapped, no pixel shift"
)


def portable_path(value: str, base: Path | None = None) -> str:
    """`value` relative to `base` (default: the working directory) when it is absolute; a
    relative path stays as it is. "" when no relative path exists (another drive)."""
    if not value or not os.path.isabs(value):
        return value
    try:
        return Path(os.path.relpath(value, base or Path.cwd())).as_posix()
    except ValueError:  # Windows: another drive has no relative path
        return ""


def portable_config(config: dict, base: Path | None = None) -> dict:
    """A copy of a config dict whose path values are relative (see portable_path)."""
    out = json.loads(json.dumps(config))
    for section, key in PATH_KEYS:
        node = out if section is None else out.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str):
            node[key] = portable_path(node[key], base)
    return out


@functools.cache
def source_commit() -> str:
    """The git commit of the fedpose source that is running, '+dirty' when modified; "" outside
    a git checkout (an installed wheel)."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("+dirty" if dirty else "")


def describe_model(cfg: Config, skeleton: Skeleton) -> dict[str, str]:
    """The conventions of a model built from `cfg` for `skeleton`, as string metadata."""
    size = cfg.data.input_size
    return {
        "producer": "fedpose",
        "fedpose_version": fedpose_version(),
        "fedpose_commit": source_commit(),
        "skeleton": skeleton.name,
        "joints": json.dumps(list(skeleton.joints)),
        "skeleton_bones": json.dumps([list(b) for b in skeleton.bones]),
        "flip_pairs": json.dumps([list(p) for p in skeleton.flip_pairs]),
        "input_size": str(size),
        "input_layout": "NCHW float32, RGB",
        "input_normalisation": json.dumps(
            {
                "rule": "(rgb / 255 - mean) / std",
                "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
            }
        ),
        "heatmap_size": str(size // HEATMAP_STRIDE),
        "heatmap_stride": str(HEATMAP_STRIDE),
        "crop": CROP_RULE,
        "crop_pixel_std": f"{PIXEL_STD:g}",
        "decode": DECODE_RULE,
        "flip_test": json.dumps(bool(cfg.train.flip_test)),
        "metric": _metric(skeleton),
    }


def _metric(skeleton: Skeleton) -> str:
    normaliser = {
        "torso": f"the torso (distance between joints {list(skeleton.torso_joints or ())})",
        "head": "0.6 x the head box diagonal (PCKh)",
        "bbox": "the longest side of the person box",
    }.get(skeleton.normalizer, skeleton.normalizer)
    return f"PCK@{skeleton.pck_alpha:g} of {normaliser}"
