"""COCO person_keypoints files: reading them into records and writing records back out."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from fedpose.data.records import (
    DatasetError,
    PoseRecord,
    Skeleton,
    check_geometry,
    check_joints,
    numbers,
    read_image_size,
    read_json,
)
from fedpose.files import write_atomically

# SimpleBaseline convention: the crop is 1.25 x the person box, with scale in units of 200 px.
BOX_PADDING = 1.25
PIXEL_STD = 200.0
COCO_KEYPOINTS = 17  # a person_keypoints file that names no keypoints is COCO's 17
# Attribute keys that the loader derives from the keypoint flags rather than from "attributes".
DERIVED_ATTRIBUTES = ("occluded",)


# why load_coco passes over an annotation, as `fedpose data inspect` counts them
SKIP_CROWD = "crowd (iscrowd)"
SKIP_CATEGORY = "not the person category"
SKIP_NO_KEYPOINTS = "no labelled keypoint"


def load_coco(
    ann_file: str | Path, image_dir: str | Path, skipped: Counter | None = None
) -> list[PoseRecord]:
    """Load every annotated, non-crowd person of a COCO person_keypoints file.

    `skipped`, when given, counts the annotations passed over by reason (SKIP_*).

    The number of keypoints K comes from the file and must be the same for every annotation;
    the caller picks the skeleton. v = 0 gives visibility 0; v = 1 (labelled but hidden) and v = 2
    give visibility 1, and attributes["occluded"] marks v = 1. Entries of an annotation's
    "attributes" object, and a top-level "view", become record attributes.
    """
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    data = read_json(ann_file)
    if not isinstance(data, dict) or not all(
        isinstance(data.get(key), list) for key in ("images", "annotations")
    ):
        raise DatasetError(ann_file, "not a COCO file: needs 'images' and 'annotations' lists")
    images = _images(ann_file, data["images"])
    person_ids = _person_category_ids(ann_file, data.get("categories"))
    declared = _declared_keypoints(data.get("categories"), person_ids)

    records: list[PoseRecord] = []
    num_keypoints: int | None = None
    sizes: dict[int, tuple[int, int]] = {}
    seen_ids: set = set()
    tally = skipped if skipped is not None else Counter()
    for index, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DatasetError(ann_file, "annotation must be an object", f"annotations[{index}]")
        record_id = f"annotation {ann.get('id', f'#{index}')}"
        _check_unique_id(ann_file, ann, index, seen_ids)
        reason = SKIP_CROWD if ann.get("iscrowd") else ""
        reason = reason if _wanted(ann, person_ids) else SKIP_CATEGORY
        if reason:
            tally[reason] += 1
            continue
        kps = _keypoints(ann_file, ann.get("keypoints"), record_id)
        if num_keypoints is None:
            num_keypoints = len(kps)
            _check_keypoint_count(ann_file, len(kps), declared, record_id)
        elif len(kps) != num_keypoints:
            problem = f"has {len(kps)} keypoints; earlier annotations have {num_keypoints}"
            raise DatasetError(ann_file, problem, record_id)
        labelled = kps[:, 2] > 0
        if ann.get("num_keypoints") == 0 or not labelled.any():
            tally[SKIP_NO_KEYPOINTS] += 1
            continue

        image_id = ann.get("image_id")
        if not isinstance(image_id, int | str) or image_id not in images:
            raise DatasetError(ann_file, f"image_id {image_id!r} is not in 'images'", record_id)
        file_name = images[image_id]
        record_id = f"{file_name}#{ann.get('id', index)}"
        image = image_dir / file_name
        if image_id not in sizes:
            # the image's own size, never the file's width/height: a joint at x = 50000 of a
            # 640-px image is broken whatever the JSON claims
            sizes[image_id] = read_image_size(image, ann_file, record_id)
        check_joints(kps[:, :2], labelled, sizes[image_id], ann_file, record_id)

        x, y, w, h = _bbox(ann_file, ann.get("bbox"), record_id)
        # SimpleBaseline pads the box to the input's aspect ratio (square here) first
        center, scale = (x + w / 2, y + h / 2), max(w, h) * BOX_PADDING / PIXEL_STD
        if "crop" in ann:  # the exact crop of a record written by write_coco (site folders)
            center, scale = _crop(ann_file, ann["crop"], record_id)
        head_box = _head_box(ann_file, ann.get("head_box"), record_id)
        check_geometry(
            np.asarray(center),
            scale,
            {"bbox": np.array([x, y, x + w, y + h]), "head_box": head_box},
            sizes[image_id],
            ann_file,
            record_id,
        )
        records.append(
            PoseRecord(
                image=image,
                joints=kps[:, :2].astype(np.float32),
                visibility=labelled.astype(np.float32),
                center=np.array(center, dtype=np.float32),
                scale=scale,
                head_box=head_box,
                person_box=np.array([x, y, x + w, y + h], dtype=np.float32),
                attributes=_attributes(ann_file, ann, kps, record_id),
                record_id=record_id,
            )
        )
    return records


def write_coco(
    records: Iterable[PoseRecord],
    skeleton: Skeleton,
    out_file: str | Path,
    image_root: str | Path,
) -> Path:
    """Write records as a person_keypoints JSON that load_coco(out_file, image_root) reads back.

    Image file names are stored relative to image_root. Labelled joints get v = 2, or v = 1 where
    attributes["occluded"] marks them; other attributes go to the annotation's "attributes"
    object. Records without a person box get the box implied by their centre and scale.
    """
    out_file, image_root = Path(out_file), Path(image_root)
    images: dict[Path, dict] = {}
    annotations = []
    for record in records:
        rid = record.record_id or None
        if record.num_joints != skeleton.num_joints:
            problem = f"record has {record.num_joints} joints; skeleton {skeleton.name} has "
            raise DatasetError(out_file, problem + str(skeleton.num_joints), rid)
        if record.image not in images:
            images[record.image] = _image_entry(record, len(images) + 1, image_root, out_file)
        annotations.append(_annotation(record, len(annotations) + 1, images[record.image]["id"]))

    data = {
        "info": {"description": f"written by fedpose ({skeleton.name} skeleton)"},
        "licenses": [],
        "categories": [
            {
                "id": 1,
                "name": "person",
                "supercategory": "person",
                "keypoints": list(skeleton.joints),
                "skeleton": [[a + 1, b + 1] for a, b in skeleton.bones],  # COCO counts from 1
            }
        ],
        "images": list(images.values()),
        "annotations": annotations,
    }
    out_file.parent.mkdir(parents=True, exist_ok=True)
    # a crash never leaves a half-written file that later loads as bad JSON
    write_atomically(out_file, lambda tmp: tmp.write_text(json.dumps(data, default=_json_default)))
    return out_file


def _check_unique_id(ann_file: Path, ann: dict, index: int, seen: set) -> None:
    if "id" not in ann:
        return
    ann_id = ann["id"]
    if not isinstance(ann_id, int | str) or isinstance(ann_id, bool):
        raise DatasetError(
            ann_file, f"id must be a number or text, got {ann_id!r:.40}", f"annotations[{index}]"
        )
    if ann_id in seen:
        raise DatasetError(ann_file, "duplicated annotation id", f"annotation {ann_id}")
    seen.add(ann_id)


def _wanted(ann: dict, person_ids: set | None) -> bool:
    category = ann.get("category_id")
    return person_ids is None or (isinstance(category, int | str) and category in person_ids)


def _declared_keypoints(categories: object, person_ids: set | None) -> int | None:
    """How many keypoints the file's person category names, or None when it names none."""
    if not isinstance(categories, list):
        return None
    for c in categories:
        if isinstance(c, dict) and (person_ids is None or c.get("id") in person_ids):
            names = c.get("keypoints")
            if isinstance(names, list) and names:
                return len(names)
    return None


def _check_keypoint_count(ann_file: Path, k: int, declared: int | None, record_id: str) -> None:
    """K keypoints per person must be what the file's category names, or COCO's 17 when it
    names none: a 3-keypoint file read as COCO would score joints that are not there."""
    expected = declared if declared is not None else COCO_KEYPOINTS
    if k != expected:
        said = (
            f"the file's category names {declared}"
            if declared is not None
            else f"COCO has {COCO_KEYPOINTS} (the file's category names none)"
        )
        raise DatasetError(ann_file, f"has {k} keypoints per person; {said}", record_id)


def _images(ann_file: Path, entries: list) -> dict[object, str]:
    images = {}
    for index, entry in enumerate(entries):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("id"), int | str)
            or isinstance(entry.get("id"), bool)
        ):
            raise DatasetError(ann_file, "image entry needs an id", f"images[{index}]")
        if entry["id"] in images:
            raise DatasetError(ann_file, "duplicated image id", f"image {entry['id']}")
        if not isinstance(entry.get("file_name"), str):
            raise DatasetError(ann_file, "image entry has no file_name", f"image {entry['id']}")
        # width and height are not used: the image itself says how large it is
        images[entry["id"]] = entry["file_name"]
    return images


def _person_category_ids(ann_file: Path, categories: object) -> set | None:
    """Ids of the keypoint categories to load; None = all (a file without categories)."""
    if not categories:
        return None
    if not isinstance(categories, list) or not all(isinstance(c, dict) for c in categories):
        raise DatasetError(ann_file, "'categories' must be a list of objects")
    if len(categories) == 1:  # a single-category file (e.g. synth-arm) whatever it is called
        if not isinstance(categories[0].get("id"), int | str):
            raise DatasetError(ann_file, "the category needs an id")
        return {categories[0]["id"]}
    ids = {
        c.get("id")
        for c in categories
        if c.get("name") == "person" and isinstance(c.get("id"), int | str)
    }
    if not ids:
        raise DatasetError(ann_file, "several categories and none is named 'person'")
    return ids


def _keypoints(ann_file: Path, value: object, record_id: str) -> np.ndarray:
    flat = numbers(value, None, "keypoints", ann_file, record_id)
    if flat.ndim != 1 or flat.size == 0 or flat.size % 3:
        raise DatasetError(ann_file, "keypoints must be a flat list [x, y, v] * K", record_id)
    kps = flat.reshape(-1, 3)
    if not np.isin(kps[:, 2], (0, 1, 2)).all():
        raise DatasetError(ann_file, "keypoint flags v must be 0, 1 or 2", record_id)
    return kps


def _bbox(ann_file: Path, value: object, record_id: str) -> tuple[float, float, float, float]:
    box = numbers(value, None, "bbox", ann_file, record_id)
    if box.shape != (4,) or not np.isfinite(box).all() or box[2] <= 0 or box[3] <= 0:
        problem = f"bbox must be [x, y, w, h] with w, h > 0, got {value!r:.80}"
        raise DatasetError(ann_file, problem, record_id)
    x, y, w, h = (float(v) for v in box)
    return x, y, w, h


def _crop(ann_file: Path, value: object, record_id: str) -> tuple[tuple[float, float], float]:
    try:
        cx, cy, scale = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        cx = cy = scale = float("nan")
    if not (np.isfinite([cx, cy, scale]).all() and scale > 0):
        raise DatasetError(
            ann_file, f"crop must be [cx, cy, scale > 0], got {value!r:.80}", record_id
        )
    return (cx, cy), scale


def _head_box(ann_file: Path, value: object, record_id: str) -> np.ndarray | None:
    if value is None:
        return None
    try:
        box = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        box = np.zeros(0)
    if box.shape != (4,) or not np.isfinite(box).all():
        raise DatasetError(
            ann_file, f"head_box must be [x1, y1, x2, y2], got {value!r:.80}", record_id
        )
    return box.astype(np.float32)


def _attributes(ann_file: Path, ann: dict, kps: np.ndarray, record_id: str) -> dict:
    extra = ann.get("attributes") or {}
    if not isinstance(extra, dict):
        raise DatasetError(ann_file, "'attributes' must be an object", record_id)
    attributes = dict(extra)
    if "view" in ann:
        attributes["view"] = ann["view"]
    attributes["occluded"] = kps[:, 2] == 1
    return attributes


def _image_entry(record: PoseRecord, image_id: int, image_root: Path, out_file: Path) -> dict:
    try:
        file_name = Path(record.image).relative_to(image_root).as_posix()
    except ValueError:
        problem = f"image {record.image} is not under the image root {image_root}"
        raise DatasetError(out_file, problem, record.record_id or None) from None
    width, height = read_image_size(record.image, out_file, record.record_id or None)
    return {"id": image_id, "file_name": file_name, "width": width, "height": height}


def _annotation(record: PoseRecord, ann_id: int, image_id: int) -> dict:
    labelled = record.visibility > 0
    occluded = np.asarray(record.attributes.get("occluded", np.zeros(record.num_joints)), bool)
    keypoints: list[float] = []
    for (x, y), lab, occ in zip(record.joints.tolist(), labelled, occluded, strict=True):
        # COCO writes unlabelled keypoints as 0, 0, 0
        keypoints += [x, y, 1 if occ else 2] if lab else [0, 0, 0]

    if record.person_box is not None:
        x1, y1, x2, y2 = (float(v) for v in record.person_box)
    else:
        half = record.scale * PIXEL_STD / BOX_PADDING / 2
        cx, cy = (float(v) for v in record.center)
        x1, y1, x2, y2 = cx - half, cy - half, cx + half, cy + half
    attributes = {k: v for k, v in record.attributes.items() if k not in DERIVED_ATTRIBUTES}
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "iscrowd": 0,
        "num_keypoints": int(labelled.sum()),
        "keypoints": keypoints,
        "bbox": [x1, y1, x2 - x1, y2 - y1],
        "area": (x2 - x1) * (y2 - y1),
        "attributes": attributes,
        # the crop itself: centre and scale derived from the box again may differ in the last bit
        "crop": [float(record.center[0]), float(record.center[1]), float(record.scale)],
        **(
            {"head_box": [float(v) for v in record.head_box]} if record.head_box is not None else {}
        ),
    }


def _json_default(value: object) -> object:
    # attributes may hold numpy values or paths; JSON has no type for them
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON: {value!r:.80}")
