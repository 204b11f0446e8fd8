"""MPII loader on the real fixture (5 images, SimpleBaseline JSON) and gt_valid.mat head boxes."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import scipy.io

from fedpose.cli import main
from fedpose.config import DataConfig
from fedpose.data import load_split
from fedpose.data.mpii import load_mpii, load_mpii_headboxes
from fedpose.data.records import MPII, DatasetError


@pytest.fixture(scope="module")
def ann(mpii_dir):
    return mpii_dir / "test_mpii.json"


@pytest.fixture(scope="module")
def raw(ann) -> list[dict]:
    return json.loads(ann.read_text())


def write_gt_valid(path, raw, order=None, count=None):
    """A gt_valid.mat with the official layout: headboxes_src 2x2xN, pos_gt_src 16x2xN,
    jnt_missing 16xN (all 1-based). Head boxes are made up around each person's head-top."""
    order = list(range(len(raw))) if order is None else order
    entries = [raw[i] for i in order][:count]
    heads = np.array([e["joints"][9] for e in entries], dtype=float)  # head-top
    boxes = np.stack([heads - 20, heads + 20])  # corner x (x, y) x N after the transpose
    scipy.io.savemat(
        path,
        {
            "headboxes_src": boxes.transpose(0, 2, 1),
            "pos_gt_src": np.array([e["joints"] for e in entries], dtype=float).transpose(1, 2, 0),
            "jnt_missing": 1 - np.array([e["joints_vis"] for e in entries]).T,
        },
    )
    return path


def test_five_records_in_file_order(ann, mpii_dir, raw):
    records = load_mpii(ann, mpii_dir)
    assert len(records) == 5
    assert [r.image for r in records] == [mpii_dir / e["image"] for e in raw]
    assert records[0].record_id == "005808361.jpg#0"
    assert all(r.head_box is None for r in records)


def test_joints_zero_based_and_visibility_from_joints_vis(ann, mpii_dir, raw):
    records = load_mpii(ann, mpii_dir)
    for r, e in zip(records, raw, strict=True):
        np.testing.assert_allclose(r.joints, np.array(e["joints"]) - 1, atol=1e-4)
        np.testing.assert_array_equal(r.visibility, e["joints_vis"])
    # the fixture's unlabelled ankles stay unlabelled
    assert sum(int((r.visibility == 0).sum()) for r in records) == 4
    np.testing.assert_allclose(records[0].joints[8], [981.7591, 234.9694], atol=1e-3)


def test_centre_and_scale_get_simplebaseline_adjustment(ann, mpii_dir, raw):
    records = load_mpii(ann, mpii_dir)
    # 005808361.jpg: centre (966, 340), scale 4.718488 in the file
    np.testing.assert_allclose(records[0].center, [965.0, 340 + 15 * 4.718488 - 1], atol=1e-3)
    assert records[0].scale == pytest.approx(4.718488 * 1.25)
    for r, e in zip(records, raw, strict=True):
        (cx, cy), s = e["center"], e["scale"]
        np.testing.assert_allclose(r.center, [cx - 1, cy + 15 * s - 1], atol=1e-3)
        assert r.scale == pytest.approx(1.25 * s)


def test_placeholder_centre_is_not_adjusted(tmp_path, mpii_dir, raw):
    entries = json.loads(json.dumps(raw))
    entries[1]["center"] = [-1, -1]
    path = tmp_path / "placeholder.json"
    path.write_text(json.dumps(entries))
    r = load_mpii(path, mpii_dir)[1]
    np.testing.assert_allclose(r.center, [-2, -2])
    assert r.scale == pytest.approx(raw[1]["scale"])


def test_test_set_without_joints(tmp_path, mpii_dir, raw):
    entries = [{k: e[k] for k in ("image", "center", "scale")} for e in raw]
    path = tmp_path / "test.json"
    path.write_text(json.dumps(entries))
    records = load_mpii(path, mpii_dir)
    assert len(records) == 5 and all(r.visibility.sum() == 0 for r in records)


def test_head_boxes_from_gt_valid(tmp_path, ann, mpii_dir, raw):
    mat = write_gt_valid(tmp_path / "gt_valid.mat", raw)
    boxes = load_mpii_headboxes(mat)
    assert boxes.shape == (5, 4)
    head = np.array(raw[2]["joints"][9]) - 1  # 0-based head-top
    np.testing.assert_allclose(boxes[2], [*(head - 20), *(head + 20)], atol=1e-4)
    records = load_mpii(ann, mpii_dir, headboxes=mat)
    np.testing.assert_allclose(np.stack([r.head_box for r in records]), boxes)


def test_inspect_checks_head_boxes_against_the_annotations(tmp_path, ann, mpii_dir, raw, capsys):
    args = [
        "data",
        "inspect",
        "--dataset",
        "mpii",
        "--root",
        str(mpii_dir),
        "--ann",
        str(ann),
        "--headboxes",
    ]
    assert main([*args, str(write_gt_valid(tmp_path / "gt_valid.mat", raw))]) == 0
    assert re.search(r"head boxes\s*│\s*5\s*│", capsys.readouterr().out)
    # the same boxes in another order belong to other people: one error line, exit code 2
    shuffled = write_gt_valid(tmp_path / "shuffled.mat", raw, order=[4, 0, 1, 2, 3])
    assert main([*args, str(shuffled)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "shuffled.mat" in err[0]


def test_head_boxes_must_match_record_count(tmp_path, ann, mpii_dir, raw):
    mat = write_gt_valid(tmp_path / "gt_valid.mat", raw, count=4)
    with pytest.raises(DatasetError, match=r"gt_valid\.mat.*4 head boxes.*test_mpii\.json has 5"):
        load_mpii(ann, mpii_dir, headboxes=mat)


def test_head_boxes_in_another_order_are_rejected(tmp_path, ann, mpii_dir, raw):
    mat = write_gt_valid(tmp_path / "gt_valid.mat", raw, order=[4, 0, 1, 2, 3])
    with pytest.raises(DatasetError, match=r"gt_valid\.mat.*another order"):
        load_mpii(ann, mpii_dir, headboxes=mat)


def test_one_stray_label_in_gt_valid_is_tolerated(tmp_path, ann, mpii_dir, raw):
    entries = json.loads(json.dumps(raw))
    entries[3]["joints"][0] = [entries[3]["joints"][0][0] + 30, entries[3]["joints"][0][1]]
    mat = write_gt_valid(tmp_path / "gt_valid.mat", entries)
    assert len(load_mpii(ann, mpii_dir, headboxes=mat)) == 5


def test_load_split_with_test_file_and_head_boxes(tmp_path, ann, mpii_dir, raw):
    mat = write_gt_valid(tmp_path / "gt_valid.mat", raw)
    cfg = DataConfig(
        dataset="mpii", root=str(mpii_dir), ann=str(ann), test_ann=str(ann), headboxes=str(mat)
    )
    train, skeleton = load_split(cfg, "train")
    test, _ = load_split(cfg, "test")
    assert skeleton is MPII
    assert len(train) == len(test) == 5
    assert all(r.head_box is None for r in train) and all(r.head_box is not None for r in test)


def test_load_split_holds_out_a_fraction_without_test_file(ann, mpii_dir):
    cfg = DataConfig(dataset="mpii", root=str(mpii_dir), ann=str(ann), test_fraction=0.4)
    train, _ = load_split(cfg, "train")
    test, _ = load_split(cfg, "test")
    assert (len(train), len(test)) == (3, 2)
    assert not {r.image for r in train} & {r.image for r in test}
    assert [r.record_id for r in load_split(cfg, "test")[0]] == [r.record_id for r in test]
