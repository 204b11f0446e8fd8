"""Seeded fuzzing of every input file type: COCO and MPII JSON, MPII head boxes and LSP joints
(MATLAB), predictions and images, corrupted in hundreds of ways. Whatever the corruption, the
command either succeeds or prints exactly one `error:` line naming the broken file and exits 2:
never a traceback, never another exit code."""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from fedpose.cli import main

SEED = 20261129
W, H = 64, 48


# ----------------------------------------------------------------------------- tiny datasets
def _images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        pixels = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)


def _coco(root: Path) -> dict:
    names = ["a.png", "b.png", "c.png"]
    _images(root, names)
    rng = np.random.default_rng(1)
    anns = []
    for i in range(4):
        kps = []
        for _ in range(17):
            kps += [float(rng.uniform(5, W - 5)), float(rng.uniform(5, H - 5)), 2]
        anns.append(
            {
                "id": i + 1,
                "image_id": i % 3 + 1,
                "category_id": 1,
                "iscrowd": 0,
                "num_keypoints": 17,
                "keypoints": kps,
                "bbox": [4.0, 3.0, 50.0, 40.0],
            }
        )
    return {
        "images": [
            {"id": i + 1, "file_name": n, "width": W, "height": H} for i, n in enumerate(names)
        ],
        "annotations": anns,
        "categories": [{"id": 1, "name": "person", "keypoints": [f"k{j}" for j in range(17)]}],
    }


def _mpii(root: Path) -> list:
    names = ["m1.png", "m2.png", "m3.png"]
    _images(root, names)
    rng = np.random.default_rng(2)
    return [
        {
            "image": n,
            "center": [32.0, 20.0],
            "scale": 0.2,
            "joints": [
                [float(rng.uniform(5, W - 5)), float(rng.uniform(5, H - 5))] for _ in range(16)
            ],
            "joints_vis": [1] * 16,
        }
        for n in names
    ]


def _headboxes(n: int) -> dict:
    src = np.zeros((2, 2, n))
    src[0, :, :] = [[10.0], [5.0]]
    src[1, :, :] = [[30.0], [25.0]]
    return {"headboxes_src": src}


def _lsp(root: Path) -> dict:
    _images(root / "images", [f"im{i:04d}.jpg" for i in range(1, 4)])
    rng = np.random.default_rng(3)
    joints = np.zeros((3, 14, 3))
    joints[0] = rng.uniform(5, W - 5, (14, 3))
    joints[1] = rng.uniform(5, H - 5, (14, 3))
    return {"joints": joints}


# ----------------------------------------------------------------------------- corruptions
def _paths(tree, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree[:6]):  # the first few entries are enough to reach every kind
            out += _paths(v, (*prefix, i))
    return out


DEEP = "__deeply_nested__"  # replaced in the written text: json.dumps cannot nest that deep


def _dumps(tree) -> str:
    return json.dumps(tree).replace(f'"{DEEP}"', "[" * 100_000 + "1" + "]" * 100_000)


VALUES: list[Callable[[object], object]] = [
    lambda v: None,
    lambda v: "x",
    lambda v: str(v)[:20],
    lambda v: True,
    lambda v: [],
    lambda v: {},
    lambda v: float("nan"),
    lambda v: float("inf"),
    lambda v: -float("inf"),
    lambda v: 1e30,
    lambda v: -1e30,
    lambda v: -1,
    lambda v: 0,
    lambda v: 3,
    lambda v: [v, v],
    lambda v: [[v]],
    lambda v: DEEP,
    lambda v: list(range(1000)),
    lambda v: {"a": v},
    lambda v: 2.5,
]


def _mutate_tree(tree, rng: random.Random):
    tree = copy.deepcopy(tree)
    path = rng.choice(_paths(tree)[1:])
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    action = rng.random()
    if action < 0.12 and isinstance(parent, dict):
        del parent[path[-1]]
    elif action < 0.2 and isinstance(parent, list):
        parent.append(copy.deepcopy(parent[path[-1]]))  # a duplicated entry (duplicated ids)
    else:
        parent[path[-1]] = rng.choice(VALUES)(parent[path[-1]])
    return tree


def _mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:
        return data[: rng.randrange(len(data))]  # truncated
    if kind == 1:
        return b""
    if kind == 2:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))  # garbage
    if kind == 3:
        flipped = bytearray(data)
        for _ in range(rng.randrange(1, 20)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        return bytes(flipped)
    return data * 2  # two files in one


def _mutate_mat(mat: dict, rng: random.Random) -> dict:
    name = next(iter(mat))
    arr = np.array(mat[name], dtype=np.float64)
    kind = rng.randrange(9)
    if kind == 0:
        return {"other": arr}
    if kind == 1:
        return {name: arr[:, :, :0] if arr.ndim == 3 else arr[:0]}
    if kind == 2:
        return {name: arr.reshape(-1)}
    if kind == 3:
        bad = arr.copy()
        bad.flat[rng.randrange(bad.size)] = rng.choice([np.nan, np.inf, -np.inf, 1e30, -1e30])
        return {name: bad}
    if kind == 4:
        return {name: "text"}
    if kind == 5:
        return {name: arr[:, :-1] if arr.ndim == 3 else arr}
    if kind == 6:
        bad = arr.copy()
        bad[-1] = 7  # flags / coordinates out of range
        return {name: bad}
    if kind == 7:
        return {name: np.swapaxes(arr, 0, -1)}
    return {name: arr * 1e6}


# ----------------------------------------------------------------------------- the cases
def _cases() -> list[tuple[str, int]]:
    per_kind = {
        "coco-json": 70,
        "coco-bytes": 12,
        "mpii-json": 45,
        "mpii-bytes": 8,
        "headboxes-mat": 16,
        "lsp-mat": 22,
        "mat-bytes": 10,
        "image": 16,
        "pred-json": 20,
    }
    return [(kind, i) for kind, n in per_kind.items() for i in range(n)]


CASES = _cases()
OUTCOMES: dict[tuple[str, int], int] = {}  # exit code per case, for the final count


def test_there_are_at_least_200_cases():
    assert len(CASES) >= 200


def _check_contract(argv: list[str], broken: Path, capsys) -> int:
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc in (0, 2), (rc, captured.err)
    if rc == 2:
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        assert broken.name in lines[0], lines[0]
        assert "Traceback" not in captured.err
    else:
        assert captured.err.strip() == "", captured.err
    return rc


@pytest.mark.parametrize(("kind", "index"), CASES, ids=[f"{k}-{i}" for k, i in CASES])
def test_corrupted_input_gives_one_error_line_or_success(tmp_path, capsys, kind, index):
    rng = random.Random(f"{SEED}-{kind}-{index}")
    if kind.startswith("coco") or kind in ("image", "pred-json"):
        root = tmp_path / "coco"
        data = _coco(root)
        ann = tmp_path / "person_keypoints.json"
        ann.write_text(json.dumps(data))
        argv = ["data", "inspect", "--dataset", "coco", "--root", str(root), "--ann", str(ann)]
        broken = ann
        if kind == "coco-json":
            ann.write_text(_dumps(_mutate_tree(data, rng)))
        elif kind == "coco-bytes":
            ann.write_bytes(_mutate_bytes(ann.read_bytes(), rng))
        elif kind == "image":
            broken = root / rng.choice(["a.png", "b.png", "c.png"])
            broken.write_bytes(_mutate_bytes(broken.read_bytes(), rng))
        else:
            preds: dict = {}
            for a in data["annotations"]:
                name = data["images"][a["image_id"] - 1]["file_name"]
                kps = np.array(a["keypoints"]).reshape(-1, 3)[:, :2].tolist()
                preds.setdefault(name, []).append(kps)
            broken = tmp_path / "pred.json"
            broken.write_text(_dumps(_mutate_tree(preds, rng)))
            argv = [
                "score",
                "--dataset",
                "coco",
                "--root",
                str(root),
                "--ann",
                str(ann),
                "--pred",
                str(broken),
            ]
    elif kind.startswith("mpii") or kind == "headboxes-mat":
        root = tmp_path / "mpii"
        entries = _mpii(root)
        ann = tmp_path / "train.json"
        ann.write_text(json.dumps(entries))
        argv = ["data", "inspect", "--dataset", "mpii", "--root", str(root), "--ann", str(ann)]
        broken = ann
        if kind == "mpii-json":
            ann.write_text(_dumps(_mutate_tree(entries, rng)))
        elif kind == "mpii-bytes":
            ann.write_bytes(_mutate_bytes(ann.read_bytes(), rng))
        else:
            broken = tmp_path / "gt_valid.mat"
            scipy.io.savemat(broken, _mutate_mat(_headboxes(len(entries)), rng))
            preds = {e["image"]: e["joints"] for e in entries}
            (tmp_path / "pred.json").write_text(json.dumps(preds))
            argv = [
                "score",
                "--dataset",
                "mpii",
                "--root",
                str(root),
                "--ann",
                str(ann),
                "--headboxes",
                str(broken),
                "--pred",
                str(tmp_path / "pred.json"),
            ]
    else:
        root = tmp_path / "lsp"
        mat = _lsp(root)
        broken = root / "joints.mat"
        if kind == "lsp-mat":
            scipy.io.savemat(broken, _mutate_mat(mat, rng))
        else:
            scipy.io.savemat(broken, mat)
            broken.write_bytes(_mutate_bytes(broken.read_bytes(), rng))
        argv = ["data", "inspect", "--dataset", "lsp", "--root", str(root)]
    OUTCOMES[(kind, index)] = _check_contract(argv, broken, capsys)


def test_uncorrupted_inputs_pass(tmp_path, capsys):
    """The fuzzed files start valid: each command succeeds on them unchanged."""
    root = tmp_path / "coco"
    ann = tmp_path / "person_keypoints.json"
    ann.write_text(json.dumps(_coco(root)))
    assert (
        main(["data", "inspect", "--dataset", "coco", "--root", str(root), "--ann", str(ann)]) == 0
    )
    mroot = tmp_path / "mpii"
    entries = _mpii(mroot)
    (tmp_path / "train.json").write_text(json.dumps(entries))
    scipy.io.savemat(tmp_path / "gt_valid.mat", _headboxes(len(entries)))
    (tmp_path / "pred.json").write_text(json.dumps({e["image"]: e["joints"] for e in entries}))
    assert (
        main(
            [
                "score",
                "--dataset",
                "mpii",
                "--root",
                str(mroot),
                "--ann",
                str(tmp_path / "train.json"),
                "--headboxes",
                str(tmp_path / "gt_valid.mat"),
                "--pred",
                str(tmp_path / "pred.json"),
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip().splitlines()[-1] == "mean PCK: 100.00"
    lroot = tmp_path / "lsp"
    scipy.io.savemat(lroot / "joints.mat", _lsp(lroot))
    assert main(["data", "inspect", "--dataset", "lsp", "--root", str(lroot)]) == 0


@pytest.mark.parametrize(
    ("argv_tail", "message"),
    [
        (["--alpha", "1e9"], "--alpha 1000000000.0 is out of range; allowed: (0, 1]"),
        (["--alpha", "0"], "--alpha 0.0 is out of range"),
        (["--alpha", "nan"], "--alpha nan is out of range"),
    ],
)
def test_score_alpha_outside_0_1_is_refused(tmp_path, capsys, argv_tail, message):
    root = tmp_path / "coco"
    ann = tmp_path / "person_keypoints.json"
    ann.write_text(json.dumps(_coco(root)))
    (tmp_path / "p.json").write_text("{}")
    assert (
        main(
            [
                "score",
                "--dataset",
                "coco",
                "--root",
                str(root),
                "--ann",
                str(ann),
                "--pred",
                str(tmp_path / "p.json"),
                *argv_tail,
            ]
        )
        == 2
    )
    assert message in capsys.readouterr().err


def test_mpii_pckh_without_head_boxes_is_an_error(tmp_path, capsys):
    root = tmp_path / "mpii"
    entries = _mpii(root)
    (tmp_path / "train.json").write_text(json.dumps(entries))
    (tmp_path / "pred.json").write_text(json.dumps({e["image"]: e["joints"] for e in entries}))
    assert (
        main(
            [
                "score",
                "--dataset",
                "mpii",
                "--root",
                str(root),
                "--ann",
                str(tmp_path / "train.json"),
                "--pred",
                str(tmp_path / "pred.json"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs head boxes" in err[0]


def test_absurd_coco_box_cannot_make_wrong_predictions_score_100(tmp_path, capsys):
    root = tmp_path / "coco"
    data = _coco(root)
    data["annotations"][0]["bbox"] = [0, 0, 1e30, 1e30]
    ann = tmp_path / "person_keypoints.json"
    ann.write_text(json.dumps(data))
    assert (
        main(["data", "inspect", "--dataset", "coco", "--root", str(root), "--ann", str(ann)]) == 2
    )
    err_line = capsys.readouterr().err.strip()
    assert "bbox" in err_line and "outside the 64x48 image" in err_line


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["annotations"].append(dict(d["annotations"][0])), "duplicated annotation id"),
        (lambda d: d["images"].append(dict(d["images"][0])), "duplicated image id"),
        (lambda d: d["annotations"][0].update(bbox=["4", "3", "50", "40"]), "bbox must be numbers"),
        (lambda d: d["annotations"][0]["keypoints"].__setitem__(2, 3), "flags v must be 0, 1 or 2"),
        (lambda d: d.update(annotations=[]), "zero records"),
    ],
)
def test_coco_absurd_values(tmp_path, capsys, change, message):
    root = tmp_path / "coco"
    data = _coco(root)
    change(data)
    ann = tmp_path / "person_keypoints.json"
    ann.write_text(json.dumps(data))
    assert (
        main(["data", "inspect", "--dataset", "coco", "--root", str(root), "--ann", str(ann)]) == 2
    )
    assert message in capsys.readouterr().err


def test_inspect_decodes_every_image_unless_quick(tmp_path, capsys):
    root = tmp_path / "coco"
    ann = tmp_path / "person_keypoints.json"
    ann.write_text(json.dumps(_coco(root)))
    image = root / "b.png"
    image.write_bytes(image.read_bytes()[: len(image.read_bytes()) // 2])  # header intact
    argv = ["data", "inspect", "--dataset", "coco", "--root", str(root), "--ann", str(ann)]
    assert main(argv) == 2
    assert "b.png" in capsys.readouterr().err
    assert main([*argv, "--quick"]) == 0


def test_most_corruptions_are_refused():
    """Runs after the cases above (file order): a loader that accepted everything would pass each
    case by exiting 0; at least four in five corruptions must be refused."""
    if len(OUTCOMES) < len(CASES):
        pytest.skip("needs every fuzz case of this module in the same session")
    refused = sum(rc == 2 for rc in OUTCOMES.values())
    assert refused >= 0.8 * len(CASES), f"{refused} of {len(CASES)} corruptions refused"
