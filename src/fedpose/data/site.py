"""One site's own data: where a Flower SuperNode finds it (its node config), loading it, and the
per-site folders `fedpose data split` writes from a simulated partition.

A site folder written by `split_into_sites` is a COCO-format folder whatever the source dataset:

    site0/train.json   the site's training records (person_keypoints JSON)
    site0/test.json    the site's test records
    site0/images/...   the images those files name (copies)

Each annotation also carries the record's exact crop centre and scale (and MPII's head box), so
that a site trains on exactly the crops the simulated client of the same partition used.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fedpose.config import Config, ConfigError, DataConfig
from fedpose.data import SYNTH_ANN, dataset_kind, load_split
from fedpose.data.coco import load_coco, write_coco
from fedpose.data.partition import partition
from fedpose.data.records import DatasetError, PoseRecord, Skeleton
from fedpose.run_dir import check_output, output_folder, write_file

# node config keys (flower-supernode --node-config) that describe a site's data
DATA_ROOT = "data-root"
SITE_KEYS = ("data-root", "dataset", "ann", "test-ann", "headboxes", "lsp-labels", "name")
TRAIN_FILE = "train.json"
TEST_FILE = "test.json"
IMAGES = "images"
SPLIT_COMMAND = "data split"  # the command its output folders are recorded as made by


def dataset_skeleton(dataset: str) -> Skeleton:
    """The skeleton a dataset's records (and so the model's heatmaps) have."""
    return dataset_kind(dataset).skeleton


def is_site(node_config: Mapping) -> bool:
    """A SuperNode with its own data (data-root, no partition-id); a SuperNode with a
    partition-id instead takes its share of the whole dataset (the simulation shortcut)."""
    return DATA_ROOT in node_config and "partition-id" not in node_config


def site_name(node_config: Mapping) -> str:
    """The site's name: node config `name`, else the last part of its data-root. Sites are
    numbered (client ids 0 … N-1) in the order of their names."""
    name = str(node_config.get("name", "") or "")
    return name or Path(str(node_config[DATA_ROOT])).resolve().name


def site_data_config(node_config: Mapping, base: DataConfig) -> DataConfig:
    """`base` (the run config's data section: input size, sigma, augmentation) pointed at the
    site's files. ann, test-ann and headboxes are relative to data-root unless absolute."""
    unknown = sorted(set(node_config) - set(SITE_KEYS))
    if unknown:
        raise ConfigError(
            f"node config: unknown key(s) {', '.join(unknown)} for a site; "
            f"known: {', '.join(SITE_KEYS)}"
        )
    root = Path(str(node_config[DATA_ROOT]))

    def under_root(key: str) -> str:
        value = str(node_config.get(key, "") or "")
        return str(root / value) if value else ""

    return replace(
        base,
        dataset=str(node_config.get("dataset", base.dataset)),
        root=str(root),
        ann=under_root("ann"),
        test_ann=under_root("test-ann"),
        headboxes=under_root("headboxes"),
        lsp_labels=str(node_config.get("lsp-labels", base.lsp_labels)),
        max_train=0,
        max_test=0,
    )


@dataclass
class SiteData:
    name: str
    train: list[PoseRecord]
    test: list[PoseRecord]


def load_site(node_config: Mapping, base: DataConfig, skeleton: Skeleton) -> SiteData:
    """The site's train and test records, checked against the federation's skeleton.

    COCO-format files may hold any skeleton (a split of LSP or MPII is written as COCO): their
    keypoint count must match `skeleton`. Without test-ann a COCO site has no test records.
    Raises DatasetError naming the file when the data cannot be read or has no usable record.
    """
    cfg = site_data_config(node_config, base)
    name = site_name(node_config)
    if cfg.dataset == "coco":
        if not cfg.ann:
            raise ConfigError(f"site {name}: dataset coco needs ann=<train annotation file>")
        train = _coco_records(Path(cfg.ann), cfg.root, skeleton)
        test = _coco_records(Path(cfg.test_ann), cfg.root, skeleton) if cfg.test_ann else []
    else:
        synth_ann = Path(cfg.root) / SYNTH_ANN
        if cfg.dataset == "synth-arm" and not cfg.ann and not synth_ann.is_file():
            # load_split would generate a synthetic set here; a site serves what it has
            raise DatasetError(synth_ann, "no such file")
        train, found = load_split(cfg, "train")
        test, _ = load_split(cfg, "test")
        if found.num_joints != skeleton.num_joints:
            raise DatasetError(
                cfg.root,
                f"{cfg.dataset} has {found.num_joints} joints; the "
                f"federation's model has {skeleton.num_joints}",
            )
    if not train:
        raise DatasetError(cfg.ann or cfg.root, "no usable training record at this site")
    return SiteData(name, train, test)


def _coco_records(ann: Path, root: str, skeleton: Skeleton) -> list[PoseRecord]:
    records = load_coco(ann, root)
    for r in records[:1]:
        if r.num_joints != skeleton.num_joints:
            raise DatasetError(
                ann,
                f"has {r.num_joints} keypoints per person; the federation's "
                f"model ({skeleton.name}) has {skeleton.num_joints}",
                r.record_id,
            )
    return records


# ----------------------------------------------------------------------------- data split
@dataclass
class WrittenSite:
    folder: Path
    train: int
    test: int


def site_folder_names(num_clients: int) -> list[str]:
    """site0 … site{N-1}, zero-padded so that name order is client order."""
    width = len(str(num_clients - 1))
    return [f"site{k:0{width}d}" for k in range(num_clients)]


def evaluation_partition(test_records: list[PoseRecord], cfg: Config) -> list[list[int]]:
    """Which test records each client scores in federated evaluation: the config's partition
    applied to the test split, so a site's test data resembles its training data. Every test
    record goes to exactly one client, so the sites' counts add up to the whole test split."""
    n = cfg.fed.num_clients
    if len(test_records) < n:
        # fewer test records than clients (cross-device scale): one record each for clients
        # in a seeded order, none for the rest
        order = np.random.default_rng(cfg.seed).permutation(len(test_records))
        parts: list[list[int]] = [[] for _ in range(n)]
        for client, index in enumerate(order):
            parts[client].append(int(index))
        return parts
    return partition(test_records, cfg.fed, cfg.seed)


def split_into_sites(cfg: Config, out_dir: str | Path, force: bool = False) -> list[WrittenSite]:
    """Write one COCO-format site folder per client of the config's partition (see the module
    docstring); returns what each folder holds. `out_dir` is made and recorded as the split's;
    a folder another command made is refused unless `force`."""
    check_output(out_dir, SPLIT_COMMAND, force)
    train, skeleton = load_split(cfg.data, "train")
    test, _ = load_split(cfg.data, "test")
    parts = partition(train, cfg.fed, cfg.seed)
    test_parts = evaluation_partition(test, cfg)
    images = sorted({r.image for r in train} | {r.image for r in test})
    if not images:
        raise DatasetError(cfg.data.root, "no records to split")
    source_root = Path(os.path.commonpath([str(Path(p).resolve().parent) for p in images]))
    out_dir = output_folder(out_dir, SPLIT_COMMAND, force)
    written = []
    for name, part, test_part in zip(
        site_folder_names(cfg.fed.num_clients), parts, test_parts, strict=True
    ):
        folder = out_dir / name
        site_train = [_moved(train[i], source_root, folder) for i in part]
        site_test = [_moved(test[i], source_root, folder) for i in test_part]
        for original, moved in zip(
            [train[i] for i in part] + [test[i] for i in test_part],
            site_train + site_test,
            strict=True,
        ):
            copy_if_different(Path(original.image), moved.image)
        write_coco(site_train, skeleton, folder / TRAIN_FILE, folder)
        write_coco(site_test, skeleton, folder / TEST_FILE, folder)
        written.append(WrittenSite(folder, len(site_train), len(site_test)))
    return written


def copy_if_different(source: Path, dest: Path) -> None:
    """Copy `source` to `dest` unless `dest` already is a regular file of the same size and
    SHA-256. The copy goes to a new file renamed into place: a split killed mid-copy leaves no
    truncated image, and a link at `dest` is replaced, never written through."""
    data = source.read_bytes()
    if dest.is_file() and not dest.is_symlink() and dest.stat().st_size == len(data):
        if hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(data).digest():
            return
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_file(dest, data)


def _moved(record: PoseRecord, source_root: Path, folder: Path) -> PoseRecord:
    relative = Path(record.image).resolve().relative_to(source_root)
    return replace(record, image=folder / IMAGES / relative)
