"""`fedpose score`: a predictions file scored with the dataset's standard metric, like the
benchmarks' official scripts (LSP PCK@0.2 torso, MPII PCKh@0.5, COCO PCK@0.2 of the person box).

PRED.json maps image file name -> [[x, y], ...] (0-based pixels, the dataset's joint order), or
-> a list of such lists, one per person in annotation order.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from fedpose.data.records import COCO, LSP, MPII, DatasetError, PoseRecord, Skeleton
from fedpose.metrics.pck import grouped_table, score


def _records(args) -> tuple[list[PoseRecord], Skeleton]:
    if args.dataset == "lsp":
        from fedpose.data.lsp import load_lsp

        return load_lsp(args.root, split=args.split, labels=args.labels), LSP
    if not args.ann:
        raise DatasetError(args.root, f"--ann is required for {args.dataset}")
    if args.dataset == "mpii":
        from fedpose.data.mpii import load_mpii

        return load_mpii(args.ann, args.root, headboxes=args.headboxes), MPII
    from fedpose.data.coco import load_coco

    return load_coco(args.ann, args.root), COCO


def match_predictions(pred_file: str | Path, records: list[PoseRecord],
                      num_joints: int) -> np.ndarray:
    """One (J, 2) prediction per record, in record order; raises DatasetError on gaps."""
    pred_file = Path(pred_file)
    try:
        preds = json.loads(pred_file.read_text())
    except FileNotFoundError:
        raise DatasetError(pred_file, "file not found") from None
    except json.JSONDecodeError as e:
        raise DatasetError(pred_file, f"not valid JSON: {e}") from None
    if not isinstance(preds, dict):
        raise DatasetError(pred_file, "expected an object mapping image file name -> joints")
    seen: dict[str, int] = defaultdict(int)
    out = np.zeros((len(records), num_joints, 2), dtype=np.float64)
    for i, rec in enumerate(records):
        name = Path(rec.image).name
        if name not in preds:
            raise DatasetError(pred_file, "no prediction for this image", name)
        arr = np.asarray(preds[name], dtype=np.float64)
        if arr.ndim == 2:
            arr = arr[None]
        person = seen[name]
        seen[name] += 1
        if arr.ndim != 3 or arr.shape[1:] != (num_joints, 2):
            raise DatasetError(pred_file, f"expected {num_joints} [x, y] pairs per person, got "
                                          f"shape {list(arr.shape)}", name)
        if person >= arr.shape[0]:
            raise DatasetError(pred_file, f"{arr.shape[0]} people predicted, the annotation has "
                                          f"more", name)
        out[i] = arr[person]
    return out


def score_file(args, console: Console) -> int:
    records, skeleton = _records(args)
    preds = match_predictions(args.pred, records, skeleton.num_joints)
    result = score(preds, records, skeleton, alpha=args.alpha)
    table = Table(title=f"{skeleton.name}: {len(records)} records, "
                        f"{'PCKh' if skeleton.normalizer == 'head' else 'PCK'}"
                        f"@{args.alpha or skeleton.pck_alpha:g}")
    table.add_column("part")
    table.add_column("PCK (%)", justify="right")
    for part, value in grouped_table(result, skeleton):
        table.add_row(part, f"{value:.2f}")
    console.print(table)
    print(f"mean PCK: {result.mean:.2f}")
    return 0
