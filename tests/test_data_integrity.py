"""Data are checked against what is really there: COCO joints and boxes against the image's
own size (not the JSON's width/height), the keypoint count against the file's category, LSP
records against its images, scored images decoded, and `data split` copies that replace what
differs and never leave half an image."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from fedpose.cli import main

COCO_NAMES = [f"k{i}" for i in range(17)]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def _coco(root: Path, keypoints: list[float], width: int = 64, height: int = 48, names=None):
    """One 64x48 image and one person; the JSON may claim another width and height."""
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), (90, 120, 150)).save(root / "a.png")
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": width, "height": height}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "bbox": [10, 10, 30, 30],
                "keypoints": keypoints,
                "num_keypoints": sum(1 for v in keypoints[2::3] if v),
            }
        ],
    }
    if names is not None:
        data["categories"] = [{"id": 1, "name": "person", "keypoints": names}]
    ann = root / "ann.json"
    ann.write_text(json.dumps(data))
    return ann


def _inspect(root: Path, ann: Path) -> list[str]:
    return ["data", "inspect", "--dataset", "coco", "--root", str(root), "--ann", str(ann)]


def _joints(k: int, far: float | None = None) -> list[float]:
    flat = []
    for i in range(k):
        flat += [20.0 + i, 25.0, 2]
    if far is not None:
        flat[0] = far
    return flat


def test_coco_joints_are_checked_against_the_images_own_size(tmp_path, capsys):
    # the JSON claims 60000 x 60000 px; the image has 64 x 48
    ann = _coco(tmp_path, _joints(17, far=50_000.0), width=60_000, height=60_000)
    assert main(_inspect(tmp_path, ann)) == 2
    line = _one_error_line(capsys)
    assert str(ann) in line and "a.png" in line
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps({"a.png": [[20.0, 25.0]] * 17}))
    argv = ["score", "--dataset", "coco", "--root", str(tmp_path), "--ann", str(ann)]
    assert main([*argv, "--pred", str(pred)]) == 2
    assert str(ann) in _one_error_line(capsys)


@pytest.mark.parametrize(("k", "names"), [(3, None), (17, COCO_NAMES[:3]), (3, COCO_NAMES)])
def test_a_coco_file_of_the_wrong_keypoint_count_is_refused(tmp_path, capsys, k, names):
    ann = _coco(tmp_path, _joints(k), names=names)
    assert main(_inspect(tmp_path, ann)) == 2
    assert f"has {k} keypoints per person" in _one_error_line(capsys)


def test_a_coco_file_naming_its_own_keypoints_loads(tmp_path):
    ann = _coco(tmp_path, _joints(3), names=["a", "b", "c"])  # e.g. a site folder of synth-arm
    assert main(_inspect(tmp_path, ann)) == 0


def test_lsp_warns_when_records_and_images_differ(tmp_path, capsys, lsp_dir):
    root = tmp_path / "lsp"
    shutil.copytree(lsp_dir, root)
    shutil.copy(root / "images" / "im0001.jpg", root / "images" / "im0041.jpg")
    assert main(["data", "inspect", "--dataset", "lsp", "--root", str(root)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: "), err
    assert "40 records" in err[0] and "41 im*.jpg images" in err[0]


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_score_decodes_every_image(tmp_path, capsys, coco_dir, damage):
    root = tmp_path / "coco"
    shutil.copytree(coco_dir, root)
    image = sorted(root.glob("*.jpg"))[0]
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    ann = root / "test_coco.json"
    gt = json.loads(ann.read_text())
    results = [
        {"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
        for a in gt["annotations"]
        if a["num_keypoints"] > 0 and not a["iscrowd"]
    ]
    pred = tmp_path / "res.json"
    pred.write_text(json.dumps(results))
    argv = ["score", "--dataset", "coco", "--root", str(root), "--ann", str(ann)]
    assert main([*argv, "--pred", str(pred)]) == 2
    assert image.name in _one_error_line(capsys)


def test_data_split_replaces_what_differs(tmp_path, synth_dir):
    config = tmp_path / "c.toml"
    config.write_text(
        f'[data]\ndataset = "synth-arm"\nroot = "{synth_dir}"\n[fed]\nnum_clients = 2\n'
        'partition = "iid"\n'
    )
    out = tmp_path / "sites"
    assert main(["data", "split", str(config), str(out)]) == 0
    copies = sorted(out.glob("site*/images/**/*.png"))
    assert len(copies) == 48

    def source(copy: Path) -> Path:
        site_images = out / copy.relative_to(out).parts[0] / "images"
        return synth_dir / "images" / copy.relative_to(site_images)

    truncated, other = copies[0], copies[1]
    truncated.write_bytes(truncated.read_bytes()[:100])  # a split killed mid-copy
    other.write_bytes(source(copies[2]).read_bytes())  # another data set's image, same name
    assert main(["data", "split", str(config), str(out)]) == 0
    for copy in copies:
        assert copy.read_bytes() == source(copy).read_bytes(), copy
