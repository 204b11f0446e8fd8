"""Crop geometry, training augmentation and Gaussian heatmap targets.

Pixel convention, used everywhere in fedpose: pixel i covers [i - 0.5, i + 0.5], so its centre is
at integer coordinate i (0-based). Under this convention

- the crop maps the source square of side 200 * scale around `center` onto the whole output image,
  so `center` lands on the output's geometric centre ((S - 1) / 2, not S / 2 as in SimpleBaseline);
- a heatmap of side S / stride is the same crop at a lower resolution: heatmap pixel j covers
  input pixels [stride * j, stride * j + stride), and h = (u + 0.5) / stride - 0.5.

With both rules the chain image -> crop -> heatmap -> decode -> original pixels is an exact round
trip, and mirroring an input tensor mirrors its heatmaps exactly (no one-pixel shift in flip test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PIXEL_STD = 200.0  # SimpleBaseline: scale is the box side in units of 200 px


def crop_matrix(
    center: np.ndarray | tuple[float, float],
    scale: float,
    rotation: float = 0.0,
    output_size: int = 64,
) -> np.ndarray:
    """2x3 affine matrix from original-image pixels to crop pixels.

    The source square has side 200 * scale px around `center`, rotated by `rotation` degrees
    (positive = content turns counter-clockwise on screen, as with OpenCV and SimpleBaseline).
    """
    side = PIXEL_STD * float(scale)
    if side <= 0:
        raise ValueError(f"crop scale must be positive, got {scale}")
    k = output_size / side
    theta = math.radians(rotation)
    cos, sin = math.cos(theta) * k, math.sin(theta) * k
    cx, cy = float(center[0]), float(center[1])
    mid = (output_size - 1) / 2.0
    # y points down, so a counter-clockwise turn on screen is [[cos, sin], [-sin, cos]]
    return np.array(
        [
            [cos, sin, mid - cos * cx - sin * cy],
            [-sin, cos, mid + sin * cx - cos * cy],
        ],
        dtype=np.float64,
    )


def flip_matrix(width: int) -> np.ndarray:
    """2x3 matrix mirroring x about the centre of an image `width` pixels wide."""
    return np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0]])


def compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The 2x3 affine map `a` after `b` (x -> a(b(x)))."""
    return (_to3(a) @ _to3(b))[:2]


def invert_affine(m: np.ndarray) -> np.ndarray:
    return np.linalg.inv(_to3(m))[:2]


def affine_transform(points: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to points of shape (..., 2)."""
    points = np.asarray(points, dtype=np.float64)
    return points @ m[:, :2].T + m[:, 2]


def _to3(m: np.ndarray) -> np.ndarray:
    out = np.eye(3)
    out[:2] = m
    return out


def warp_image(image: Image.Image, m: np.ndarray, output_size: int) -> Image.Image:
    """Crop `image` with the 2x3 matrix `m` (original px -> crop px), bilinear, black outside.

    Pillow asks for the inverse map in its own edge-based coordinates (pixel i spans [i, i + 1]),
    hence the half-pixel shifts around the inverse.
    """
    inv = _to3(invert_affine(m))
    half = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    unhalf = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])
    data = (half @ inv @ unhalf)[:2].ravel()
    return image.transform(
        (output_size, output_size),
        Image.Transform.AFFINE,
        tuple(float(v) for v in data),
        resample=Image.Resampling.BILINEAR,
    )


def reduction_factor(m: np.ndarray) -> int:
    """The JPEG draft reduction (1, 2, 4 or 8) worth decoding at for a crop with matrix `m`."""
    # source px per crop px: the linear part's |det| is the area ratio crop / source
    shrink = 1.0 / math.sqrt(abs(np.linalg.det(m[:, :2])))
    factor = 1
    while factor < 8 and shrink >= 2 * factor:
        factor *= 2
    return factor


def decode_reduced(image: Image.Image, factor: int) -> tuple[Image.Image, np.ndarray | None]:
    """A freshly opened image as RGB, a JPEG at 1/`factor` size; with the 2x3 map from original
    to reduced pixels (None when the image was not reduced)."""
    to_reduced = None
    if factor > 1 and image.format == "JPEG":
        w, h = image.size
        drafted = image.draft("RGB", (max(1, w // factor), max(1, h // factor)))
        if drafted is not None:
            _, box = drafted
            # the reduced image's edge coordinates are the original's divided by the factor
            sx, sy = box[2] / w, box[3] / h
            to_reduced = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]])
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image, to_reduced


def load_image(source: str | Path | Image.Image, m: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    """Open an image for cropping with `m`; returns (RGB image, matrix adjusted to that image).

    `source` is a path or a freshly opened, not yet loaded Pillow image.

    A JPEG is decoded at 1/2, 1/4 or 1/8 size (libjpeg's DCT scaling, almost free) when the crop
    shrinks it at least that much anyway: decoding is most of the cost of a small crop, and the
    reduced image is a better-filtered source than the full one for a bilinear downscale.
    """
    image = source if isinstance(source, Image.Image) else Image.open(source)
    image, to_reduced = decode_reduced(image, reduction_factor(m))
    if to_reduced is not None:
        m = compose(m, invert_affine(to_reduced))
    return image, m


@dataclass(frozen=True)
class Augmentation:
    """SimpleBaseline's training augmentation, drawn from an explicit generator."""

    scale_factor: float = 0.25
    rotation_factor: float = 30.0
    rotation_prob: float = 0.6
    flip_prob: float = 0.5

    def draw(self, rng: np.random.Generator) -> tuple[float, float, bool]:
        """(scale multiplier, rotation in degrees, flip).

        Scale as SimpleBaseline: N(1, sf) clipped to [1 - sf, 1 + sf]. Rotation N(0, rf) clipped
        to +-rf (SimpleBaseline clips at +-2 rf) with probability rotation_prob. Every draw is
        made whether used or not, so an item's numbers do not depend on the options (flip_prob=0
        turns flipping off without changing the scales and rotations).
        """
        sf, rf = self.scale_factor, self.rotation_factor
        s = float(np.clip(rng.standard_normal() * sf + 1.0, 1.0 - sf, 1.0 + sf))
        r = float(np.clip(rng.standard_normal() * rf, -rf, rf))
        rotate = rng.random() < self.rotation_prob
        flip = rng.random() < self.flip_prob
        return s, (r if rotate else 0.0), flip


def flip_joints(
    joints: np.ndarray, visibility: np.ndarray, width: int, flip_pairs
) -> tuple[np.ndarray, np.ndarray]:
    """Mirror joints about the centre of an image `width` px wide and swap left/right."""
    joints = joints.copy()
    joints[:, 0] = width - 1 - joints[:, 0]
    visibility = visibility.copy()
    for a, b in flip_pairs:
        joints[[a, b]] = joints[[b, a]]
        visibility[[a, b]] = visibility[[b, a]]
    return joints, visibility


def input_to_heatmap(points: np.ndarray, stride: float) -> np.ndarray:
    return (np.asarray(points, dtype=np.float64) + 0.5) / stride - 0.5


def heatmap_to_input(points: np.ndarray, stride: float) -> np.ndarray:
    return (np.asarray(points, dtype=np.float64) + 0.5) * stride - 0.5


def gaussian_heatmaps(
    joints: np.ndarray,
    visibility: np.ndarray,
    heatmap_size: int,
    sigma: float = 2.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Targets for joints given in heatmap pixels: (J, h, w) float32 and weights (J, 1) float32.

    The Gaussian is centred at the exact sub-pixel position (SimpleBaseline rounds it to a
    pixel, which costs up to half a heatmap pixel of bias). Unlabelled joints and joints outside
    the heatmap get an empty map and weight 0.
    """
    joints = np.asarray(joints, dtype=np.float64)
    finite = np.isfinite(joints).all(axis=1)
    joints = np.where(finite[:, None], joints, 0.0)  # unlabelled joints may be stored as nan
    size = heatmap_size
    inside = (
        (joints[:, 0] >= -0.5)
        & (joints[:, 0] < size - 0.5)
        & (joints[:, 1] >= -0.5)
        & (joints[:, 1] < size - 0.5)
    )
    weight = ((np.asarray(visibility) > 0) & inside & finite).astype(np.float32)
    grid = np.arange(size, dtype=np.float64)
    # separable: exp(-(dx^2 + dy^2) / 2s^2) = gx * gy
    gx = np.exp(-((grid[None, :] - joints[:, :1]) ** 2) / (2 * sigma**2))
    gy = np.exp(-((grid[None, :] - joints[:, 1:]) ** 2) / (2 * sigma**2))
    target = (gy[:, :, None] * gx[:, None, :]).astype(np.float32)
    target *= weight[:, None, None]
    return target, weight[:, None]


def crop_to_image(
    points: np.ndarray,
    center: np.ndarray | tuple[float, float],
    scale: float,
    output_size: int,
    rotation: float = 0.0,
) -> np.ndarray:
    """Map points (..., 2) from a crop of side `output_size` back to original-image pixels.

    A heatmap is the same crop at its own resolution, so heatmap coordinates go back with
    output_size = heatmap side.
    """
    m = invert_affine(crop_matrix(center, scale, rotation, output_size))
    return affine_transform(points, m)
