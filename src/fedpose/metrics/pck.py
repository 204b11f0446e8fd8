"""PCK (percentage of correct keypoints) with each dataset's own normaliser and mean.

- torso (LSP, PCK@0.2): distance between the ground-truth torso joints (L-shoulder, R-hip);
- head (MPII, PCKh@0.5): 0.6 x the head-box diagonal, as MPII's official evaluation (SC_BIAS);
- bbox (COCO, synth-arm): the longest side of the person box.

A joint counts when it is labelled and its record's normaliser is positive; it is correct when
||pred - gt|| / normaliser <= alpha. The standard mean is the official MPII one: the per-joint
PCK weighted by each joint's count (jnt_ratio), over the joints not excluded (MPII drops pelvis
and thorax), which is simply correct / counted over those joints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedpose.data.records import PoseRecord, Skeleton

MPII_SC_BIAS = 0.6


def pck_normalizers(records: Sequence[PoseRecord], skeleton: Skeleton) -> np.ndarray:
    """(N,) normalising lengths in pixels; 0 where the record cannot be normalised (a torso joint
    unlabelled, no head box, no person box), which leaves the record out of the score."""
    out = np.zeros(len(records), dtype=np.float64)
    kind = skeleton.normalizer
    if kind == "torso" and skeleton.torso_joints is None:
        raise ValueError(f"skeleton {skeleton.name} has normalizer torso but no torso_joints")
    for i, rec in enumerate(records):
        if kind == "torso":
            a, b = skeleton.torso_joints
            if rec.visibility[a] > 0 and rec.visibility[b] > 0:
                out[i] = np.linalg.norm(np.asarray(rec.joints[a], float) - rec.joints[b])
        elif kind == "head":
            if rec.head_box is not None:
                box = np.asarray(rec.head_box, dtype=np.float64)
                out[i] = MPII_SC_BIAS * np.linalg.norm(box[2:4] - box[0:2])
        elif kind == "bbox":
            if rec.person_box is not None:
                box = np.asarray(rec.person_box, dtype=np.float64)
                out[i] = max(box[2] - box[0], box[3] - box[1])
        else:
            raise ValueError(f"unknown PCK normalizer {kind!r} (torso | head | bbox)")
    return out


def pck(
    pred: np.ndarray, gt: np.ndarray, visible: np.ndarray, norm: np.ndarray, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-joint PCK as a fraction (J,) (nan where no joint counts) and per-joint counts (J,).

    pred, gt: (N, J, 2); visible: (N, J), > 0 = labelled; norm: (N,).
    """
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    norm = np.asarray(norm, dtype=np.float64).reshape(-1)
    counted = (np.asarray(visible) > 0) & (norm[:, None] > 0)
    dist = np.linalg.norm(pred - gt, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        correct = counted & (dist / np.where(norm > 0, norm, 1.0)[:, None] <= alpha)
    count = counted.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = np.where(count > 0, correct.sum(axis=0) / np.maximum(count, 1), np.nan)
    return acc, count


@dataclass
class PCKResult:
    """Per-joint PCK in %, the dataset's standard mean in %, and per-joint counts."""

    per_joint: dict[str, float]
    mean: float
    counts: dict[str, int]
    alpha: float
    normalizer: str
    excluded: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {
            "per_joint": dict(self.per_joint),
            "mean": self.mean,
            "counts": dict(self.counts),
            "alpha": self.alpha,
            "normalizer": self.normalizer,
            "excluded": list(self.excluded),
        }


def pck_counts(
    pred: np.ndarray,
    records: Sequence[PoseRecord],
    skeleton: Skeleton,
    alpha: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-joint (correct, counted) integer counts (J,) of predictions (N, J, 2).

    Counts of disjoint record sets add up: summing them over sites and scoring the sums with
    `score_counts` gives exactly the PCK of all the records together."""
    alpha = skeleton.pck_alpha if alpha is None else float(alpha)
    if not (np.isfinite(alpha) and 0 < alpha <= 1):
        raise ValueError(f"PCK threshold alpha {alpha!r} is out of range; allowed: (0, 1]")
    pred = np.asarray(pred, dtype=np.float64)
    if pred.shape != (len(records), skeleton.num_joints, 2):
        raise ValueError(
            f"predictions have shape {pred.shape}, expected ({len(records)}, "
            f"{skeleton.num_joints}, 2)"
        )
    if not records:
        zeros = np.zeros(skeleton.num_joints, dtype=np.int64)
        return zeros, zeros.copy()
    gt = np.stack([np.asarray(r.joints, dtype=np.float64) for r in records])
    visible = np.stack([np.asarray(r.visibility) for r in records])
    norm = pck_normalizers(records, skeleton)
    counted = (visible > 0) & (norm[:, None] > 0)
    dist = np.linalg.norm(pred - gt, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        correct = counted & (dist / np.where(norm > 0, norm, 1.0)[:, None] <= alpha)
    return correct.sum(axis=0).astype(np.int64), counted.sum(axis=0).astype(np.int64)


def score_counts(
    correct: np.ndarray, counted: np.ndarray, skeleton: Skeleton, alpha: float | None = None
) -> PCKResult:
    """PCK from per-joint (correct, counted) counts, with the skeleton's standard mean."""
    alpha = skeleton.pck_alpha if alpha is None else float(alpha)
    correct = np.asarray(correct, dtype=np.int64)
    count = np.asarray(counted, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = np.where(count > 0, correct / np.maximum(count, 1), np.nan)
    keep = np.ones(skeleton.num_joints, dtype=bool)
    keep[list(skeleton.excluded_from_mean)] = False
    total = count[keep].sum()
    # jnt_ratio weighting: sum_j acc_j * count_j / sum count = correct / counted
    mean = float(np.nansum(acc[keep] * count[keep]) / total * 100) if total else float("nan")
    return PCKResult(
        per_joint={n: float(a * 100) for n, a in zip(skeleton.joints, acc, strict=True)},
        mean=mean,
        counts={n: int(c) for n, c in zip(skeleton.joints, count, strict=True)},
        alpha=alpha,
        normalizer=skeleton.normalizer,
        excluded=tuple(skeleton.joints[i] for i in skeleton.excluded_from_mean),
    )


def score(
    pred: np.ndarray,
    records: Sequence[PoseRecord],
    skeleton: Skeleton,
    alpha: float | None = None,
) -> PCKResult:
    """PCK of predictions (N, J, 2) against the records, with the skeleton's normaliser and mean.

    A set of which no record can be normalised (MPII without head boxes) is an error, not a
    mean of nan; a site's share of a set (`pck_counts`) may legitimately have none."""
    correct, counted = pck_counts(pred, records, skeleton, alpha)
    if len(records) and not counted.any() and not pck_normalizers(records, skeleton).any():
        need = {
            "head": "head boxes (MPII: gt_valid.mat as --headboxes / data.headboxes)",
            "bbox": "person boxes",
            "torso": "both torso joints labelled",
        }[skeleton.normalizer]
        raise ValueError(
            f"none of the {len(records)} records can be scored: {skeleton.name} PCK needs {need}"
        )
    return score_counts(correct, counted, skeleton, alpha)


# Report groups: name -> joints averaged (plain mean of left and right, as MPII's script)
_LIMBS: list[tuple[str, tuple[str, ...]]] = [
    ("Shoulder", ("l_shoulder", "r_shoulder")),
    ("Elbow", ("l_elbow", "r_elbow")),
    ("Wrist", ("l_wrist", "r_wrist")),
    ("Hip", ("l_hip", "r_hip")),
    ("Knee", ("l_knee", "r_knee")),
    ("Ankle", ("l_ankle", "r_ankle")),
]
_GROUPS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "lsp": [("Head", ("neck", "head_top")), *_LIMBS],
    # the official MPII script reports Head as head_top alone
    "mpii": [("Head", ("head_top",)), *_LIMBS],
}


def _groups(skeleton: Skeleton) -> list[tuple[str, tuple[str, ...]]]:
    if skeleton.name in _GROUPS:
        return _GROUPS[skeleton.name]
    groups: dict[str, list[str]] = {}
    for name in skeleton.joints:
        part = name.removeprefix("l_").removeprefix("r_")
        groups.setdefault(part, []).append(name)
    return [(part.replace("_", " ").capitalize(), tuple(js)) for part, js in groups.items()]


def grouped_table(result: PCKResult, skeleton: Skeleton) -> list[tuple[str, float]]:
    """Rows (part, PCK %) with left and right averaged, then ("Mean", standard mean)."""
    rows = []
    for part, joints in _groups(skeleton):
        values = [result.per_joint[j] for j in joints if not np.isnan(result.per_joint[j])]
        rows.append((part, float(np.mean(values)) if values else float("nan")))
    rows.append(("Mean", result.mean))
    return rows


def render_table(
    results: PCKResult | Mapping[str, PCKResult], skeleton: Skeleton, title: str | None = None
):
    """A rich Table of grouped PCK, one column per result (e.g. per method)."""
    from rich.table import Table

    if isinstance(results, PCKResult):
        results = {"PCK": results}
    first = next(iter(results.values()))
    label = "PCKh" if first.normalizer == "head" else "PCK"
    table = Table(title=title or f"{label}@{first.alpha:g} ({skeleton.name})")
    table.add_column("Part")
    for name in results:
        table.add_column(name, justify="right")
    columns = [grouped_table(r, skeleton) for r in results.values()]
    for i, (part, _) in enumerate(columns[0]):
        cells = [f"{col[i][1]:.2f}" if not np.isnan(col[i][1]) else "-" for col in columns]
        table.add_row(part, *cells, end_section=(i == len(columns[0]) - 2))
    return table
