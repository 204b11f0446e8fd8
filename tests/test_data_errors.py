"""Malformed input, case by case: every loader raises DatasetError naming the file and record."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import scipy.io

from fedpose.cli import main
from fedpose.data.coco import load_coco
from fedpose.data.lsp import load_lsp
from fedpose.data.mpii import load_mpii, load_mpii_headboxes
from fedpose.data.records import DatasetError

# ------------------------------------------------------------------------------------------ LSP


@pytest.fixture
def lsp_copy(tmp_path, lsp_dir):
    """A 3-image LSP folder; returns (root, joints 3x14x3) for the test to break and save."""
    root = tmp_path / "lsp"
    (root / "images").mkdir(parents=True)
    for i in (1, 2, 3):
        shutil.copy(lsp_dir / "images" / f"im{i:04d}.jpg", root / "images")
    joints = scipy.io.loadmat(lsp_dir / "joints.mat")["joints"][:, :, :3].copy()
    return root, joints


def save(root, joints, name="joints.mat"):
    scipy.io.savemat(root / name, {"joints": joints})


def test_lsp_copy_loads_when_intact(lsp_copy):
    root, joints = lsp_copy
    save(root, joints)
    ids = [r.record_id for r in load_lsp(root, "all")]
    assert ids == ["im0001.jpg", "im0002.jpg", "im0003.jpg"]


def test_lsp_missing_file(lsp_copy):
    root, _ = lsp_copy
    with pytest.raises(DatasetError, match=r"joints_OC\.mat: file not found"):
        load_lsp(root, "all", labels="oc")


def test_lsp_unreadable_mat(lsp_copy):
    root, _ = lsp_copy
    (root / "joints.mat").write_bytes(b"this is not MATLAB data" * 20)
    with pytest.raises(DatasetError, match=r"joints\.mat: not a readable MATLAB file"):
        load_lsp(root, "all")


def test_lsp_missing_variable(lsp_copy):
    root, joints = lsp_copy
    scipy.io.savemat(root / "joints.mat", {"points": joints})
    with pytest.raises(DatasetError, match=r"joints\.mat: no variable 'joints'"):
        load_lsp(root, "all")


def test_lsp_wrong_shape(lsp_copy):
    root, joints = lsp_copy
    save(root, joints.transpose(1, 0, 2))  # 14x3xN: the LSP-extended layout
    with pytest.raises(DatasetError, match=r"joints\.mat: .*3x14xN.*not 14x3x3"):
        load_lsp(root, "all")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_lsp_non_finite_coordinate(lsp_copy, value):
    root, joints = lsp_copy
    joints[1, 4, 1] = value
    save(root, joints)
    with pytest.raises(DatasetError, match=r"joints\.mat \[record im0002\.jpg\]: .*l_knee"):
        load_lsp(root, "all")


def test_lsp_missing_image(lsp_copy):
    root, joints = lsp_copy
    save(root, joints)
    (root / "images" / "im0003.jpg").unlink()
    with pytest.raises(DatasetError, match=r"joints\.mat \[record im0003\.jpg\]: image not found"):
        load_lsp(root, "all")


def test_lsp_unreadable_image(lsp_copy):
    root, joints = lsp_copy
    save(root, joints)
    (root / "images" / "im0002.jpg").write_bytes(b"\x00" * 100)
    with pytest.raises(DatasetError, match=r"joints\.mat \[record im0002\.jpg\]: cannot read"):
        load_lsp(root, "all")


def test_lsp_joint_far_outside_image(lsp_copy):
    root, joints = lsp_copy
    joints[0, 0, 1] = 1000.0  # im0002 is well under 200 px wide
    save(root, joints)
    with pytest.raises(DatasetError, match=r"joints\.mat \[record im0002\.jpg\]: .*far outside"):
        load_lsp(root, "all")


def test_lsp_joint_slightly_outside_image_is_fine(lsp_copy):
    root, joints = lsp_copy
    joints[0, 0, 1] = -5.0  # a few pixels past the left edge, as real LSP labels do
    save(root, joints)
    assert load_lsp(root, "all")[1].joints[0, 0] == -6.0


def test_lsp_standard_split_needs_all_images(lsp_copy):
    root, joints = lsp_copy
    save(root, joints)
    with pytest.raises(DatasetError, match=r"joints\.mat: the standard train split needs 2000"):
        load_lsp(root, "train")


def test_lsp_bad_occlusion_flag(lsp_copy):
    root, joints = lsp_copy
    joints[2, 0, 2] = 7
    save(root, joints)
    with pytest.raises(DatasetError, match=r"joints\.mat \[record im0003\.jpg\]: occlusion flags"):
        load_lsp(root, "all")


# ----------------------------------------------------------------------------------------- MPII


@pytest.fixture
def mpii(mpii_dir):
    return mpii_dir, json.loads((mpii_dir / "test_mpii.json").read_text())


def set_joint0(e):
    e["joints"][0] = [float("nan"), 3.0]


def far_joint(e):
    e["joints"][12] = [1e5, 1e5]


MPII_CASES = {
    "joints_not_16x2": (lambda e: e["joints"].pop(), r"joints must be 16 \[x, y\] pairs.*15x2"),
    "joints_ragged": (lambda e: e["joints"][3].append(1.0), r"joints must be 16 \[x, y\] pairs"),
    "joints_vis_short": (lambda e: e["joints_vis"].pop(), r"joints_vis must be 16 flags"),
    "nan_joint": (set_joint0, r"joint 0 \(r_ankle\) has a non-finite coordinate"),
    "far_outside": (far_joint, r"joint 12 \(r_shoulder\) at \(99999\.0, 99999\.0\) lies far"),
    "missing_image": (lambda e: e.update(image="nope.jpg"), r"image not found: .*nope\.jpg"),
    "negative_scale": (lambda e: e.update(scale=-2.0), r"scale > 0"),
    "text_scale": (lambda e: e.update(scale="big"), r"scale must be a number"),
    "no_center": (lambda e: e.pop("center"), r"center must be \[x, y\]"),
}


@pytest.mark.parametrize("case", MPII_CASES)
def test_mpii_broken_entry(tmp_path, mpii, case):
    image_dir, entries = mpii
    breaker, problem = MPII_CASES[case]
    breaker(entries[2])
    path = tmp_path / "broken_mpii.json"
    path.write_text(json.dumps(entries))
    record = "nope.jpg#2" if case == "missing_image" else "051423444.jpg#2"
    with pytest.raises(DatasetError, match=rf"broken_mpii\.json \[record {record}\]: .*{problem}"):
        load_mpii(path, image_dir)


def test_mpii_missing_file(tmp_path, mpii):
    with pytest.raises(DatasetError, match=r"absent\.json: file not found"):
        load_mpii(tmp_path / "absent.json", mpii[0])


def test_mpii_bad_json(tmp_path, mpii):
    path = tmp_path / "cut.json"
    path.write_text((mpii[0] / "test_mpii.json").read_text()[:500])
    with pytest.raises(DatasetError, match=r"cut\.json: not valid JSON"):
        load_mpii(path, mpii[0])


def test_mpii_not_a_list(tmp_path, mpii):
    path = tmp_path / "dict.json"
    path.write_text(json.dumps({"annolist": mpii[1]}))
    with pytest.raises(DatasetError, match=r"dict\.json: expected a JSON list"):
        load_mpii(path, mpii[0])


def test_mpii_entry_without_image(tmp_path, mpii):
    entries = mpii[1]
    del entries[4]["image"]
    path = tmp_path / "noimage.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(DatasetError, match=r"noimage\.json \[record 4\]: .*'image'"):
        load_mpii(path, mpii[0])


def test_headboxes_missing_file(tmp_path):
    with pytest.raises(DatasetError, match=r"gt_valid\.mat: file not found"):
        load_mpii_headboxes(tmp_path / "gt_valid.mat")


def test_headboxes_wrong_shape(tmp_path):
    path = tmp_path / "gt_valid.mat"
    scipy.io.savemat(path, {"headboxes_src": np.zeros((4, 5))})
    with pytest.raises(DatasetError, match=r"gt_valid\.mat: 'headboxes_src' must be .*2x2xN"):
        load_mpii_headboxes(path)


def test_headboxes_missing_variable(tmp_path):
    path = tmp_path / "gt_valid.mat"
    scipy.io.savemat(path, {"pos_gt_src": np.zeros((16, 2, 5))})
    with pytest.raises(DatasetError, match=r"gt_valid\.mat: no variable 'headboxes_src'"):
        load_mpii_headboxes(path)


def test_headboxes_nan(tmp_path):
    path = tmp_path / "gt_valid.mat"
    boxes = np.ones((2, 2, 3))
    boxes[1, 0, 2] = np.nan
    scipy.io.savemat(path, {"headboxes_src": boxes})
    with pytest.raises(DatasetError, match=r"gt_valid\.mat \[record 2\]: .*non-finite"):
        load_mpii_headboxes(path)


# ----------------------------------------------------------------------------------------- COCO


@pytest.fixture
def coco(coco_dir):
    return coco_dir, json.loads((coco_dir / "test_coco.json").read_text())


def first(data):
    return data["annotations"][0]


def set_kp(index, value):
    def breaker(data):
        first(data)["keypoints"][index] = value

    return breaker


COCO_CASES = {
    # (breaker, record named in the message, problem)
    "keypoints_not_triples": (
        lambda d: first(d)["keypoints"].pop(),
        "annotation 442619",
        r"keypoints must be a flat list \[x, y, v\] \* K",
    ),
    "bad_flag": (set_kp(2, 3), "annotation 442619", r"flags v must be 0, 1 or 2"),
    "nan_keypoint": (set_kp(3, float("nan")), "000000000785.jpg#442619", "non-finite"),
    "far_outside": (set_kp(0, 5000), "000000000785.jpg#442619", r"at \(5000\.0, 81\.0\)"),
    "inconsistent_k": (
        lambda d: d["annotations"][1]["keypoints"].extend([1, 1, 2]),
        "annotation 198196",
        r"has 18 keypoints; earlier annotations have 17",
    ),
    "missing_image": (
        lambda d: d["images"][0].update(file_name="gone.jpg"),
        "gone.jpg#442619",
        r"image not found: .*gone\.jpg",
    ),
    "unknown_image_id": (
        lambda d: first(d).update(image_id=1),
        "annotation 442619",
        r"image_id 1 is not in 'images'",
    ),
    "zero_width_bbox": (
        lambda d: first(d)["bbox"].__setitem__(2, 0),
        "000000000785.jpg#442619",
        r"bbox must be \[x, y, w, h\] with w, h > 0",
    ),
    "attributes_not_object": (
        lambda d: first(d).update(attributes=["anterior"]),
        "000000000785.jpg#442619",
        r"'attributes' must be an object",
    ),
}


@pytest.mark.parametrize("case", COCO_CASES)
def test_coco_broken_annotation(tmp_path, coco, case):
    image_dir, data = coco
    breaker, record, problem = COCO_CASES[case]
    breaker(data)
    path = tmp_path / "broken_coco.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=rf"broken_coco\.json \[record {record}\]: .*{problem}"):
        load_coco(path, image_dir)


def test_coco_missing_file(tmp_path, coco):
    with pytest.raises(DatasetError, match=r"person_keypoints_val\.json: file not found"):
        load_coco(tmp_path / "person_keypoints_val.json", coco[0])


def test_coco_bad_json(tmp_path, coco):
    path = tmp_path / "bad.json"
    path.write_text('{"images": [], "annotations": [')
    with pytest.raises(DatasetError, match=r"bad\.json: not valid JSON"):
        load_coco(path, coco[0])


def test_coco_unreadable_bytes(tmp_path, coco):
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DatasetError, match=r"binary\.json: "):
        load_coco(path, coco[0])


def test_coco_without_annotations_list(tmp_path, coco):
    path = tmp_path / "images_only.json"
    path.write_text(json.dumps({"images": coco[1]["images"]}))
    with pytest.raises(DatasetError, match=r"images_only\.json: not a COCO file"):
        load_coco(path, coco[0])


def test_coco_image_entry_without_file_name(tmp_path, coco):
    image_dir, data = coco
    del data["images"][1]["file_name"]
    path = tmp_path / "nofile.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"nofile\.json \[record image 40083\]: .*file_name"):
        load_coco(path, image_dir)


# -------------------------------------------------------------------------------------- inspect


def test_inspect_reports_one_error_line_and_exit_code_2(tmp_path, coco, capsys):
    image_dir, data = coco
    data["annotations"][0]["keypoints"][0] = 5000
    path = tmp_path / "a_rather_long_annotation_file_name_that_would_wrap.json"
    path.write_text(json.dumps(data))
    assert (
        main(["data", "inspect", "--dataset", "coco", "--root", str(image_dir), "--ann", str(path)])
        == 2
    )
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {path} [record 000000000785.jpg#442619]: ")


def test_inspect_succeeds_on_valid_data(coco, capsys):
    ann = coco[0] / "test_coco.json"
    assert (
        main(["data", "inspect", "--dataset", "coco", "--root", str(coco[0]), "--ann", str(ann)])
        == 0
    )
    out = capsys.readouterr().out
    assert "labelled joints" in out and "r_ankle" in out


def test_inspect_mpii_needs_ann(coco, capsys):
    assert main(["data", "inspect", "--dataset", "mpii", "--root", str(coco[0])]) == 2
    assert "needs its annotation file (--ann)" in capsys.readouterr().err
