"""COCO keypoint AP: pycocotools' numbers through `fedpose score` and `fedpose eval`, one OKS
worked by hand, SimpleBaseline's rescoring and OKS-NMS, and bad results files."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO as CocoApi
from pycocotools.cocoeval import COCOeval

from fedpose.cli import main
from fedpose.config import Config
from fedpose.data.coco import load_coco
from fedpose.data.records import COCO
from fedpose.metrics.coco_ap import (
    AP_NAMES,
    COCO_SIGMAS,
    keypoint_ap,
    oks,
    oks_nms,
    predictions_ap,
    rescore,
)
from fedpose.model.io import save_model
from fedpose.model.pose_resnet import PoseResNet

pytestmark = pytest.mark.usefixtures("one_thread")
TEST_DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def coco_dir(request):
    """The COCO fixture: the repository's copy, else the shared datasets' one."""
    if (TEST_DATA / "coco").is_dir():
        return TEST_DATA / "coco"
    return request.getfixturevalue("datasets") / "fixtures" / "coco"


@pytest.fixture(scope="module")
def ann(coco_dir):
    return coco_dir / "test_coco.json"


@pytest.fixture(scope="module")
def gt(ann) -> dict:
    return json.loads(ann.read_text())


def _people(gt: dict) -> list[dict]:
    return [a for a in gt["annotations"] if a["num_keypoints"] > 0 and not a["iscrowd"]]


def _score(capsys, coco_dir, ann, pred) -> tuple[int, dict[str, str]]:
    code = main(
        [
            "score",
            "--dataset",
            "coco",
            "--root",
            str(coco_dir),
            "--ann",
            str(ann),
            "--pred",
            str(pred),
        ]
    )
    out = capsys.readouterr().out
    lines = dict(
        line.split(": ", 1)
        for line in out.splitlines()
        if line.split(":")[0] in (*AP_NAMES, "mean PCK")
    )
    return code, lines


def _pycocotools(ann, results_file) -> np.ndarray:
    """The standard pycocotools evaluation of two files, independent of fedpose."""
    with contextlib.redirect_stdout(io.StringIO()):
        truth = CocoApi(str(ann))
        evaluator = COCOeval(truth, truth.loadRes(str(results_file)), "keypoints")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def test_ground_truth_as_results_scores_ap_1(tmp_path, capsys, coco_dir, ann, gt):
    results = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "keypoints": a["keypoints"],
            "score": 1.0,
        }
        for a in _people(gt)
    ]
    (tmp_path / "res.json").write_text(json.dumps(results))
    code, lines = _score(capsys, coco_dir, ann, tmp_path / "res.json")
    assert code == 0
    assert [lines[name] for name in AP_NAMES] == ["1.000"] * len(AP_NAMES)
    assert lines["mean PCK"] == "100.00"
    # the output is fedpose's own lines: pycocotools' progress prints are silenced
    assert "DONE" not in capsys.readouterr().out


def test_perturbed_results_give_pycocotools_values(tmp_path, capsys, coco_dir, ann, gt):
    rng = np.random.default_rng(0)
    results = []
    for i, a in enumerate(_people(gt)):
        kps = np.array(a["keypoints"], dtype=np.float64).reshape(-1, 3)
        # a different error per person, so OKS spreads over the AP thresholds
        kps[:, :2] += rng.normal(0.0, 1.5 * (i % 5), size=(len(kps), 2))
        results.append(
            {
                "image_id": a["image_id"],
                "category_id": 1,
                "keypoints": kps.reshape(-1).tolist(),
                "score": float(rng.uniform()),
            }
        )
    path = tmp_path / "res.json"
    path.write_text(json.dumps(results))
    expected = _pycocotools(ann, path)
    assert 0.2 < expected[0] < 0.95  # a perturbation that the thresholds tell apart

    code, lines = _score(capsys, coco_dir, ann, path)
    assert code == 0
    for name, value in zip(AP_NAMES, expected[:6], strict=True):
        assert lines[name] == f"{value:.3f}", name
    values = keypoint_ap(gt, results)
    np.testing.assert_array_equal([values[name] for name in AP_NAMES], expected[:6])


def test_oks_constants_are_pycocotools_own():
    from pycocotools.cocoeval import Params

    np.testing.assert_array_equal(COCO_SIGMAS, Params(iouType="keypoints").kpt_oks_sigmas)


def test_one_oks_worked_by_hand():
    area = 5000.0
    truth = np.stack([np.arange(17) * 10.0 + 100, np.arange(17) * 7.0 + 50], axis=1)
    labelled = np.ones(17)
    labelled[16] = 0  # an unlabelled keypoint is left out, however wrong its prediction
    pred = truth.copy()
    pred[16] += 500.0
    # keypoints 8..15 moved by the distance at which exp(-d²/(2 s (2σ)²)) = 0.45
    d = np.sqrt(-np.log(0.45) * 2 * area * (2 * COCO_SIGMAS[8:16]) ** 2)
    pred[8:16, 0] += d
    assert oks(pred, truth, labelled, area) == pytest.approx((8 * 1.0 + 8 * 0.45) / 16, abs=1e-12)

    # one person, one prediction of OKS 0.725: matched at thresholds 0.50 .. 0.70, 5 of 10
    flags = np.where(labelled > 0, 2, 0)
    ground_truth = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 640, "height": 480}],
        "categories": [{"id": 1, "name": "person", "keypoints": list(COCO.joints)}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "area": area,
                "bbox": [90.0, 40.0, 180.0, 130.0],
                "num_keypoints": 16,
                "keypoints": np.column_stack([truth, flags]).reshape(-1).tolist(),
            }
        ],
    }
    result = {
        "image_id": 1,
        "category_id": 1,
        "score": 0.9,
        "keypoints": np.column_stack([pred, np.ones(17)]).reshape(-1).tolist(),
    }
    ap = keypoint_ap(ground_truth, [result])
    assert ap["AP"] == pytest.approx(0.5)
    assert ap["AP50"] == pytest.approx(1.0) and ap["AP75"] == 0.0
    # 5000 px² is a medium person (32² to 96²); with no large one, APl is undefined
    assert ap["APm"] == pytest.approx(0.5) and math.isnan(ap["APl"])


def test_rescoring_and_oks_nms():
    conf = np.array([[0.9, 0.5, 0.1, 0.0], [0.1, 0.1, 0.1, 0.1]])
    np.testing.assert_allclose(rescore(conf), [(0.9 + 0.5) / 2, 0.0])

    person = np.stack([np.arange(17) * 10.0, np.arange(17) * 5.0], axis=1)
    people = np.stack([person, person + 0.5, person + 200.0])  # 0 and 1 are the same person
    kept = oks_nms(people, np.array([0.5, 0.8, 0.7]), np.full(3, 1e4))
    assert kept == [1, 2]  # the better-scored duplicate survives, the distant person too
    # OKS of 0 and 1 with a tiny scale: no longer similar, both kept
    assert sorted(oks_nms(people[:2], np.array([0.5, 0.8]), np.full(2, 0.01))) == [0, 1]


def test_results_are_matched_to_people_for_pck(tmp_path, capsys, coco_dir, ann, gt):
    people = _people(gt)
    results = [
        {
            "image_id": a["image_id"],
            "category_id": 1,
            "keypoints": a["keypoints"],
            "score": 0.5 + 0.01 * i,
        }
        for i, a in enumerate(people)
    ]
    path = tmp_path / "res.json"
    path.write_text(json.dumps(results[::-1]))  # any order
    assert _score(capsys, coco_dir, ann, path)[1]["mean PCK"] == "100.00"

    dropped = people[0]  # its person then has no prediction: all its joints miss
    path.write_text(json.dumps(results[1:]))
    lines = _score(capsys, coco_dir, ann, path)[1]
    records = load_coco(ann, coco_dir)
    labelled = sum(int((r.visibility > 0).sum()) for r in records)
    missed = sum(1 for v in dropped["keypoints"][2::3] if v > 0)
    assert lines["mean PCK"] == f"{100 * (labelled - missed) / labelled:.2f}"
    assert lines["AR"] == f"{_pycocotools(ann, path)[5]:.3f}"
    assert float(lines["AR"]) < 1.0


def test_image_name_predictions_get_ap_too(tmp_path, capsys, coco_dir, ann):
    records = load_coco(ann, coco_dir)
    per_image: dict[str, list] = {}
    for r in records:
        per_image.setdefault(r.image.name, []).append(r.joints.tolist())
    (tmp_path / "p.json").write_text(json.dumps(per_image))
    code, lines = _score(capsys, coco_dir, ann, tmp_path / "p.json")
    assert code == 0 and lines["AP"] == "1.000" and lines["mean PCK"] == "100.00"


def test_gt_predictions_with_confidence_score_ap_1(coco_dir, ann):
    records = load_coco(ann, coco_dir)
    preds = np.stack([r.joints for r in records])
    confidence = np.full(preds.shape[:2], 0.8)
    ap = predictions_ap(records, preds, confidence, ann, coco_dir)
    assert ap["AP"] == pytest.approx(1.0) and ap["AR"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ([], "no results in the file"),
        ([{"image_id": 785, "category_id": 1, "keypoints": [0] * 51}], "missing score"),
        (
            [{"image_id": 1, "category_id": 1, "keypoints": [0] * 51, "score": 1}],
            "image_id 1 is not in the annotation file",
        ),
        (
            [{"image_id": 785, "category_id": 7, "keypoints": [0] * 51, "score": 1}],
            "category_id 7 is not in the annotation file",
        ),
        (
            [{"image_id": 785, "category_id": 1, "keypoints": [0] * 50, "score": 1}],
            "keypoints must be 51 finite numbers",
        ),
        (
            [{"image_id": 785, "category_id": 1, "keypoints": [float("nan")] * 51, "score": 1}],
            "keypoints must be 51 finite numbers",
        ),
        (
            [{"image_id": 785, "category_id": 1, "keypoints": [0] * 51, "score": "high"}],
            "score must be a finite number",
        ),
        (["not an object"], "a result must be an object"),
    ],
)
def test_bad_results_file_is_one_error_line(tmp_path, capsys, coco_dir, ann, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    assert (
        main(
            [
                "score",
                "--dataset",
                "coco",
                "--root",
                str(coco_dir),
                "--ann",
                str(ann),
                "--pred",
                str(path),
            ]
        )
        == 2
    )
    out = capsys.readouterr()
    lines = [x for x in (out.out + out.err).splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert str(path) in lines[0] and problem in lines[0]
    if content:
        assert "[record results[0]]" in lines[0]


def test_eval_of_a_coco_model_prints_ap_beside_pck(tmp_path, capsys, coco_dir, ann):
    cfg = Config()
    cfg.data.dataset, cfg.data.input_size = "coco", 32
    cfg.model.depth, cfg.model.width, cfg.model.deconv_filters = 18, 4, 8
    cfg.train.flip_test = False
    torch.manual_seed(0)
    model = PoseResNet(COCO.num_joints, depth=18, width=4, deconv_filters=8)
    save_model(tmp_path / "model.safetensors", model.state_dict(), cfg, COCO)
    assert (
        main(
            [
                "eval",
                str(tmp_path / "model.safetensors"),
                "-c",
                f"data.root={coco_dir}",
                "-c",
                f"data.ann={ann}",
                "-c",
                f"data.test_ann={ann}",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("mean PCK: ")
    printed = [line.split(": ") for line in lines[-1 - len(AP_NAMES) : -1]]
    assert [name for name, _ in printed] == list(AP_NAMES)
    assert all(0.0 <= float(value) <= 1.0 for _, value in printed)


def test_eval_of_synth_arm_says_why_there_is_no_ap(tmp_path, capsys, synth_dir):
    from fedpose.data.records import ARM

    cfg = Config()
    cfg.data.dataset, cfg.data.root, cfg.data.input_size = "synth-arm", str(synth_dir), 32
    cfg.model.depth, cfg.model.width, cfg.model.deconv_filters = 18, 4, 8
    model = PoseResNet(ARM.num_joints, depth=18, width=4, deconv_filters=8)
    save_model(tmp_path / "model.safetensors", model.state_dict(), cfg, ARM)
    assert main(["eval", str(tmp_path / "model.safetensors"), "-c", f"data.root={synth_dir}"]) == 0
    out = capsys.readouterr().out
    assert "keypoint AP: not reported for synth-arm" in out
    assert not any(line.split(":")[0] in AP_NAMES for line in out.splitlines())


def test_own_data_without_area_ids_or_categories(tmp_path, capsys, coco_dir, gt):
    own = json.loads(json.dumps(gt))
    del own["categories"]
    for a in own["annotations"]:
        for key in ("area", "num_keypoints", "id", "category_id"):
            del a[key]
    ann = tmp_path / "own.json"
    ann.write_text(json.dumps(own))
    results = [
        {"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
        for a in own["annotations"]
        if any(a["keypoints"][2::3])
    ]
    (tmp_path / "res.json").write_text(json.dumps(results))
    code, lines = _score(capsys, coco_dir, ann, tmp_path / "res.json")
    assert code == 0 and lines["AP"] == "1.000" and lines["mean PCK"] == "100.00"


def test_pck_of_results_matches_by_distance_after_dropping_duplicates(
    tmp_path, capsys, coco_dir, ann, gt
):
    # exact predictions, each with a far duplicate scored higher, an exact duplicate, and a
    # result for every annotation without labelled keypoints (their keypoints are all 0):
    # none of those may take a person's slot, so PCK stays 100
    exact = [
        {"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 0.5}
        for a in _people(gt)
    ]
    far = [
        {
            **r,
            "keypoints": [v + 1000.0 if i % 3 < 2 else v for i, v in enumerate(r["keypoints"])],
            "score": 0.9,
        }
        for r in exact
    ]
    unlabelled = [
        {"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 0.95}
        for a in gt["annotations"]
        if a["num_keypoints"] == 0 and not a["iscrowd"]
    ]
    path = tmp_path / "res.json"
    path.write_text(json.dumps(far + exact + exact[:1] + unlabelled))
    assert _score(capsys, coco_dir, ann, path)[1]["mean PCK"] == "100.00"
