"""From heatmaps to joint coordinates, and flip-test averaging.

Coordinates follow fedpose's pixel convention (see fedpose.data.transforms): a heatmap is the
input crop at 1/4 resolution, so decoding is the crop's inverse affine at heatmap resolution,
and mirroring the input mirrors the heatmaps exactly: flip_back needs no one-pixel shift
(SimpleBaseline's shift compensates for its own half-pixel offsets).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fedpose.data.transforms import crop_to_image

Heatmaps = np.ndarray | torch.Tensor


def _numpy(x: Heatmaps) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def get_max_preds(heatmaps: Heatmaps) -> tuple[np.ndarray, np.ndarray]:
    """Argmax of each (N, J, H, W) map: coords (N, J, 2) as (x, y) float32, maxvals (N, J, 1).

    As SimpleBaseline: where the maximum is not positive, the coordinates are 0.
    """
    hm = _numpy(heatmaps)
    n, j, h, w = hm.shape
    flat = hm.reshape(n, j, h * w)
    idx = flat.argmax(axis=2)
    maxvals = np.take_along_axis(flat, idx[..., None], axis=2)
    coords = np.stack([idx % w, idx // w], axis=-1).astype(np.float32)
    coords *= maxvals > 0
    return coords, maxvals.astype(np.float32)


def refine_quarter(heatmaps: Heatmaps, coords: np.ndarray) -> np.ndarray:
    """SimpleBaseline's refinement: a quarter pixel toward the higher neighbour, per axis.

    (SimpleBaseline skips x = 1 and y = 1 by an off-by-one; here every pixel with two
    neighbours on the axis is refined.)
    """
    hm = _numpy(heatmaps)
    n, j, h, w = hm.shape
    out = coords.astype(np.float32).copy()
    x = np.floor(coords[..., 0] + 0.5).astype(np.int64)
    y = np.floor(coords[..., 1] + 0.5).astype(np.int64)
    ni, ji = np.meshgrid(np.arange(n), np.arange(j), indexing="ij")
    ok_x = (x > 0) & (x < w - 1) & (y >= 0) & (y < h)
    ok_y = (y > 0) & (y < h - 1) & (x >= 0) & (x < w)
    xc, yc = np.clip(x, 1, w - 2), np.clip(y, 1, h - 2)
    xs, ys = np.clip(x, 0, w - 1), np.clip(y, 0, h - 1)
    dx = hm[ni, ji, ys, xc + 1] - hm[ni, ji, ys, xc - 1]
    dy = hm[ni, ji, yc + 1, xs] - hm[ni, ji, yc - 1, xs]
    out[..., 0] += np.where(ok_x, np.sign(dx) * 0.25, 0.0)
    out[..., 1] += np.where(ok_y, np.sign(dy) * 0.25, 0.0)
    return out


def _gaussian_blur(hm: np.ndarray, sigma: float) -> np.ndarray:
    radius = int(3 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    n, j, h, w = hm.shape
    x = torch.from_numpy(hm).reshape(n * j, 1, h, w)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return x.reshape(n, j, h, w).numpy()


def refine_taylor(
    heatmaps: Heatmaps, coords: np.ndarray, blur_sigma: float | None = None
) -> np.ndarray:
    """DARK's sub-pixel step (Zhang et al., CVPR 2020): one Newton step on the log heatmap.

    Exact for a Gaussian target, whatever its sub-pixel centre. For network outputs pass
    blur_sigma (DARK smooths with the target's sigma first, keeping each map's maximum).
    Where the log heatmap is not concave at the peak, or the peak is on the border, falls back
    to the quarter-pixel rule.
    """
    hm = _numpy(heatmaps)
    if blur_sigma:
        peak = hm.max(axis=(2, 3), keepdims=True)
        hm = _gaussian_blur(hm, blur_sigma)
        hm = hm * peak / np.maximum(hm.max(axis=(2, 3), keepdims=True), 1e-12)
    n, j, h, w = hm.shape
    log = np.log(np.maximum(hm, 1e-10))
    x = np.floor(coords[..., 0] + 0.5).astype(np.int64)
    y = np.floor(coords[..., 1] + 0.5).astype(np.int64)
    inner = (x > 0) & (x < w - 1) & (y > 0) & (y < h - 1)
    xc, yc = np.clip(x, 1, w - 2), np.clip(y, 1, h - 2)
    ni, ji = np.meshgrid(np.arange(n), np.arange(j), indexing="ij")

    def at(dx: int, dy: int) -> np.ndarray:
        return log[ni, ji, yc + dy, xc + dx].astype(np.float64)

    c = at(0, 0)
    gx = 0.5 * (at(1, 0) - at(-1, 0))
    gy = 0.5 * (at(0, 1) - at(0, -1))
    hxx = at(1, 0) - 2 * c + at(-1, 0)
    hyy = at(0, 1) - 2 * c + at(0, -1)
    hxy = 0.25 * (at(1, 1) - at(-1, 1) - at(1, -1) + at(-1, -1))
    det = hxx * hyy - hxy**2
    concave = inner & (det > 1e-12) & (hxx < 0)
    safe = np.where(concave, det, 1.0)
    ox = -(hyy * gx - hxy * gy) / safe
    oy = -(-hxy * gx + hxx * gy) / safe
    good = concave & (np.abs(ox) <= 1) & (np.abs(oy) <= 1)
    out = refine_quarter(hm, coords)
    out[..., 0] = np.where(good, x + ox, out[..., 0])
    out[..., 1] = np.where(good, y + oy, out[..., 1])
    return out.astype(np.float32)


def heatmaps_to_image_coords(
    heatmaps: Heatmaps,
    centers: np.ndarray | torch.Tensor,
    scales: np.ndarray | torch.Tensor,
    input_size: int,
    refine: str = "quarter",
) -> np.ndarray:
    """(N, J, 2) joint positions in original-image pixels.

    refine: "quarter" (SimpleBaseline), "dark" (Taylor step after a sigma-2 blur), "taylor"
    (no blur: exact on clean Gaussian maps) or "none" (plain argmax).
    """
    hm = _numpy(heatmaps)
    coords, _ = get_max_preds(hm)
    if refine == "quarter":
        coords = refine_quarter(hm, coords)
    elif refine == "dark":
        coords = refine_taylor(hm, coords, blur_sigma=2.0)
    elif refine == "taylor":
        coords = refine_taylor(hm, coords)
    elif refine != "none":
        raise ValueError(f"refine must be quarter, dark, taylor or none, got {refine!r}")
    centers = _numpy(centers).reshape(-1, 2)
    scales = _numpy(scales).reshape(-1)
    heatmap_size = hm.shape[-1]
    if hm.shape[-2] != heatmap_size or input_size % heatmap_size:
        raise ValueError(f"heatmaps {hm.shape[-2:]} are not a square fraction of {input_size}")
    out = np.empty(coords.shape, dtype=np.float64)
    for i in range(len(coords)):
        out[i] = crop_to_image(coords[i], centers[i], float(scales[i]), heatmap_size)
    return out


def flip_permutation(flip_pairs: Sequence[tuple[int, int]], num_joints: int) -> list[int]:
    perm = list(range(num_joints))
    for a, b in flip_pairs:
        perm[a], perm[b] = b, a
    return perm


def flip_back(heatmaps: Heatmaps, flip_pairs: Sequence[tuple[int, int]]) -> Heatmaps:
    """Heatmaps of a mirrored input, turned into heatmaps of the original: mirror along x and
    swap left/right channels. Its own inverse."""
    perm = flip_permutation(flip_pairs, heatmaps.shape[1])
    if isinstance(heatmaps, torch.Tensor):
        return torch.flip(heatmaps, dims=[-1])[:, perm]
    return np.ascontiguousarray(np.asarray(heatmaps)[:, perm, :, ::-1])


def predict(
    model: torch.nn.Module,
    images: torch.Tensor,
    flip_pairs: Sequence[tuple[int, int]],
    flip_test: bool = True,
) -> torch.Tensor:
    """Model heatmaps, averaged with those of the mirrored images when flip_test.

    Runs in the model's current mode and grad state; callers evaluating use eval() and
    torch.inference_mode().
    """
    out = model(images)
    if flip_test:
        flipped = model(torch.flip(images, dims=[-1]))
        out = 0.5 * (out + flip_back(flipped, flip_pairs))
    return out
