"""synth-arm: determinism, balanced views, a valid COCO layout, keypoints where they belong."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedpose.data.synth_arm import VIEWS, generate_synth_arm, preview_grid

N, SIZE = 16, 64


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synth")
    return {
        "a": generate_synth_arm(root / "a", n=N, seed=5, size=SIZE, progress=False),
        "b": generate_synth_arm(root / "b", n=N, seed=5, size=SIZE, progress=False),
        "c": generate_synth_arm(root / "c", n=N, seed=6, size=SIZE, progress=False),
    }


def test_same_seed_same_bytes(sets):
    a, b = sets["a"], sets["b"]
    assert a.name == "annotations.json"
    assert a.read_bytes() == b.read_bytes()
    for name in ("000000.png", "000007.png", f"{N - 1:06d}.png"):
        assert (a.parent / "images" / name).read_bytes() == (
            b.parent / "images" / name
        ).read_bytes()


def test_other_seed_differs(sets):
    a, c = sets["a"], sets["c"]
    assert a.read_bytes() != c.read_bytes()
    img = "images/000003.png"
    assert (a.parent / img).read_bytes() != (c.parent / img).read_bytes()


def test_coco_layout(sets):
    coco = json.loads(sets["a"].read_text())
    assert len(coco["images"]) == len(coco["annotations"]) == N
    (cat,) = coco["categories"]
    assert cat["id"] == 1 and cat["keypoints"] == ["shoulder", "elbow", "wrist"]
    assert cat["skeleton"] == [[1, 2], [2, 3]]
    images = {im["id"]: im for im in coco["images"]}
    for ann in coco["annotations"]:
        im = images[ann["image_id"]]
        assert im["width"] == im["height"] == SIZE
        path = sets["a"].parent / "images" / im["file_name"]
        with Image.open(path) as pic:
            assert pic.size == (SIZE, SIZE) and pic.mode == "RGB"
        assert ann["category_id"] == 1 and ann["iscrowd"] == 0
        assert len(ann["keypoints"]) == 9
        flags = ann["keypoints"][2::3]
        assert set(flags) <= {0, 1, 2}
        assert ann["num_keypoints"] == sum(v > 0 for v in flags)
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and 0 < ann["area"] <= w * h + 1e-6
        attrs = ann["attributes"]
        assert attrs["view"] in VIEWS
        assert attrs["posture"] in ("upright", "extended")
        assert isinstance(attrs["facing"], str)
        assert len(attrs["occluded"]) == 3
        # COCO's flag 1 is exactly "labelled but covered"
        assert [int(v == 1) for v in flags] == attrs["occluded"]


def test_views_balanced_and_keypoints_inside(sets):
    coco = json.loads(sets["a"].read_text())
    views = Counter(a["attributes"]["view"] for a in coco["annotations"])
    assert views == {v: N // 4 for v in VIEWS}
    for ann in coco["annotations"]:
        kp = np.asarray(ann["keypoints"], float).reshape(3, 3)
        x, y, w, h = ann["bbox"]
        for jx, jy, v in kp:
            if v > 0:
                assert 0 <= jx < SIZE and 0 <= jy < SIZE
                assert x - 1e-6 <= jx <= x + w + 1e-6 and y - 1e-6 <= jy <= y + h + 1e-6
            else:
                assert jx == jy == 0


def test_views_differ(sets):
    """The arm lies on opposite image sides from the front and from the back."""
    coco = json.loads(sets["a"].read_text())
    side: dict[str, list[float]] = {}
    for ann in coco["annotations"]:
        kp = np.asarray(ann["keypoints"], float).reshape(3, 3)
        x, _, w, _ = ann["bbox"]
        if kp[0, 2] > 0:
            side.setdefault(ann["attributes"]["view"], []).append((kp[0, 0] - x) / w)
    assert np.mean(side["anterior"]) < 0.5 < np.mean(side["posterior"])


def test_preview(sets, tmp_path):
    out = preview_grid(sets["a"], tmp_path / "grid.png", per_view=2, tile=64)
    with Image.open(out) as grid:
        assert grid.size[1] == 4 * 64


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n >= 1"):
        generate_synth_arm(tmp_path, n=0, progress=False)


def test_a_failed_write_leaves_neither_the_file_nor_its_temporary(tmp_path):
    from fedpose.files import write_atomically

    target = tmp_path / "annotations.json"

    def half_written(tmp: Path) -> None:
        tmp.write_text('{"images": [')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, half_written)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # starts fresh interpreters
def test_worker_processes_give_the_same_files(tmp_path):
    serial = generate_synth_arm(tmp_path / "s", n=128, seed=2, size=32, progress=False)
    pooled = generate_synth_arm(tmp_path / "p", n=128, seed=2, size=32, progress=False, workers=2)
    assert serial.read_bytes() == pooled.read_bytes()
    for name in ("000000.png", "000127.png"):
        assert (serial.parent / "images" / name).read_bytes() == (
            pooled.parent / "images" / name
        ).read_bytes()
