"""PCK with each dataset's normaliser and mean, and heatmap accuracy (SimpleBaseline, mmpose)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpose.data.records import ARM, COCO, LSP, MPII, PoseRecord, Skeleton
from fedpose.metrics.heatmap import heatmap_accuracy, heatmap_hits
from fedpose.metrics.pck import (
    PCKResult,
    grouped_table,
    pck,
    pck_normalizers,
    render_table,
    score,
)

GOLDEN = Path(__file__).parent / "golden" / "mmpose_pck_accuracy.json"


def _record(joints, visibility=None, head_box=None, person_box=None) -> PoseRecord:
    joints = np.asarray(joints, dtype=np.float32)
    vis = np.ones(len(joints), np.float32) if visibility is None else np.asarray(visibility, float)
    return PoseRecord(
        image=Path("x.jpg"),
        joints=joints,
        visibility=vis,
        center=np.zeros(2, np.float32),
        scale=1.0,
        head_box=None if head_box is None else np.asarray(head_box, float),
        person_box=None if person_box is None else np.asarray(person_box, float),
    )


def test_pck_hand_computed():
    gt = np.zeros((2, 3, 2))
    pred = np.array([[[3, 4], [6, 8], [0, 1]], [[1, 0], [0, 3], [0, 0]]], float)
    visible = np.array([[1, 1, 1], [1, 0, 1]])
    norm = np.array([25.0, 10.0])
    # alpha 0.2: record 0 threshold 5 px (errors 5, 10, 1); record 1 threshold 2 px (1, -, 0)
    acc, count = pck(pred, gt, visible, norm, 0.2)
    np.testing.assert_allclose(acc, [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(count, [2, 1, 2])
    # a zero normaliser drops the record; a joint never counted is nan
    acc, count = pck(pred, gt, visible, np.array([25.0, 0.0]), 0.2)
    np.testing.assert_array_equal(count, [1, 1, 1])
    acc, count = pck(pred, gt, np.array([[1, 0, 1], [1, 0, 1]]), norm, 0.2)
    assert np.isnan(acc[1]) and count[1] == 0


def test_torso_normaliser_lsp():
    joints = np.zeros((14, 2))
    joints[9] = [10, 20]  # l_shoulder
    joints[2] = [40, 60]  # r_hip
    rec = _record(joints)
    assert pck_normalizers([rec], LSP)[0] == pytest.approx(50.0)
    pred = joints[None].copy()
    pred[0, 0] += [6, 8]  # 10 px = 0.2 x 50: correct (<=)
    pred[0, 1] += [0, 10.01]  # just over
    result = score(pred, [rec], LSP)
    assert result.per_joint["r_ankle"] == 100 and result.per_joint["r_knee"] == 0
    assert result.mean == pytest.approx(13 / 14 * 100)
    # an unlabelled torso joint: nothing of the record counts
    vis = np.ones(14)
    vis[2] = 0
    assert pck_normalizers([_record(joints, vis)], LSP)[0] == 0


def test_head_normaliser_is_0_6_of_head_box_diagonal():
    rec = _record(np.zeros((16, 2)), head_box=[10, 20, 40, 60])  # diagonal 50
    assert pck_normalizers([rec], MPII)[0] == pytest.approx(30.0)
    assert pck_normalizers([_record(np.zeros((16, 2)))], MPII)[0] == 0  # no box


def test_bbox_normaliser_is_longest_side():
    rec = _record(np.zeros((17, 2)), person_box=[5, 10, 45, 110])
    assert pck_normalizers([rec], COCO)[0] == pytest.approx(100.0)
    rec = _record(np.zeros((3, 2)), person_box=[0, 0, 80, 20])
    assert pck_normalizers([rec], ARM)[0] == pytest.approx(80.0)


def test_mpii_mean_excludes_pelvis_thorax_and_weights_by_counts():
    rng = np.random.default_rng(0)
    n = 40
    records, preds = [], []
    for _ in range(n):
        gt = rng.uniform(0, 200, size=(16, 2))
        vis = (rng.random(16) > 0.3).astype(float)
        records.append(_record(gt, vis, head_box=[0, 0, 30, 40]))  # head size 0.6 x 50 = 30
        preds.append(gt + rng.normal(scale=12, size=(16, 2)))
    preds = np.stack(preds)
    result = score(preds, records, MPII)
    assert result.alpha == 0.5 and result.excluded == ("pelvis", "thorax")

    # the official evaluation script's arithmetic, written out
    gt = np.stack([r.joints for r in records])
    visible = np.stack([r.visibility for r in records])
    err = np.linalg.norm(preds - gt, axis=-1) / 30.0
    correct = (err <= 0.5) * visible
    jnt_count = visible.sum(axis=0)
    pckh = 100 * correct.sum(axis=0) / jnt_count
    keep = np.ones(16, bool)
    keep[[6, 7]] = False
    jnt_ratio = jnt_count[keep] / jnt_count[keep].sum()
    assert result.mean == pytest.approx(float(np.sum(pckh[keep] * jnt_ratio)))
    np.testing.assert_allclose([result.per_joint[j] for j in MPII.joints], pckh)
    assert [result.counts[j] for j in MPII.joints] == jnt_count.astype(int).tolist()
    # the counts differ by joint, so this is not the plain mean
    assert result.mean != pytest.approx(float(pckh[keep].mean()), abs=1e-9)

    # pelvis and thorax really are out: ruining them does not move the mean
    preds[:, [6, 7]] += 1000
    assert score(preds, records, MPII).mean == pytest.approx(result.mean)


def test_score_checks_shape():
    with pytest.raises(ValueError, match="expected \\(1, 14, 2\\)"):
        score(np.zeros((1, 13, 2)), [_record(np.zeros((14, 2)))], LSP)


def _result(skeleton: Skeleton, values: dict[str, float]) -> PCKResult:
    per_joint = {j: values.get(j, 50.0) for j in skeleton.joints}
    return PCKResult(
        per_joint=per_joint,
        mean=42.0,
        counts={j: 1 for j in skeleton.joints},
        alpha=skeleton.pck_alpha,
        normalizer=skeleton.normalizer,
    )


def test_grouped_tables():
    lsp = dict(
        grouped_table(_result(LSP, {"neck": 80, "head_top": 60, "l_wrist": 10, "r_wrist": 30}), LSP)
    )
    assert list(lsp) == ["Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "Mean"]
    assert lsp["Head"] == 70 and lsp["Wrist"] == 20 and lsp["Mean"] == 42
    mpii = dict(grouped_table(_result(MPII, {"upper_neck": 0, "head_top": 90}), MPII))
    assert list(mpii) == ["Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "Mean"]
    assert mpii["Head"] == 90  # official: head_top alone
    coco = [name for name, _ in grouped_table(_result(COCO, {}), COCO)]
    assert coco == [
        "Nose",
        "Eye",
        "Ear",
        "Shoulder",
        "Elbow",
        "Wrist",
        "Hip",
        "Knee",
        "Ankle",
        "Mean",
    ]
    arm = [name for name, _ in grouped_table(_result(ARM, {}), ARM)]
    assert arm == ["Shoulder", "Elbow", "Wrist", "Mean"]


def test_render_table():
    from rich.console import Console

    console = Console(record=True, width=100)
    console.print(render_table({"fedavg": _result(MPII, {}), "fedgh": _result(MPII, {})}, MPII))
    text = console.export_text()
    assert "PCKh@0.5" in text and "fedgh" in text and "42.00" in text and "Shoulder" in text


# --- heatmap accuracy ---


def _peaks(points: np.ndarray, size: tuple[int, int] = (16, 16)) -> np.ndarray:
    n, k = points.shape[:2]
    hm = np.zeros((n, k, *size), np.float32)
    for i in range(n):
        for j in range(k):
            x, y = points[i, j]
            if x >= 0:
                hm[i, j, y, x] = 1.0
    return hm


def test_heatmap_accuracy_simplebaseline():
    # 16x16 maps: normaliser 1.6 px, so correct when the argmax is less than 0.8 px away
    target = _peaks(
        np.array([[[5, 5], [8, 8], [1, 9], [-1, -1]], [[5, 5], [8, 8], [10, 10], [4, 4]]])
    )
    output = _peaks(
        np.array([[[5, 5], [8, 9], [1, 9], [4, 4]], [[5, 5], [8, 8], [11, 11], [4, 4]]])
    )
    acc, avg, cnt = heatmap_accuracy(output, target)
    # joint 2: sample 0 has target x = 1, which SimpleBaseline takes for "no target";
    # joint 3: sample 0 has no target at all
    np.testing.assert_allclose(acc, [1.0, 0.5, 0.0, 1.0])
    assert cnt == 4 and avg == pytest.approx(0.625)
    # torch tensors work the same; a joint with no target anywhere is -1
    acc, avg, cnt = heatmap_accuracy(
        torch.from_numpy(output), torch.zeros_like(torch.from_numpy(target))
    )
    np.testing.assert_array_equal(acc, [-1, -1, -1, -1])
    assert cnt == 0 and avg == 0
    # a looser threshold, and a mask
    acc, _, _ = heatmap_accuracy(output, target, thr=1.0)
    np.testing.assert_allclose(acc, [1.0, 1.0, 1.0, 1.0])
    mask = np.array([[1, 0, 1, 1], [1, 1, 1, 1]])
    acc, _, _ = heatmap_accuracy(output, target, mask=mask)
    np.testing.assert_allclose(acc, [1.0, 1.0, 0.0, 1.0])


def test_heatmap_hits_of_parts_add_up_to_the_whole():
    rng = np.random.default_rng(0)
    target = _peaks(rng.integers(0, 16, (6, 4, 2)))
    output = _peaks(np.clip(rng.integers(0, 16, (6, 4, 2)) // 2 * 2, 0, 15))
    hits, counted = heatmap_hits(output, target)
    h1, c1 = heatmap_hits(output[:2], target[:2])
    h2, c2 = heatmap_hits(output[2:], target[2:])
    np.testing.assert_array_equal(hits, h1 + h2)
    np.testing.assert_array_equal(counted, c1 + c2)
    acc, _, _ = heatmap_accuracy(output, target)
    np.testing.assert_allclose(acc, np.where(counted > 0, hits / np.maximum(counted, 1), -1))


def test_heatmap_accuracy_matches_mmpose_golden():
    data = json.loads(GOLDEN.read_text())
    assert data["mmpose"] == "1.3.2"
    checked = 0
    for group in data["groups"]:
        output = np.array(group["output"], np.float32)
        target = np.array(group["target"], np.float32)
        mask = np.array(group["mask"], bool)
        for res in group["results"]:
            normalize = None
            if res["normalize"] == "custom":
                normalize = np.array(group["custom_normalize"])
            acc, avg, cnt = heatmap_accuracy(
                output, target, thr=res["thr"], normalize=normalize, mask=mask, convention="mmpose"
            )
            np.testing.assert_allclose(acc, res["acc"], atol=1e-12)
            assert avg == pytest.approx(res["avg_acc"], abs=1e-12)
            assert cnt == res["cnt"]
            checked += 1
    assert checked == 24
    # mmpose's defaults: thr 0.05 and normalise by (H, W)
    group = data["groups"][0]
    res = next(r for r in group["results"] if r["thr"] == 0.05 and r["normalize"] == "default")
    acc, _, _ = heatmap_accuracy(
        np.array(group["output"], np.float32),
        np.array(group["target"], np.float32),
        mask=np.array(group["mask"], bool),
        convention="mmpose",
    )
    np.testing.assert_allclose(acc, res["acc"])
