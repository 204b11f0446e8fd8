"""Pose datasets: loaders for LSP, MPII, COCO-format files and synth-arm, all into PoseRecord.

`DATASETS` is the one table of the datasets fedpose reads: training and evaluation
(`load_split`), `fedpose data inspect` and `fedpose score` (`load_files`) and the command line's
choices all go through it. A new dataset is a loader module in this package and one entry here.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fedpose.config import ConfigError, DataConfig, choice_problem
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
    DatasetKind,
    FileOptions,
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
    "DatasetKind",
    "FileOptions",
    "coco_split_files",
    "holdout_split",
    "load_coco",
    "load_files",
    "load_lsp",
    "load_mpii",
    "load_mpii_headboxes",
    "load_split",
    "synth_arm_annotations",
    "write_coco",
]

# synth-arm layout, as the generator writes it: root/annotations.json, whose file names are
# relative to root/images/
SYNTH_ANN = "annotations.json"
SYNTH_IMAGES = "images"


def load_split(cfg: DataConfig, split: str) -> tuple[list[PoseRecord], Skeleton]:
    """The train or test records of the configured dataset, and its skeleton.

    lsp: the standard split. mpii / coco: `ann` for train and `test_ann` for test; without a
    `test_ann`, `ann` is split into a held-out share of `test_fraction` (see holdout_split).
    synth-arm: `root`/annotations.json with images in `root`/images (rendered there first when
    `generate` asks for it), split the same way.
    max_train / max_test (0 = all) then keep the first records.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, not {split!r}")
    records, skeleton = dataset_kind(cfg.dataset).load_split(cfg, split)
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


def synth_arm_annotations(cfg: DataConfig, workers: int = 1) -> Path:
    """The synth-arm annotation file. A root without one is an error unless `cfg.generate`
    asks for the set to be rendered there (with `workers` processes): data are never made
    implicitly, so a mistyped root fills no folder."""
    if cfg.ann:
        return Path(cfg.ann)
    ann = Path(cfg.root) / SYNTH_ANN
    if not ann.is_file() and not cfg.generate:
        raise DatasetError(
            ann,
            "no synth-arm set here; render one with `fedpose data synth-arm "
            f"{cfg.root}` or ask for it with -c data.generate=true",
        )
    if not ann.is_file():
        # imported here: the generator is only needed (and only loaded) on a fresh root
        from fedpose.data.synth_arm import generate_synth_arm

        made = Path(
            generate_synth_arm(
                Path(cfg.root), cfg.synth_n, cfg.synth_seed, cfg.synth_size, workers=workers
            )
        )
        if made.is_file():
            ann = made
    return ann


def _load_mpii_split(cfg: DataConfig, split: str) -> tuple[list[PoseRecord], Skeleton]:
    if not cfg.ann:
        raise ConfigError("data.ann: the mpii dataset needs its annotation JSON")
    headboxes = cfg.headboxes or None
    if cfg.test_ann:
        # gt_valid.mat describes the evaluation set, so head boxes go with test_ann only
        if split == "train":
            return load_mpii(cfg.ann, cfg.root), MPII
        return load_mpii(cfg.test_ann, cfg.root, headboxes), MPII
    records = load_mpii(cfg.ann, cfg.root, headboxes)
    return holdout_split(records, cfg.test_fraction, split, cfg.root), MPII


def coco_split_files(cfg: DataConfig, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) a real COCO-format split is read from: `ann` with
    `train_root` (else `root`) for train and for a held-out test share; `test_ann` with
    `test_root` (else `root`) for test when set. So COCO's own layout, train2017/ beside
    val2017/, loads as it is unpacked."""
    if not cfg.ann:
        raise ConfigError("data.ann: the coco dataset needs its person_keypoints JSON")
    if split == "test" and cfg.test_ann:
        return Path(cfg.test_ann), Path(cfg.test_root or cfg.root)
    return Path(cfg.ann), Path(cfg.train_root or cfg.root)


def _load_coco_split(cfg: DataConfig, split: str, synth: bool) -> tuple[list[PoseRecord], Skeleton]:
    if synth:
        train_ann = synth_arm_annotations(cfg)
        image_dir = test_dir = train_ann.parent / SYNTH_IMAGES
    else:
        train_ann, image_dir = coco_split_files(cfg, "train")
        test_dir = coco_split_files(cfg, "test")[1]
    if cfg.test_ann:
        ann, folder = (train_ann, image_dir) if split == "train" else (Path(cfg.test_ann), test_dir)
        records = load_coco(ann, folder)
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


def _load_lsp_split(cfg: DataConfig, split: str) -> tuple[list[PoseRecord], Skeleton]:
    return load_lsp(cfg.root, split, cfg.lsp_labels), LSP


def _load_real_coco_split(cfg: DataConfig, split: str) -> tuple[list[PoseRecord], Skeleton]:
    return _load_coco_split(cfg, split, synth=False)


def _load_synth_split(cfg: DataConfig, split: str) -> tuple[list[PoseRecord], Skeleton]:
    return _load_coco_split(cfg, split, synth=True)


# ----------------------------------------------------------------------------- files as given
def _need_ann(ann: str | Path | None, root: Path, dataset: str) -> Path:
    if not ann:
        raise DatasetError(root, f"the {dataset} dataset needs its annotation file (--ann)")
    return Path(ann)


def _lsp_files(root: Path, _ann: str | Path | None, opt: FileOptions) -> list[PoseRecord]:
    # LSP keeps its labels in root/joints.mat: no annotation file
    return load_lsp(root, opt.split, opt.labels)


def _mpii_files(root: Path, ann: str | Path | None, opt: FileOptions) -> list[PoseRecord]:
    return load_mpii(_need_ann(ann, root, "mpii"), root, opt.headboxes)


def _coco_files(root: Path, ann: str | Path | None, opt: FileOptions) -> list[PoseRecord]:
    return load_coco(_need_ann(ann, root, "coco"), root, opt.skipped)


def _synth_files(root: Path, ann: str | Path | None, opt: FileOptions) -> list[PoseRecord]:
    ann_path = Path(ann) if ann else root / SYNTH_ANN
    return load_coco(ann_path, ann_path.parent / SYNTH_IMAGES, opt.skipped)


DATASETS: dict[str, DatasetKind] = {
    "lsp": DatasetKind(LSP, _load_lsp_split, _lsp_files),
    "mpii": DatasetKind(MPII, _load_mpii_split, _mpii_files),
    "coco": DatasetKind(COCO, _load_real_coco_split, _coco_files),
    "synth-arm": DatasetKind(ARM, _load_synth_split, _synth_files),
}


def dataset_problem(dataset: str) -> str | None:
    """Why `data.dataset` names no registered dataset (None when it does)."""
    return choice_problem("data.dataset", dataset, tuple(DATASETS))


def dataset_kind(dataset: str) -> DatasetKind:
    """The registered dataset of that name; ConfigError naming the known ones otherwise."""
    problem = dataset_problem(dataset)
    if problem:
        raise ConfigError(problem)
    return DATASETS[dataset]


def skeleton_named(name: str) -> Skeleton | None:
    """The skeleton a model file names (Skeleton.name), among the registered datasets'."""
    return next((k.skeleton for k in DATASETS.values() if k.skeleton.name == name), None)


def load_files(
    dataset: str,
    root: str | Path,
    ann: str | Path | None = None,
    options: FileOptions | None = None,
) -> tuple[list[PoseRecord], Skeleton]:
    """Every record of a dataset's files as given, no held-out split and no limits: what
    inspecting and scoring read. root: the image folder (lsp: the dataset folder; synth-arm: the
    folder holding annotations.json and images/); ann: the annotation file (mpii, coco; synth-arm:
    optional). Malformed data raises DatasetError, exactly as training would."""
    kind = dataset_kind(dataset)
    return kind.load_files(Path(root), ann, options or FileOptions()), kind.skeleton
