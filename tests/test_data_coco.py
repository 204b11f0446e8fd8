"""COCO loader and writer on the real fixture, and load_split for coco and synth-arm."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
from PIL import Image

from fedpose.config import DataConfig
from fedpose.data import holdout_split, load_split
from fedpose.data.coco import load_coco, write_coco
from fedpose.data.records import ARM, COCO, DatasetError, PoseRecord


@pytest.fixture(scope="module")
def ann(coco_dir):
    return coco_dir / "test_coco.json"


@pytest.fixture(scope="module")
def raw(ann) -> dict:
    return json.loads(ann.read_text())


def kept(raw: dict) -> list[dict]:
    return [a for a in raw["annotations"] if a["num_keypoints"] > 0 and not a["iscrowd"]]


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def test_skips_persons_without_keypoints(ann, coco_dir, raw):
    records = load_coco(ann, coco_dir)
    assert len(raw["annotations"]) == 14 and len(records) == 12
    ids = [int(r.record_id.split("#")[1]) for r in records]
    assert ids == [a["id"] for a in kept(raw)]
    assert 1202706 not in ids and 508900 not in ids
    assert records[0].record_id == "000000000785.jpg#442619"
    assert records[0].image == coco_dir / "000000000785.jpg"


def test_visibility_and_occlusion_follow_v_flags(ann, coco_dir, raw):
    records = load_coco(ann, coco_dir)
    for r, a in zip(records, kept(raw), strict=True):
        kps = np.array(a["keypoints"], dtype=float).reshape(17, 3)
        np.testing.assert_array_equal(r.visibility, kps[:, 2] > 0)
        np.testing.assert_array_equal(r.attributes["occluded"], kps[:, 2] == 1)
        np.testing.assert_allclose(r.joints, kps[:, :2])
        assert r.visibility.sum() == a["num_keypoints"]
    # annotation 40083/198196: l_ear unlabelled (v=0), l_hip hidden (v=1)
    r = records[1]
    assert r.visibility[3] == 0 and r.visibility[11] == 1 and r.attributes["occluded"][11]


def test_centre_scale_and_box_from_bbox(ann, coco_dir):
    r = load_coco(ann, coco_dir)[0]  # bbox [280.79, 44.73, 218.7, 346.68]
    np.testing.assert_allclose(r.center, [280.79 + 218.7 / 2, 44.73 + 346.68 / 2], atol=1e-3)
    assert r.scale == pytest.approx(346.68 * 1.25 / 200)  # the box is squared: the longer side
    np.testing.assert_allclose(r.person_box, [280.79, 44.73, 499.49, 391.41], atol=1e-3)
    wide = load_coco(ann, coco_dir)[-1]  # bbox [0.5, 43.74, 90.1, 220.09]: tall again
    assert wide.scale == pytest.approx(220.09 * 1.25 / 200)


def test_crowd_annotations_are_skipped(tmp_path, coco_dir, raw):
    data = json.loads(json.dumps(raw))
    data["annotations"][0]["iscrowd"] = 1
    records = load_coco(write_json(tmp_path / "crowd.json", data), coco_dir)
    assert len(records) == 11 and all("#442619" not in r.record_id for r in records)


def test_num_keypoints_zero_is_skipped_even_with_keypoints(tmp_path, coco_dir, raw):
    data = json.loads(json.dumps(raw))
    data["annotations"][0]["num_keypoints"] = 0
    records = load_coco(write_json(tmp_path / "zero.json", data), coco_dir)
    assert len(records) == 11 and all("#442619" not in r.record_id for r in records)


def test_attributes_from_object_and_top_level_view(tmp_path, coco_dir, raw):
    data = json.loads(json.dumps(raw))
    data["annotations"][0]["attributes"] = {"view": "anterior", "subject": 3}
    data["annotations"][1]["view"] = "posterior"
    records = load_coco(write_json(tmp_path / "attrs.json", data), coco_dir)
    assert records[0].attributes["view"] == "anterior" and records[0].attributes["subject"] == 3
    assert records[1].attributes["view"] == "posterior"
    assert "view" not in records[2].attributes


def test_write_then_load_round_trips(tmp_path, ann, coco_dir):
    records = load_coco(ann, coco_dir)
    for i, r in enumerate(records):
        r.attributes["view"] = ["anterior", "posterior"][i % 2]
    out = write_coco(records, COCO, tmp_path / "out" / "again.json", coco_dir)
    data = json.loads(out.read_text())
    assert data["categories"][0]["keypoints"] == list(COCO.joints)
    assert len(data["images"]) == 4 and data["images"][0]["file_name"] == "000000000785.jpg"
    assert "occluded" not in data["annotations"][0]["attributes"]

    again = load_coco(out, coco_dir)
    assert len(again) == len(records)
    for a, b in zip(records, again, strict=True):
        assert a.image == b.image
        np.testing.assert_array_equal(a.joints[a.visibility > 0], b.joints[b.visibility > 0])
        np.testing.assert_array_equal(a.visibility, b.visibility)
        np.testing.assert_array_equal(a.attributes["occluded"], b.attributes["occluded"])
        np.testing.assert_allclose(a.person_box, b.person_box, atol=1e-3)
        np.testing.assert_allclose(a.center, b.center, atol=1e-3)
        assert a.scale == pytest.approx(b.scale, rel=1e-5)
        assert a.attributes["view"] == b.attributes["view"]


def test_write_rejects_wrong_skeleton_and_foreign_images(tmp_path, ann, coco_dir):
    records = load_coco(ann, coco_dir)
    with pytest.raises(DatasetError, match=r"arm\.json.*17 joints; skeleton synth-arm has 3"):
        write_coco(records, ARM, tmp_path / "arm.json", coco_dir)
    with pytest.raises(DatasetError, match=r"out\.json.*not under the image root"):
        write_coco(records, COCO, tmp_path / "out.json", tmp_path)


def test_load_split_holds_out_whole_images(ann, coco_dir):
    cfg = DataConfig(dataset="coco", root=str(coco_dir), ann=str(ann), test_fraction=0.25)
    train, skeleton = load_split(cfg, "train")
    test, _ = load_split(cfg, "test")
    assert skeleton is COCO
    assert len(train) + len(test) == 12
    assert len({r.image for r in test}) == 1  # round(0.25 * 4 images)
    assert not {r.image for r in train} & {r.image for r in test}
    assert [r.record_id for r in load_split(cfg, "test")[0]] == [r.record_id for r in test]
    cfg.max_train = 2
    assert len(load_split(cfg, "train")[0]) == 2


def test_load_split_with_test_file(tmp_path, ann, coco_dir, raw):
    data = json.loads(json.dumps(raw))
    data["annotations"] = data["annotations"][:4]  # the 4th has no keypoints
    small = write_json(tmp_path / "small.json", data)
    cfg = DataConfig(dataset="coco", root=str(coco_dir), ann=str(ann), test_ann=str(small))
    assert len(load_split(cfg, "train")[0]) == 12
    assert len(load_split(cfg, "test")[0]) == 3


def test_three_keypoint_file_is_not_coco(tmp_path):
    ann = make_arm_set(tmp_path, 2)
    cfg = DataConfig(dataset="coco", root=str(tmp_path / "images"), ann=str(ann))
    with pytest.raises(DatasetError, match=r"annotations\.json.*3 keypoints.*synth-arm"):
        load_split(cfg, "train")


def make_arm_set(out_dir, n, seed=0, size=32):
    """A stand-in for the synth-arm generator, with its layout (annotations.json beside images/):
    n images, one arm each, COCO JSON with views."""
    rng = np.random.default_rng(seed)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    views = ("anterior", "posterior", "left", "right")
    records = []
    for i in range(n):
        image = out_dir / "images" / f"{i:04d}.png"
        Image.new("RGB", (size, size)).save(image)
        joints = rng.uniform(4, size - 4, (3, 2)).astype(np.float32)
        records.append(
            PoseRecord(
                image=image,
                joints=joints,
                visibility=np.ones(3, np.float32),
                center=joints.mean(axis=0),
                scale=0.1,
                person_box=np.array([*joints.min(0) - 2, *joints.max(0) + 2], np.float32),
                attributes={"view": views[i % 4]},
            )
        )
    return write_coco(records, ARM, out_dir / "annotations.json", out_dir / "images")


def test_synth_arm_split(tmp_path):
    make_arm_set(tmp_path, 8)
    cfg = DataConfig(dataset="synth-arm", root=str(tmp_path), test_fraction=0.25)
    train, skeleton = load_split(cfg, "train")
    test, _ = load_split(cfg, "test")
    assert skeleton is ARM
    assert (len(train), len(test)) == (6, 2)
    views = {r.attributes["view"] for r in train + test}
    assert views == {"anterior", "posterior", "left", "right"}


def test_synth_arm_is_generated_once_when_asked_for(tmp_path, monkeypatch):
    calls = []

    def generate_synth_arm(out_dir, n, seed, size, workers):
        calls.append((out_dir, n, seed, size, workers))
        return make_arm_set(out_dir, n, seed, size).parent

    fake = types.ModuleType("fedpose.data.synth_arm")
    fake.generate_synth_arm = generate_synth_arm
    monkeypatch.setitem(sys.modules, "fedpose.data.synth_arm", fake)
    root = tmp_path / "arm"
    cfg = DataConfig(
        dataset="synth-arm", root=str(root), synth_n=10, synth_seed=3, synth_size=24, generate=True
    )
    train, _ = load_split(cfg, "train")
    test, _ = load_split(cfg, "test")
    assert calls == [(root, 10, 3, 24, 1)]
    assert len(train) + len(test) == 10 and len(test) == 2


def test_holdout_split_is_stable_and_order_free(ann, coco_dir):
    records = load_coco(ann, coco_dir)
    test = holdout_split(records, 0.5, "test", coco_dir)
    shuffled = holdout_split(records[::-1], 0.5, "test", coco_dir)
    assert sorted(r.record_id for r in test) == sorted(r.record_id for r in shuffled)
    assert len({r.image for r in test}) == 2
    assert len({r.image for r in holdout_split(records, 0.7, "test", coco_dir)}) == 3
    assert holdout_split(records, 0.0, "test", coco_dir) == []


def test_synth_arm_from_the_real_generator(tmp_path):
    cfg = DataConfig(
        dataset="synth-arm", root=str(tmp_path / "arm"), synth_n=8, synth_size=32, generate=True
    )
    train, skeleton = load_split(cfg, "train")
    test, _ = load_split(cfg, "test")
    assert skeleton is ARM and len(train) + len(test) == 8
    assert all(r.num_joints == 3 and r.image.is_file() for r in train + test)
    views = {r.attributes["view"] for r in train + test}
    assert views == {"anterior", "posterior", "left", "right"}
