"""Heatmap accuracy: PCK between the argmax of predicted and target heatmaps.

Two conventions:

- "simplebaseline" (default, SimpleBaseline's `accuracy`): distances divided by (H/10, W/10),
  correct when < thr = 0.5, i.e. within 5 % of the heatmap side; a target whose argmax has
  x <= 1 or y <= 1 (SimpleBaseline's "no target" test, which also drops real joints on the
  first two rows and columns) is ignored.
- "mmpose" (mmpose 1.x `pose_pck_accuracy`): distances divided by `normalize` (default (H, W)
  per sample), thr = 0.05, joints ignored only by `mask`; a map whose maximum is not positive
  has argmax (-1, -1); a sample with a zero normaliser is ignored, a negative one becomes 1e6.

In both, `normalize` divides (x, y) in that order, even though both default it to (H, W): the
two agree on square heatmaps only, and fedpose's are square.
"""

from __future__ import annotations

import numpy as np
import torch

CONVENTIONS = ("simplebaseline", "mmpose")


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _argmax(heatmaps: np.ndarray, missing: float) -> np.ndarray:
    n, k, h, w = heatmaps.shape
    flat = heatmaps.reshape(n, k, h * w)
    idx = flat.argmax(axis=2)
    vals = flat.max(axis=2)
    locs = np.stack([idx % w, idx // w], axis=-1).astype(np.float32)
    locs[vals <= 0] = missing
    return locs


def heatmap_hits(
    output: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    thr: float | None = None,
    normalize: np.ndarray | None = None,
    mask: np.ndarray | torch.Tensor | None = None,
    convention: str = "simplebaseline",
) -> tuple[np.ndarray, np.ndarray]:
    """Per-joint (hits, counted) (K,) of heatmap accuracy; counts of disjoint batches add up.
    Arguments as for `heatmap_accuracy`."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    out = _numpy(output)
    tgt = _numpy(target)
    n, k, h, w = out.shape
    mmpose = convention == "mmpose"
    if thr is None:
        thr = 0.05 if mmpose else 0.5
    if normalize is None:
        base = np.array([h, w], dtype=np.float64) if mmpose else np.array([h, w]) / 10.0
        normalize = np.tile(base, (n, 1))
    normalize = np.array(normalize, dtype=np.float64).reshape(n, 2)
    valid = np.ones((n, k), dtype=bool) if mask is None else _numpy(mask).reshape(n, k) > 0

    if mmpose:
        pred, gt = _argmax(out, -1.0), _argmax(tgt, -1.0)
        valid = valid & ~(normalize == 0).any(axis=1)[:, None]
        normalize[normalize <= 0] = 1e6
    else:
        pred, gt = _argmax(out, 0.0), _argmax(tgt, 0.0)
        valid = valid & (gt[..., 0] > 1) & (gt[..., 1] > 1)

    dist = np.linalg.norm((pred - gt) / normalize[:, None, :], axis=-1)
    if mmpose:
        dist = dist.astype(np.float32)  # mmpose stores its distances in float32
    counted = valid.sum(axis=0)
    hits = (valid & (dist < thr)).sum(axis=0)
    return hits, counted


def heatmap_accuracy(
    output: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    thr: float | None = None,
    normalize: np.ndarray | None = None,
    mask: np.ndarray | torch.Tensor | None = None,
    convention: str = "simplebaseline",
) -> tuple[np.ndarray, float, int]:
    """(per-joint accuracy (K,) with -1 where no joint counts, mean over the others, their count).

    output, target: (N, K, H, W). thr defaults to the convention's (0.5 or 0.05); normalize:
    (N, 2) dividing (x, y); mask: (N, K), False = ignore (e.g. target_weight > 0).
    """
    if _numpy(output).shape[1] == 0:
        return np.zeros(0, dtype=np.float64), 0.0, 0
    hits, counted = heatmap_hits(output, target, thr, normalize, mask, convention)
    acc = np.where(counted > 0, hits / np.maximum(counted, 1), -1.0)
    good = acc >= 0
    cnt = int(good.sum())
    avg = float(acc[good].mean()) if cnt else 0.0
    return acc, avg, cnt
