"""Pose datasets: loaders for LSP, MPII, COCO-format files and synth-arm, all into PoseRecord."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fedpose.config import ConfigError, DataConfig
from fedpose.data.coco import load_coco, write_coco
from fedpose.data.lsp import load_lsp
from fedpose.data.mpii import load_mpii, load_mpii_headboxes
from fedpose.data.records import (
    ARM,
    COCO,
    LSP,
    MPII,
    SKELETONS,
    DatasetError,
    PoseRecord,
    Skeleton,
)

__all__ = [
    "ARM",
    "COCO",
    "DATASETS",
    "LSP",
    "MPII",
    "SKELETONS",
    "DatasetError",
    "PoseRecord",
    "Skeleton",
    "holdout_split",
    "load_coco",
    "load_lsp",
    "load_mpii",
    "load_mpii_headboxes",
    "load_split",
    "synth_arm_annotations",
    "write_coco",
]

DATASETS = ("lsp", "mpii", "coco", "synth-arm")
# synth-arm layout, as the generator writes it: root/annotations.json, whose file names are
# relative to root/images/
SYNTH_ANN = "annotations.json"
SYNTH_IMAGES = "images"


def load_split(cfg: DataConfig, split: str) -> tuple[list[PoseRecord], Skeleton]:
    """The train or test records of the configured dataset, and its skeleton.

    lsp: the standard split. mpii / coco: `ann` for train and `test_ann` for test; without a
    `test_ann`, `ann` is split into a held-out share of `test_fraction` (see holdout_split).
    synth-arm: `root`/annotations.json with images in `root`/images (generated there on first
    use), split the same way.
    max_train / max_test (0 = all) then keep the first records.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, not {split!r}")
    if cfg.dataset == "lsp":
        records, skeleton = load_lsp(cfg.root, split, cfg.lsp_labels), LSP
    elif cfg.dataset == "mpii":
        records, skeleton = _load_mpii_split(cfg, split), MPII
    elif cfg.dataset == "coco":
        records, skeleton = _load_coco_split(cfg, split, synth=False)
    elif cfg.dataset == "synth-arm":
        records, skeleton = _load_coco_split(cfg, split, synth=True)
    else:
        raise ConfigError(f"data.dataset: unknown dataset {cfg.dataset!r}; known: {DATASETS}")
    limit = cfg.max_train if split == "train" else cfg.max_test
    return (records[:limit] if limit > 0 else records), skeleton


def holdout_split(
    records: list[PoseRecord], fraction: float, split: str, image_dir: str | Path
) -> list[PoseRecord]:
    """Deterministic train/test split of one annotation file, by image.

    All people of one image stay on the same side. Images are ranked by a hash of their path
    relative to image_dir, so the split depends neither on the machine, the order of the file,
    nor the numpy version; round(fraction * images) of them are held out for test.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"data.test_fraction must lie in [0, 1], got {fraction}")
    keys = {r.image: Path(os.path.relpath(r.image, image_dir)).as_posix() for r in records}
    ranked = sorted(keys, key=lambda image: hashlib.sha1(keys[image].encode()).hexdigest())
    held_out = set(ranked[: round(fraction * len(ranked))])
    return [r for r in records if (r.image in held_out) == (split == "test")]


def synth_arm_annotations(cfg: DataConfig) -> Path:
    """The synth-arm annotation file, generating the data set into cfg.root on first use."""
    if cfg.ann:
        return Path(cfg.ann)
    ann = Path(cfg.root) / SYNTH_ANN
    if not ann.is_file():
        # imported here: the generator is only needed (and only loaded) on a fresh root
        from fedpose.data.synth_arm import generate_synth_arm

        made = Path(generate_synth_arm(Path(cfg.root), cfg.synth_n, cfg.synth_seed, cfg.synth_size))
        if made.is_file():
            ann = made
    return ann


def _load_mpii_split(cfg: DataConfig, split: str) -> list[PoseRecord]:
    if not cfg.ann:
        raise ConfigError("data.ann: the mpii dataset needs its annotation JSON")
    headboxes = cfg.headboxes or None
    if cfg.test_ann:
        # gt_valid.mat describes the evaluation set, so head boxes go with test_ann only
        if split == "train":
            return load_mpii(cfg.ann, cfg.root)
        return load_mpii(cfg.test_ann, cfg.root, headboxes)
    records = load_mpii(cfg.ann, cfg.root, headboxes)
    return holdout_split(records, cfg.test_fraction, split, cfg.root)


def _load_coco_split(cfg: DataConfig, split: str, synth: bool) -> tuple[list[PoseRecord], Skeleton]:
    if synth:
        train_ann = synth_arm_annotations(cfg)
        image_dir = train_ann.parent / SYNTH_IMAGES
    elif not cfg.ann:
        raise ConfigError("data.ann: the coco dataset needs its person_keypoints JSON")
    else:
        train_ann, image_dir = Path(cfg.ann), Path(cfg.root)
    if cfg.test_ann:
        ann = train_ann if split == "train" else Path(cfg.test_ann)
        records = load_coco(ann, image_dir)
        return records, _coco_skeleton(records, ann, synth)
    records = load_coco(train_ann, image_dir)
    skeleton = _coco_skeleton(records, train_ann, synth)
    return holdout_split(records, cfg.test_fraction, split, image_dir), skeleton


def _coco_skeleton(records: list[PoseRecord], ann: Path, synth: bool) -> Skeleton:
    if not records:
        raise DatasetError(ann, "no annotated person in the file")
    expected = ARM if synth else COCO
    k = records[0].num_joints
    if k != expected.num_joints:
        hint = "; 3-keypoint files are the synth-arm dataset" if k == 3 and not synth else ""
        problem = f"has {k} keypoints per person; {expected.name} has {expected.num_joints}{hint}"
        raise DatasetError(ann, problem)
    return expected
