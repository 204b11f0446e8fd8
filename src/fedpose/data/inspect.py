"""`fedpose data inspect`: load a dataset with full validation and summarise what is in it."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from fedpose.data import SYNTH_ANN, SYNTH_IMAGES
from fedpose.data.coco import load_coco
from fedpose.data.lsp import load_lsp
from fedpose.data.mpii import load_mpii
from fedpose.data.records import (
    ARM,
    COCO,
    LSP,
    MPII,
    DatasetError,
    PoseRecord,
    read_image_size,
)

DATASETS = ("lsp", "mpii", "coco", "synth-arm")
# attributes with more distinct values than this are identifiers, not groups worth counting
MAX_ATTRIBUTE_VALUES = 20


def inspect_dataset(
    dataset: str,
    root: str | Path,
    ann: str | Path | None = None,
    *,
    labels: str = "pc",
    headboxes: str | Path | None = None,
) -> dict:
    """Load every record of a dataset (all splits) and summarise it.

    root: the image folder (lsp: the dataset folder; synth-arm: the folder holding
    annotations.json and images/). ann: the annotation file for mpii and coco (synth-arm: optional).
    Malformed data raises DatasetError, exactly as training would.
    """
    root = Path(root)
    if dataset == "lsp":
        records, skeleton = load_lsp(root, "all", labels), LSP
    elif dataset == "mpii":
        records, skeleton = load_mpii(_need_ann(ann, root, dataset), root, headboxes), MPII
    elif dataset == "coco":
        records, skeleton = load_coco(_need_ann(ann, root, dataset), root), COCO
    elif dataset == "synth-arm":
        ann_path = Path(ann) if ann else root / SYNTH_ANN
        records, skeleton = load_coco(ann_path, ann_path.parent / SYNTH_IMAGES), ARM
    else:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")

    num_joints = records[0].num_joints if records else skeleton.num_joints
    names = list(skeleton.joints) if num_joints == skeleton.num_joints else None
    images = sorted({r.image for r in records})
    sizes = np.array([read_image_size(p, p) for p in images]).reshape(-1, 2)
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


def inspect_main(args: argparse.Namespace, console: Console | None = None) -> int:
    """Run `fedpose data inspect`: print the summary tables and return 0, or print one line
    `error: <message>` and return 2 when the data is malformed.

    args: dataset, root, and optionally ann, labels (lsp: pc | oc), headboxes (mpii).
    """
    out = console or Console()
    try:
        summary = inspect_dataset(
            args.dataset,
            args.root,
            getattr(args, "ann", None),
            labels=getattr(args, "labels", None) or "pc",
            headboxes=getattr(args, "headboxes", None),
        )
    except DatasetError as e:
        err = console or Console(stderr=True)
        # no markup (messages hold "[record ...]") and no wrapping: it must stay one line
        err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        return 2
    for table in summary_tables(summary):
        out.print(table)
    return 0


def _need_ann(ann: str | Path | None, root: Path, dataset: str) -> Path:
    if not ann:
        raise DatasetError(root, f"the {dataset} dataset needs its annotation file (--ann)")
    return Path(ann)


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
