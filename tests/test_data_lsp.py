"""LSP loader on real LSP files: values are checked against joints.mat read independently.

Each general test runs on the 40-image copy in tests/data/lsp and again on the full dataset when
FEDPOSE_DATASETS provides it; the standard 1000/1000 split and whole-dataset counts need the full
dataset.
"""

from __future__ import annotations

import filecmp

import numpy as np
import pytest
import scipy.io
from PIL import Image

from fedpose.config import DataConfig
from fedpose.data import load_split
from fedpose.data.inspect import inspect_dataset
from fedpose.data.lsp import load_lsp
from fedpose.data.records import LSP, DatasetError

FIXTURE_IMAGES = 40


@pytest.fixture(scope="module")
def full_root(datasets):
    return datasets / "lsp"


# the whole-dataset case is slow (seconds of decoding and parsing 2000 records): make test-slow
@pytest.fixture(scope="module", params=["tests-data", pytest.param("full", marks=pytest.mark.slow)])
def root(request, lsp_dir):
    return lsp_dir if request.param == "tests-data" else request.getfixturevalue("full_root")


@pytest.fixture(scope="module")
def raw(root) -> np.ndarray:
    return scipy.io.loadmat(root / "joints.mat")["joints"]


@pytest.fixture(scope="module")
def every(root):
    return load_lsp(root, "all")


def test_im0001_joints_are_the_mat_values_shifted_to_zero_based(every, raw):
    r = every[0]
    assert r.record_id == "im0001.jpg"
    np.testing.assert_allclose(r.joints, raw[:2, :, 0].T - 1, atol=1e-4)
    # right ankle of im0001, read by hand from joints.mat: (29.7465, 143.3454) 1-based
    np.testing.assert_allclose(r.joints[0], [28.7465, 142.3454], atol=1e-3)
    assert r.joints.shape == (14, 2) and r.joints.dtype == np.float32
    assert r.num_joints == LSP.num_joints


def test_every_record_matches_the_mat_file(root, every, raw):
    assert len(every) == raw.shape[2]
    assert [r.record_id for r in every] == [f"im{i:04d}.jpg" for i in range(1, len(every) + 1)]
    assert every[-1].image == root / "images" / every[-1].record_id
    joints = np.stack([r.joints for r in every], axis=2)  # 14 x 2 x N like the file's rows
    np.testing.assert_allclose(joints, raw[:2].transpose(1, 0, 2) - 1, atol=1e-4)


def test_all_joints_labelled_and_occlusion_kept_as_attribute(every, raw):
    assert all((r.visibility == 1).all() for r in every)
    occluded = np.stack([r.attributes["occluded"] for r in every], axis=1)
    assert occluded.dtype == bool
    np.testing.assert_array_equal(occluded, raw[2] == 1)
    assert 0 < occluded.sum() < occluded.size


def test_centre_scale_and_box_come_from_the_joints_box(every):
    for r in (every[0], every[len(every) * 5 // 8]):
        lo, hi = r.joints.min(axis=0), r.joints.max(axis=0)
        np.testing.assert_allclose(r.person_box, [*lo, *hi], atol=1e-4)
        np.testing.assert_allclose(r.center, (lo + hi) / 2, atol=1e-4)
        assert r.scale == pytest.approx(1.25 * (hi - lo).max() / 200, rel=1e-5)
    # im0001: joints span x 14.28-52.86, y 14.57-142.35; the height rules
    assert every[0].scale == pytest.approx(1.25 * (142.34544 - 14.565505) / 200, rel=1e-5)


def test_observer_centric_labels_are_read_from_joints_oc(root, every, raw):
    oc = load_lsp(root, "all", labels="oc")
    raw_oc = scipy.io.loadmat(root / "joints_OC.mat")["joints"]
    joints = np.stack([r.joints for r in oc], axis=2)
    np.testing.assert_allclose(joints, raw_oc[:2].transpose(1, 0, 2) - 1, atol=1e-4)
    differing = sum(not np.array_equal(a.joints, b.joints) for a, b in zip(every, oc, strict=True))
    assert (
        0
        < differing
        == sum(not np.array_equal(raw[:2, :, i], raw_oc[:2, :, i]) for i in range(raw.shape[2]))
    )


def test_bad_arguments(root):
    with pytest.raises(ValueError, match="split"):
        load_lsp(root, "val")
    with pytest.raises(ValueError, match="labels"):
        load_lsp(root, labels="lsp-extended")


def test_inspect_summary(root, raw, lsp_dir):
    n = raw.shape[2]
    # decoding every image is checked on the 40-image copy; on the full set the headers give
    # the same counts (test_fuzz_inputs: decode failures are found unless --quick)
    s = inspect_dataset("lsp", root, decode=root == lsp_dir)
    assert (s["records"], s["images"], s["num_joints"]) == (n, n, 14)
    assert s["visible_per_joint"] == [n] * 14
    assert s["occluded_per_joint"] == (raw[2] == 1).sum(axis=1).tolist()
    widths = [Image.open(root / "images" / f"im{i:04d}.jpg").width for i in range(1, n + 1)]
    assert (s["image_width"]["min"], s["image_width"]["max"]) == (min(widths), max(widths))
    assert s["joint_names"] == list(LSP.joints)


# ------------------------------------------------------- the 40-image copy and the full dataset


def test_the_copy_has_no_standard_split(lsp_dir):
    assert len(load_lsp(lsp_dir, "all")) == FIXTURE_IMAGES
    with pytest.raises(DatasetError, match="the standard test split needs 2000 images"):
        load_lsp(lsp_dir, "test")


def test_the_copy_is_the_head_of_the_full_dataset(lsp_dir, full_root):
    for name in ("joints.mat", "joints_OC.mat"):
        full = scipy.io.loadmat(full_root / name)["joints"]
        np.testing.assert_array_equal(
            scipy.io.loadmat(lsp_dir / name)["joints"], full[:, :, :FIXTURE_IMAGES]
        )
    names = [f"im{i:04d}.jpg" for i in range(1, FIXTURE_IMAGES + 1)]
    match, mismatch, errors = filecmp.cmpfiles(
        lsp_dir / "images", full_root / "images", names, shallow=False
    )
    assert (mismatch, errors) == ([], []) and len(match) == FIXTURE_IMAGES


def test_standard_split(full_root):
    train, test = load_lsp(full_root, "train"), load_lsp(full_root, "test")
    assert len(train) == 1000 and len(test) == 1000
    assert [r.record_id for r in train] == [f"im{i:04d}.jpg" for i in range(1, 1001)]
    assert [r.record_id for r in test] == [f"im{i:04d}.jpg" for i in range(1001, 2001)]
    assert test[0].image == full_root / "images" / "im1001.jpg"
    assert all(r.image.is_file() for r in train[:5] + test[-5:])


def test_full_dataset_counts(full_root):
    pc = scipy.io.loadmat(full_root / "joints.mat")["joints"]
    oc = scipy.io.loadmat(full_root / "joints_OC.mat")["joints"]
    assert pc.shape == oc.shape == (3, 14, 2000)
    # the relabelling, mostly left/right swaps, touches 756 images
    assert sum(not np.array_equal(pc[:2, :, i], oc[:2, :, i]) for i in range(2000)) == 756


def test_load_split_and_limits(full_root):
    cfg = DataConfig(dataset="lsp", root=str(full_root), max_test=10)
    test, skeleton = load_split(cfg, "test")
    assert skeleton is LSP
    assert [r.record_id for r in test] == [f"im{i:04d}.jpg" for i in range(1001, 1011)]
    train, _ = load_split(cfg, "train")
    assert len(train) == 1000
