"""The dataset table: loading a split and loading files as given go through the same entries."""

from __future__ import annotations

import pytest

from fedpose.config import DataConfig
from fedpose.data import DATASETS, DatasetError, load_files, load_split


def test_files_as_given_are_the_union_of_the_configured_splits(synth_dir):
    cfg = DataConfig(dataset="synth-arm", root=str(synth_dir), test_fraction=0.25)
    train, skeleton = load_split(cfg, "train")
    test, _ = load_split(cfg, "test")
    every, same = load_files("synth-arm", synth_dir)
    assert same is skeleton is DATASETS["synth-arm"].skeleton
    assert len(train) > 0 and len(test) > 0
    assert sorted(map(_key, every)) == sorted(map(_key, train + test))


def _key(record) -> tuple[str, str]:
    return str(record.image), str(record.record_id)


def test_unknown_dataset_and_missing_annotation_are_clear_errors(tmp_path):
    with pytest.raises(
        ValueError, match="data.dataset: 'h36m' is not allowed; use one of lsp, mpii, coco"
    ):
        load_files("h36m", tmp_path)
    for name in ("mpii", "coco"):
        with pytest.raises(DatasetError, match=f"the {name} dataset needs its annotation file"):
            load_files(name, tmp_path)
