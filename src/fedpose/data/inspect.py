"""`fedpose data inspect`: load a dataset with full validation and summarise what is in it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from rich.table import Table

from fedpose.data import FileOptions, load_files
from fedpose.data.records import DatasetError, PoseRecord, read_image_size

# attributes with more distinct values than this are identifiers, not groups worth counting
MAX_ATTRIBUTE_VALUES = 20


def inspect_dataset(
    dataset: str,
    root: str | Path,
    ann: str | Path | None = None,
    *,
    labels: str = "pc",
    headboxes: str | Path | None = None,
    decode: bool = True,
) -> dict:
    """Load every record of a dataset (all splits) and summarise it.

    root: the image folder (lsp: the dataset folder; synth-arm: the folder holding
    annotations.json and images/). ann: the annotation file for mpii and coco (synth-arm: optional).
    Malformed data raises DatasetError, exactly as training would. `decode`: decode every image
    in full (finds truncated and corrupt files; slow on large sets), else read headers only.
    """
    root = Path(root)
    skipped: Counter = Counter()
    records, skeleton = load_files(
        dataset,
        root,
        ann,
        FileOptions(split="all", labels=labels, headboxes=headboxes, skipped=skipped),
    )
    if not records:
        raise DatasetError(ann or root, "zero records: no annotated person with a labelled joint")

    num_joints = records[0].num_joints if records else skeleton.num_joints
    names = list(skeleton.joints) if num_joints == skeleton.num_joints else None
    images = sorted({r.image for r in records})
    sizes = np.array([read_image_size(p, p, decode=decode) for p in images]).reshape(-1, 2)
    visible = np.zeros(num_joints, dtype=int)
    occluded = np.zeros(num_joints, dtype=int)
    for r in records:
        labelled = r.visibility > 0
        visible += labelled
        if "occluded" in r.attributes:
            occluded += np.asarray(r.attributes["occluded"], dtype=bool) & labelled
    scales = np.array([r.scale for r in records], dtype=float)
    return {
        "dataset": dataset,
        "root": str(root),
        "ann": str(ann) if ann else None,
        "skeleton": skeleton.name,
        "records": len(records),
        "images": len(images),
        "num_joints": num_joints,
        "joint_names": names or [f"joint {j}" for j in range(num_joints)],
        "visible_per_joint": visible.tolist(),
        "occluded_per_joint": occluded.tolist(),
        "with_head_box": sum(r.head_box is not None for r in records),
        "image_width": _range(sizes[:, 0]),
        "image_height": _range(sizes[:, 1]),
        "scale": _range(scales),
        "attributes": _attribute_counts(records),
        # annotations that are no record, by reason (COCO-format files; empty for lsp / mpii)
        "skipped": dict(sorted(skipped.items())),
    }


def summary_tables(summary: dict) -> list[Table]:
    """The summary as rich tables: an overview, then per-joint label counts."""
    overview = Table(title=f"{summary['dataset']} dataset", show_header=False)
    overview.add_column("key", style="bold")
    overview.add_column("value")
    overview.add_row("root", summary["root"])
    if summary["ann"]:
        overview.add_row("annotations", summary["ann"])
    overview.add_row("skeleton", f"{summary['skeleton']} ({summary['num_joints']} joints)")
    overview.add_row("records", str(summary["records"]))
    skipped = summary.get("skipped") or {}
    if skipped:
        overview.add_row(
            "skipped annotations",
            f"{sum(skipped.values())}: "
            + ", ".join(f"{reason} {n}" for reason, n in skipped.items()),
        )
    overview.add_row("images", str(summary["images"]))
    overview.add_row("image width", _format_range(summary["image_width"], "px"))
    overview.add_row("image height", _format_range(summary["image_height"], "px"))
    overview.add_row("scale (x 200 px)", _format_range(summary["scale"], ""))
    if summary["with_head_box"]:
        overview.add_row("head boxes", str(summary["with_head_box"]))
    for key, counts in summary["attributes"].items():
        overview.add_row(key, ", ".join(f"{value}: {n}" for value, n in counts.items()))

    joints = Table(title="labelled joints")
    joints.add_column("#", justify="right")
    joints.add_column("joint")
    joints.add_column("labelled", justify="right")
    joints.add_column("share", justify="right")
    joints.add_column("occluded", justify="right")
    total = max(summary["records"], 1)
    for j, name in enumerate(summary["joint_names"]):
        n = summary["visible_per_joint"][j]
        joints.add_row(
            str(j), name, str(n), f"{100 * n / total:.1f} %", str(summary["occluded_per_joint"][j])
        )
    return [overview, joints]


def _range(values: np.ndarray) -> dict | None:
    if values.size == 0:
        return None
    return {"min": float(values.min()), "max": float(values.max()), "mean": float(values.mean())}


def _format_range(r: dict | None, unit: str) -> str:
    if r is None:
        return "-"
    unit = f" {unit}" if unit else ""
    return f"{r['min']:.4g}-{r['max']:.4g}{unit} (mean {r['mean']:.4g})"


def _attribute_counts(records: list[PoseRecord]) -> dict[str, dict[str, int]]:
    """Value counts of scalar attributes such as view: the groups non-IID partitions use."""
    counters: dict[str, Counter] = {}
    for r in records:
        for key, value in r.attributes.items():
            if isinstance(value, str | int | bool):
                counters.setdefault(key, Counter())[str(value)] += 1
    return {
        key: dict(sorted(c.items()))
        for key, c in sorted(counters.items())
        if len(c) <= MAX_ATTRIBUTE_VALUES
    }
