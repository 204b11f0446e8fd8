"""COCO keypoint AP: the OKS-based AP, AP50, AP75, APm, APl and AR of pycocotools' COCOeval.

Object keypoint similarity between a predicted and an annotated person with area s (pixels²):
OKS = mean over the annotated keypoints i of exp(-d_i² / (2 s (2 σ_i)²)), with σ_i COCO's
per-keypoint constants (pycocotools' `kpt_oks_sigmas`, measured by COCO from the spread of
repeated human labels on 5000 images). AP is the precision averaged over OKS thresholds
0.50:0.05:0.95 and 101 recall points, as COCOeval computes it with iouType "keypoints".

Only the 17-keypoint COCO skeleton has such constants. For other skeletons (synth-arm, LSP,
MPII) AP is not reported: picking σ for them would make a number that looks like COCO AP and
compares to nothing. Their metric stays PCK.

Top-down with ground-truth boxes, as SimpleBaseline's "use_gt_bbox" evaluation: one prediction
per annotated person, scored by the mean heatmap peak of its keypoints above 0.2 (times the box
score, 1 for a ground-truth box), then OKS non-maximum suppression at 0.9 per image.
Ground truth is the annotation file itself, so crowd regions and people without keypoints are
treated as COCOeval treats them (ignored). An annotation without "area" (own data) gets its
box area, without "num_keypoints" the count of its labelled keypoints.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from fedpose.config import DataConfig
from fedpose.data import coco_split_files
from fedpose.data.records import COCO, DatasetError, PoseRecord, Skeleton, read_json
from fedpose.files import write_atomically

AP_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR")
# COCO's per-keypoint OKS constants, in the order of the COCO skeleton (pycocotools' values)
COCO_SIGMAS = (
    np.array(
        [
            0.26,
            0.25,
            0.25,
            0.35,
            0.35,
            0.79,
            0.79,
            0.72,
            0.72,
            0.62,
            0.62,
            1.07,
            1.07,
            0.87,
            0.87,
            0.89,
            0.89,
        ]
    )
    / 10.0
)
# SimpleBaseline's rescoring and NMS settings
VISIBLE_CONFIDENCE = 0.2
NMS_OKS = 0.9
_EPS = np.spacing(1)
# PCK of a results list: a result claims a person only within this mean distance of the
# person's labelled keypoints, in units of the PCK normaliser (the person box's longest side)
MATCH_GATE = 0.5


def has_keypoint_ap(skeleton: Skeleton) -> bool:
    """True for the COCO skeleton, the only one with OKS constants (see the module notes)."""
    return skeleton.joints == COCO.joints


def oks(
    pred: np.ndarray,
    gt: np.ndarray,
    labelled: np.ndarray,
    area: float,
    sigmas: np.ndarray = COCO_SIGMAS,
) -> float:
    """OKS of one predicted person (K, 2) against one annotated person (K, 2) with
    labelled (K,) > 0 marking the keypoints that count; nan when none is labelled."""
    keep = np.asarray(labelled) > 0
    if not keep.any():
        return float("nan")
    d2 = ((np.asarray(pred, float) - np.asarray(gt, float)) ** 2).sum(axis=1)
    e = d2 / (2.0 * (2.0 * sigmas) ** 2 * (area + _EPS))
    return float(np.exp(-e[keep]).mean())


def rescore(confidence: np.ndarray, threshold: float = VISIBLE_CONFIDENCE) -> np.ndarray:
    """(N,) person scores from (N, K) keypoint confidences: the mean of those above threshold,
    0 where none is (SimpleBaseline's keypoint rescoring with a box score of 1)."""
    conf = np.asarray(confidence, dtype=np.float64)
    above = conf > threshold
    total = np.where(above, conf, 0.0).sum(axis=1)
    count = above.sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def oks_nms(
    keypoints: np.ndarray, scores: np.ndarray, areas: np.ndarray, threshold: float = NMS_OKS
) -> list[int]:
    """Indices kept by greedy OKS suppression, best score first: a person (K, 2) is dropped when
    its OKS against a kept one exceeds threshold. As SimpleBaseline's, this OKS takes the mean
    of the two areas as the scale and counts every keypoint."""
    keypoints = np.asarray(keypoints, dtype=np.float64)
    areas = np.asarray(areas, dtype=np.float64)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    kept: list[int] = []
    while order.size:
        best, rest = int(order[0]), order[1:]
        kept.append(best)
        d2 = ((keypoints[rest] - keypoints[best]) ** 2).sum(axis=2)
        scale = (areas[rest] + areas[best])[:, None] / 2.0
        similarity = np.exp(-d2 / (2.0 * (2.0 * COCO_SIGMAS) ** 2 * (scale + _EPS))).mean(axis=1)
        order = rest[similarity <= threshold]
    return kept


def load_ground_truth(ann_file: str | Path) -> dict:
    """A COCO annotation file as COCOeval needs it (the file itself is not changed)."""
    ann_file = Path(ann_file)
    data = read_json(ann_file)
    if not isinstance(data, dict) or not all(
        isinstance(data.get(key), list) for key in ("images", "annotations")
    ):
        raise DatasetError(ann_file, "not a COCO file: needs 'images' and 'annotations' lists")
    next_id = 1 + max(
        (
            a["id"]
            for a in data["annotations"]
            if isinstance(a, dict) and isinstance(a.get("id"), int)
        ),
        default=0,
    )
    for index, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("keypoints"), list):
            raise DatasetError(ann_file, "annotation without keypoints", f"annotations[{index}]")
        flags = ann["keypoints"][2::3]
        ann.setdefault("num_keypoints", sum(1 for v in flags if v))
        ann.setdefault("iscrowd", 0)
        ann.setdefault("bbox", [0.0, 0.0, 0.0, 0.0])
        if not isinstance(ann.get("area"), int | float):
            try:
                ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
            except (TypeError, ValueError, IndexError):
                problem = "needs an area or a bbox [x, y, w, h]"
                raise DatasetError(ann_file, problem, f"annotations[{index}]") from None
        if "id" not in ann:
            ann["id"], next_id = next_id, next_id + 1
    # the loader reads a file without categories as one of people; one with categories ignores
    # annotations without a category id (None here: in no category, so COCOeval skips them too)
    unfiled = None if data.get("categories") else 1
    for ann in data["annotations"]:
        ann.setdefault("category_id", unfiled)
    if not data.get("categories"):
        ids = sorted({a["category_id"] for a in data["annotations"]})
        data["categories"] = [{"id": i, "name": "person"} for i in ids]
    return data


def image_ids_by_path(ground_truth: dict, image_dir: str | Path) -> dict[Path, object]:
    """image_dir / file_name -> image id, the way the COCO loader names record images."""
    image_dir = Path(image_dir)
    return {image_dir / entry["file_name"]: entry["id"] for entry in ground_truth["images"]}


def results_from_predictions(
    records: Sequence[PoseRecord],
    preds: np.ndarray,
    image_ids: dict[Path, object],
    confidence: np.ndarray | None = None,
    category_id: int = 1,
    nms: bool = True,
) -> list[dict]:
    """COCO results, one per record: (N, K, 2) predictions, scored by `rescore(confidence)`
    (score 1 without confidences) and, with confidences and nms, OKS-suppressed per image."""
    preds = np.asarray(preds, dtype=np.float64)
    n, k = preds.shape[:2]
    conf = np.ones((n, k)) if confidence is None else np.asarray(confidence, dtype=np.float64)
    scores = rescore(conf) if confidence is not None else np.ones(n)
    keep = list(range(n))
    if confidence is not None and nms:
        by_image: dict[object, list[int]] = defaultdict(list)
        for i, rec in enumerate(records):
            by_image[image_ids[Path(rec.image)]].append(i)
        # SimpleBaseline's person area for NMS: the square crop, (200 * scale)²
        areas = np.array([(200.0 * r.scale) ** 2 for r in records])
        keep = sorted(
            idx[j]
            for idx in by_image.values()
            for j in oks_nms(preds[idx], scores[idx], areas[idx])
        )
    results = []
    for i in keep:
        flat = np.concatenate([preds[i], conf[i][:, None]], axis=1).reshape(-1)
        results.append(
            {
                "image_id": image_ids[Path(records[i].image)],
                "category_id": category_id,
                "keypoints": [float(v) for v in flat],
                "score": float(scores[i]),
            }
        )
    return results


def person_category(ground_truth: dict) -> int:
    """The category id predictions are filed under: the one named person, else the only one."""
    cats = ground_truth["categories"]
    named = [c["id"] for c in cats if c.get("name") == "person"]
    return named[0] if named else cats[0]["id"]


def is_results_list(pred_file: str | Path) -> bool:
    """Whether a predictions file holds COCO results (a JSON list) rather than an object."""
    data = read_json(pred_file)
    return isinstance(data, list)


def read_results(pred_file: str | Path, ground_truth: dict) -> list[dict]:
    """A COCO keypoint results file, checked entry by entry against the ground truth."""
    pred_file = Path(pred_file)
    data = read_json(pred_file)
    if not isinstance(data, list):
        raise DatasetError(
            pred_file, "COCO results must be a list of {image_id, category_id, keypoints, score}"
        )
    if not data:
        raise DatasetError(pred_file, "no results in the file")
    images = {entry["id"] for entry in ground_truth["images"]}
    categories = {c["id"] for c in ground_truth["categories"]}
    k = COCO.num_joints
    out = []
    for index, entry in enumerate(data):
        where = f"results[{index}]"
        if not isinstance(entry, dict):
            raise DatasetError(pred_file, "a result must be an object", where)
        missing = [
            key for key in ("image_id", "category_id", "keypoints", "score") if key not in entry
        ]
        if missing:
            raise DatasetError(pred_file, f"missing {', '.join(missing)}", where)
        if not isinstance(entry["image_id"], int | str) or entry["image_id"] not in images:
            problem = f"image_id {entry['image_id']!r:.40} is not in the annotation file"
            raise DatasetError(pred_file, problem, where)
        if entry["category_id"] not in categories:
            problem = f"category_id {entry['category_id']!r:.40} is not in the annotation file"
            raise DatasetError(pred_file, problem, where)
        kps = entry["keypoints"]
        if not isinstance(kps, list) or len(kps) != 3 * k or not all(_finite(v) for v in kps):
            problem = f"keypoints must be {3 * k} finite numbers [x, y, v] * {k}"
            raise DatasetError(pred_file, problem, where)
        if not _finite(entry["score"]):
            raise DatasetError(pred_file, "score must be a finite number", where)
        out.append(
            {
                "image_id": entry["image_id"],
                "category_id": entry["category_id"],
                "keypoints": [float(v) for v in kps],
                "score": float(entry["score"]),
            }
        )
    return out


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def match_results(
    records: Sequence[PoseRecord],
    results: Sequence[dict],
    image_ids: dict[Path, object],
    skeleton: Skeleton,
) -> np.ndarray:
    """(N, K, 2) predictions per record from COCO results, for PCK; nan where unmatched.

    As COCO's own evaluation matches detections to people: image by image, exact duplicates
    dropped, results are taken best score first (ties in file order) and each claims the
    unclaimed annotated person it is closest to, only if it lies within the gate: a mean
    distance over the person's labelled keypoints of at most MATCH_GATE times the PCK
    normaliser (the longest side of the person box). So a far result (a duplicate of another
    person, a prediction for a person without labels) claims nobody's slot, and exact
    predictions score 100. A person no result claims has no prediction: each of its joints
    counts as a miss.
    """
    from fedpose.metrics.pck import pck_normalizers

    norm = pck_normalizers(records, skeleton)
    norm = np.where(norm > 0, norm, 1.0)
    people: dict[object, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        people[image_ids[Path(rec.image)]].append(i)
    out = np.full((len(records), skeleton.num_joints, 2), np.nan)
    claimed: set[int] = set()
    seen: set[tuple] = set()
    order = sorted(range(len(results)), key=lambda i: -results[i]["score"])
    for r in order:
        key = (results[r]["image_id"], tuple(results[r]["keypoints"]))
        if key in seen:  # an exact duplicate: one person predicted twice
            continue
        seen.add(key)
        candidates = [i for i in people.get(results[r]["image_id"], ()) if i not in claimed]
        if not candidates:
            continue
        kps = np.asarray(results[r]["keypoints"], dtype=np.float64).reshape(-1, 3)[:, :2]
        costs = []
        for i in candidates:
            labelled = records[i].visibility > 0
            dist = np.linalg.norm(kps - records[i].joints, axis=1)[labelled] / norm[i]
            costs.append(dist.mean() if dist.size else np.inf)
        if min(costs) > MATCH_GATE:
            continue  # nobody's: a false positive, as COCO counts one
        best = candidates[int(np.argmin(costs))]
        claimed.add(best)
        out[best] = kps
    return out


def keypoint_ap(
    ground_truth: dict, results: Sequence[dict], image_ids: Iterable | None = None
) -> dict[str, float]:
    """AP, AP50, AP75, APm, APl and AR from pycocotools' COCOeval (iouType "keypoints") over
    `image_ids` (default: every image of the ground truth). A value is nan where the ground
    truth has no person in that area range (COCOeval's -1)."""
    from pycocotools.coco import COCO as CocoApi
    from pycocotools.cocoeval import COCOeval

    if not results:
        return dict.fromkeys(AP_NAMES, 0.0)
    # pycocotools prints progress; fedpose's output is its own lines only
    with contextlib.redirect_stdout(io.StringIO()):
        gt = CocoApi()
        gt.dataset = copy.deepcopy(ground_truth)
        gt.createIndex()
        dt = gt.loadRes(copy.deepcopy(list(results)))
        evaluator = COCOeval(gt, dt, iouType="keypoints")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(set(image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats  # AP, AP50, AP75, APm, APl, AR, AR50, AR75, ARm, ARl
    picked = (stats[0], stats[1], stats[2], stats[3], stats[4], stats[5])
    return {
        name: (float(v) if v >= 0 else float("nan"))
        for name, v in zip(AP_NAMES, picked, strict=True)
    }


def predictions_ap(
    records: Sequence[PoseRecord],
    preds: np.ndarray,
    confidence: np.ndarray | None,
    ann_file: str | Path,
    image_dir: str | Path,
) -> dict[str, float]:
    """COCO keypoint AP of per-record predictions (top-down on ground-truth boxes) over the
    images those records come from, against the annotation file they were loaded from."""
    ground_truth, results, image_ids = _scored_results(
        records, preds, confidence, ann_file, image_dir
    )
    return keypoint_ap(ground_truth, results, image_ids)


def _scored_results(
    records: Sequence[PoseRecord],
    preds: np.ndarray,
    confidence: np.ndarray | None,
    ann_file: str | Path,
    image_dir: str | Path,
) -> tuple[dict, list[dict], list]:
    """(ground truth, COCO results, the records' image ids): the results exactly as AP scores
    them, rescored and OKS-suppressed."""
    ground_truth = load_ground_truth(ann_file)
    ids = image_ids_by_path(ground_truth, image_dir)
    unknown = [r for r in records if Path(r.image) not in ids]
    if unknown:
        raise DatasetError(
            ann_file, f"image {unknown[0].image} is not in this file", unknown[0].record_id or None
        )
    results = results_from_predictions(
        records, preds, ids, confidence, category_id=person_category(ground_truth)
    )
    return ground_truth, results, [ids[Path(r.image)] for r in records]


def write_split_results(
    out_file: str | Path,
    records: Sequence[PoseRecord],
    preds: np.ndarray,
    confidence: np.ndarray | None,
    data: DataConfig,
    split: str,
) -> Path:
    """Write a coco dataset split's predictions as a COCO keypoint results file
    (`[{image_id, category_id, keypoints, score}]`, image ids of the split's annotation file):
    the very results `split_ap` scores, so pycocotools or another tool can score them again."""
    ann, image_dir = coco_split_files(data, split)
    _, results, _ = _scored_results(records, preds, confidence, ann, image_dir)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out_file, lambda tmp: tmp.write_text(json.dumps(results)))
    return out_file


def split_ap(
    records: Sequence[PoseRecord],
    preds: np.ndarray,
    confidence: np.ndarray | None,
    data: DataConfig,
    split: str,
) -> dict[str, float]:
    """COCO keypoint AP of predictions for a `coco` dataset's train or test records, against
    the annotation file that split was loaded from (test_ann for test when set, else ann)."""
    ann, image_dir = coco_split_files(data, split)
    return predictions_ap(records, preds, confidence, ann, image_dir)
