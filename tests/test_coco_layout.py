"""COCO as the pose toolkits lay it out: train2017/ beside val2017/ with annotations/, a COCO
results file from `fedpose eval --dump` that pycocotools scores alone, and `data inspect`'s
counts of skipped annotations."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO as CocoApi
from pycocotools.cocoeval import COCOeval

from fedpose.cli import main
from fedpose.config import Config, load_config
from fedpose.data import load_split
from fedpose.data.records import COCO, DatasetError
from fedpose.metrics.coco_ap import split_ap, write_split_results
from fedpose.model.io import save_model
from fedpose.model.pose_resnet import PoseResNet

# the fixture's four images: two go to train2017/, two to val2017/
TRAIN_IMAGES = ("000000000785.jpg", "000000040083.jpg")


@pytest.fixture(scope="module")
def coco_layout(coco_dir, tmp_path_factory) -> Path:
    """tests/data/coco rearranged as COCO 2017 unpacks: annotations/person_keypoints_*.json,
    train2017/, val2017/, every file name relative to its own split's folder."""
    root = tmp_path_factory.mktemp("coco")
    raw = json.loads((coco_dir / "test_coco.json").read_text())
    (root / "annotations").mkdir()
    for split in ("train2017", "val2017"):
        images = [i for i in raw["images"] if (i["file_name"] in TRAIN_IMAGES) == (split[0] == "t")]
        ids = {i["id"] for i in images}
        (root / split).mkdir()
        for image in images:
            shutil.copyfile(coco_dir / image["file_name"], root / split / image["file_name"])
        part = {
            **raw,
            "images": images,
            "annotations": [a for a in raw["annotations"] if a["image_id"] in ids],
        }
        (root / "annotations" / f"person_keypoints_{split}.json").write_text(json.dumps(part))
    return root


def _data_sets(root: Path, per_split: bool = True) -> list[str]:
    sets = [
        "data.dataset=coco",
        f"data.root={root}",
        f"data.ann={root / 'annotations' / 'person_keypoints_train2017.json'}",
        f"data.test_ann={root / 'annotations' / 'person_keypoints_val2017.json'}",
        "data.input_size=32",
    ]
    if per_split:
        sets += [f"data.train_root={root / 'train2017'}", f"data.test_root={root / 'val2017'}"]
    return sets


def test_standard_layout_loads_with_an_image_folder_per_split(coco_layout):
    cfg = load_config(None, _data_sets(coco_layout))
    train, skeleton = load_split(cfg.data, "train")
    test, _ = load_split(cfg.data, "test")
    assert skeleton is COCO
    assert {Path(r.image).parent.name for r in train} == {"train2017"}
    assert {Path(r.image).parent.name for r in test} == {"val2017"}
    # 12 people with keypoints in the fixture: 3 on the two train images, 9 on the val ones
    assert (len(train), len(test)) == (3, 9)


def test_one_root_for_both_files_is_the_error_it_was(coco_layout):
    cfg = load_config(None, _data_sets(coco_layout, per_split=False))
    with pytest.raises(DatasetError, match="image not found"):
        load_split(cfg.data, "train")


def _pycocotools_ap(ann: Path, results: Path) -> float:
    """COCOeval on the two files, with nothing of fedpose."""
    with contextlib.redirect_stdout(io.StringIO()):
        truth = CocoApi(str(ann))
        evaluator = COCOeval(truth, truth.loadRes(str(results)), "keypoints")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])


@pytest.mark.parametrize("shift", [0.0, 6.0])
def test_dumped_results_rescore_to_fedpose_ap(coco_layout, tmp_path, shift):
    cfg = load_config(None, _data_sets(coco_layout))
    test, _ = load_split(cfg.data, "test")
    preds = np.stack([r.joints for r in test]) + shift * np.array([1.0, -0.5])
    confidence = np.stack([r.visibility for r in test]) * 0.9
    out = write_split_results(tmp_path / "results.json", test, preds, confidence, cfg.data, "test")
    results = json.loads(out.read_text())
    assert {r["image_id"] for r in results} <= {197388, 196141}
    assert all(len(r["keypoints"]) == 51 and r["category_id"] == 1 for r in results)
    ours = split_ap(test, preds, confidence, cfg.data, "test")["AP"]
    theirs = _pycocotools_ap(Path(cfg.data.test_ann), out)
    assert theirs == pytest.approx(ours, abs=1e-12)
    if shift == 0.0:
        assert theirs == pytest.approx(1.0)
    else:
        assert theirs < 1.0


def test_eval_dump_writes_the_scored_results(coco_layout, tmp_path, capsys):
    cfg = Config()
    cfg.data.dataset, cfg.data.input_size = "coco", 32
    cfg.model.depth, cfg.model.width, cfg.model.deconv_filters = 18, 4, 8
    cfg.train.flip_test = False
    torch.manual_seed(0)
    model = PoseResNet(COCO.num_joints, depth=18, width=4, deconv_filters=8)
    save_model(tmp_path / "model.safetensors", model.state_dict(), cfg, COCO)
    dump = tmp_path / "out" / "results.json"
    sets = [a for s in _data_sets(coco_layout) for a in ("-c", s)]
    assert main(["eval", str(tmp_path / "model.safetensors"), "--dump", str(dump), *sets]) == 0
    out = capsys.readouterr().out
    printed = float(next(x for x in out.splitlines() if x.startswith("AP: ")).split()[1])
    assert f"wrote {dump}" in out
    ann = coco_layout / "annotations" / "person_keypoints_val2017.json"
    assert _pycocotools_ap(ann, dump) == pytest.approx(printed, abs=5e-4)


def test_dump_of_a_non_coco_model_is_one_error_line(tmp_path, capsys, synth_dir):
    from fedpose.data.records import ARM

    cfg = Config()
    cfg.data.dataset, cfg.data.root, cfg.data.input_size = "synth-arm", str(synth_dir), 32
    cfg.model.depth, cfg.model.width, cfg.model.deconv_filters = 18, 4, 8
    model = PoseResNet(ARM.num_joints, depth=18, width=4, deconv_filters=8)
    save_model(tmp_path / "model.safetensors", model.state_dict(), cfg, ARM)
    dump = tmp_path / "results.json"
    assert main(["eval", str(tmp_path / "model.safetensors"), "--dump", str(dump)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --dump") and not dump.exists()


def test_inspect_counts_skipped_annotations_by_reason(coco_dir, tmp_path, capsys):
    from fedpose.data.inspect import inspect_dataset

    raw = json.loads((coco_dir / "test_coco.json").read_text())
    crowd = dict(raw["annotations"][0], id=9_000_001, iscrowd=1)
    other = dict(raw["annotations"][0], id=9_000_002, category_id=2)
    raw["annotations"] += [crowd, other]
    raw["categories"] = [*raw["categories"], {"id": 2, "name": "dog"}]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(raw))
    summary = inspect_dataset("coco", coco_dir, ann, decode=False)
    # the fixture has two people with num_keypoints 0
    assert summary["skipped"] == {
        "crowd (iscrowd)": 1,
        "no labelled keypoint": 2,
        "not the person category": 1,
    }
    assert summary["records"] == 12
    argv = ["data", "inspect", "--dataset", "coco", "--root", str(coco_dir), "--ann", str(ann)]
    assert main(argv) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "skipped annotations" in x)
    assert "4: crowd (iscrowd) 1, no labelled keypoint 2, not the person category 1" in line
