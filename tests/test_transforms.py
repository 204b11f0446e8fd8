"""Crop geometry, heatmap targets and the dataset: every round trip must be exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fedpose.data.dataset import PoseDataset, make_loader
from fedpose.data.records import PoseRecord, Skeleton
from fedpose.data.transforms import (
    Augmentation,
    affine_transform,
    compose,
    crop_matrix,
    crop_to_image,
    flip_joints,
    flip_matrix,
    gaussian_heatmaps,
    heatmap_to_input,
    input_to_heatmap,
    invert_affine,
    load_image,
    warp_image,
)
from fedpose.model.decode import get_max_preds, heatmaps_to_image_coords, refine_taylor


def _centroid(a: np.ndarray) -> tuple[float, float]:
    a = a.astype(np.float64)
    ys, xs = np.indices(a.shape)
    return float((a * xs).sum() / a.sum()), float((a * ys).sum() / a.sum())


def test_crop_matrix_maps_centre_to_middle_and_inverts():
    m = crop_matrix((120.0, 80.0), 1.5, 25.0, 64)
    np.testing.assert_allclose(affine_transform([120.0, 80.0], m), [31.5, 31.5])
    # the source side is 200 * scale px: a point at half the side lands on the crop's edge
    m0 = crop_matrix((120.0, 80.0), 1.5, 0.0, 64)
    np.testing.assert_allclose(affine_transform([120.0 + 150.0, 80.0], m0), [63.5, 31.5])
    pts = np.random.default_rng(0).uniform(-50, 300, size=(20, 2))
    back = affine_transform(affine_transform(pts, m), invert_affine(m))
    np.testing.assert_allclose(back, pts, atol=1e-9)
    np.testing.assert_allclose(
        crop_to_image(affine_transform(pts, m), (120, 80), 1.5, 64, 25.0), pts, atol=1e-9
    )


def test_rotation_is_counter_clockwise_on_screen():
    m = crop_matrix((0.0, 0.0), 0.32, 90.0, 64)  # 1 crop px per source px
    right = affine_transform([10.0, 0.0], m) - 31.5
    np.testing.assert_allclose(right, [0.0, -10.0], atol=1e-9)  # right turns into up


def test_warp_image_pixel_convention_is_exact():
    a = np.zeros((40, 50, 3), np.uint8)
    a[10, 17] = 255
    img = Image.fromarray(a)
    # 1:1 crop whose centre is a pixel centre away from (17, 10): a pure integer shift
    m = crop_matrix((17.5, 10.5), 32 / 200, 0.0, 32)
    out = np.asarray(warp_image(img, m, 32))[..., 0]
    assert out[15, 15] == 255 and out.sum() == 255
    # 2x upscale around the pixel: the blob's centroid is where the matrix sends the pixel
    m = crop_matrix((17.0, 10.0), 16 / 200, 30.0, 32)
    out = np.asarray(warp_image(img, m, 32))[..., 0]
    np.testing.assert_allclose(_centroid(out), affine_transform([17.0, 10.0], m), atol=1e-6)


def test_jpeg_reduced_decoding_keeps_geometry(tmp_path):
    img = Image.new("RGB", (1280, 720))
    ImageDraw.Draw(img).ellipse((580, 280, 620, 320), fill=(255, 255, 255))
    path = tmp_path / "big.jpg"
    img.save(path, quality=95)
    for scale in (1.0, 2.0, 4.0):
        m = crop_matrix((600.0, 300.0), scale, 17.0, 64)
        image, m_reduced = load_image(path, m)
        assert image.width < 1280  # decoded at a reduced size
        crop = np.asarray(warp_image(image, m_reduced, 64))[..., 0]
        np.testing.assert_allclose(_centroid(crop), [31.5, 31.5], atol=0.1)


def test_heatmap_stride_convention():
    # heatmap pixel j covers input pixels 4j .. 4j+3
    np.testing.assert_allclose(input_to_heatmap([1.5, 5.5], 4), [0.0, 1.0])
    np.testing.assert_allclose(heatmap_to_input(input_to_heatmap([3.3, 60.1], 4), 4), [3.3, 60.1])
    # the heatmap is the same crop at its own resolution
    m_in = crop_matrix((100.0, 50.0), 0.7, 10.0, 64)
    m_hm = crop_matrix((100.0, 50.0), 0.7, 10.0, 16)
    p = np.array([[90.0, 61.0], [130.0, 20.0]])
    np.testing.assert_allclose(
        input_to_heatmap(affine_transform(p, m_in), 4), affine_transform(p, m_hm), atol=1e-9
    )


def test_gaussian_targets_and_weights():
    joints = np.array([[5.3, 7.8], [3.0, 3.0], [-2.0, 4.0], [8.0, 15.4]])
    vis = np.array([1, 0, 1, 1])
    target, weight = gaussian_heatmaps(joints, vis, 16, sigma=2.0)
    assert target.shape == (4, 16, 16) and target.dtype == np.float32
    assert weight.shape == (4, 1)
    np.testing.assert_array_equal(weight[:, 0], [1, 0, 0, 1])  # unlabelled, outside: 0
    assert target[1].max() == 0 and target[2].max() == 0
    assert target[0, 8, 5] == pytest.approx(np.exp(-(0.3**2 + 0.2**2) / 8), rel=1e-6)
    # unlabelled joints stored as nan give an empty map, not a nan one
    target, weight = gaussian_heatmaps(np.array([[np.nan, np.nan]]), np.array([1]), 16)
    assert weight[0, 0] == 0 and not np.isnan(target).any() and target.max() == 0


@pytest.mark.parametrize("seed", range(5))
def test_crop_heatmap_decode_round_trip(seed):
    rng = np.random.default_rng(seed)
    n, j, size = 8, 6, 64
    centers = rng.uniform(50, 400, size=(n, 2))
    scales = rng.uniform(0.3, 3.0, size=n)
    heatmaps, joints = [], []
    for c, s in zip(centers, scales, strict=True):
        side = 200 * s
        # joints well inside the crop, so no Gaussian is cut off at the border
        pts = c + rng.uniform(-0.35, 0.35, size=(j, 2)) * side
        hm_pts = input_to_heatmap(affine_transform(pts, crop_matrix(c, s, 0.0, size)), 4)
        heatmaps.append(gaussian_heatmaps(hm_pts, np.ones(j), size // 4, 2.0)[0])
        joints.append(pts)
    heatmaps, joints = np.stack(heatmaps), np.stack(joints)
    input_px = (200 * scales / size)[:, None]  # original px per input px

    exact = heatmaps_to_image_coords(heatmaps, centers, scales, size, refine="taylor")
    np.testing.assert_allclose(exact, joints, atol=1e-3)

    quarter = heatmaps_to_image_coords(heatmaps, centers, scales, size, refine="quarter")
    err_input_px = np.linalg.norm(quarter - joints, axis=-1) / input_px
    # within a quarter heatmap pixel (one input pixel) on each axis
    assert (np.abs(quarter - joints) / input_px[..., None]).max() <= 1.0 + 1e-6

    plain = heatmaps_to_image_coords(heatmaps, centers, scales, size, refine="none")
    err_plain = np.linalg.norm(plain - joints, axis=-1) / input_px
    assert err_input_px.mean() < err_plain.mean()


def test_rotated_round_trip_through_heatmaps():
    rng = np.random.default_rng(3)
    c, s, r = np.array([210.0, 140.0]), 1.3, -23.0
    pts = c + rng.uniform(-70, 70, size=(5, 2))
    hm_pts = affine_transform(pts, crop_matrix(c, s, r, 16))
    target, _ = gaussian_heatmaps(hm_pts, np.ones(5), 16, 2.0)
    coords, _ = get_max_preds(target[None])
    refined = refine_taylor(target[None], coords)[0]
    np.testing.assert_allclose(crop_to_image(refined, c, s, 16, r), pts, atol=1e-3)


def test_flip_joints_mirrors_about_image_centre():
    joints = np.array([[0.0, 1.0], [9.0, 2.0], [4.5, 3.0]])
    out, vis = flip_joints(joints, np.array([1.0, 0.0, 1.0]), 10, [(0, 1)])
    np.testing.assert_allclose(out, [[0.0, 2.0], [9.0, 1.0], [4.5, 3.0]])
    np.testing.assert_array_equal(vis, [0.0, 1.0, 1.0])
    np.testing.assert_allclose(compose(flip_matrix(10), flip_matrix(10)), [[1, 0, 0], [0, 1, 0]])


# --- the dataset: colour-coded joints must sit under their own target peaks ---

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
TOY = Skeleton(name="toy", joints=("l_a", "r_a", "l_b", "r_b"), flip_pairs=((0, 1), (2, 3)))


def _toy_record(tmp_path, name="toy.png", size=(160, 120)) -> PoseRecord:
    joints = np.array([[50.0, 40.0], [100.0, 45.0], [60.0, 80.0], [110.0, 70.0]], np.float32)
    img = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(img)
    for (x, y), col in zip(joints, COLOURS, strict=True):
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=col)
    path = tmp_path / name
    img.save(path)
    return PoseRecord(
        image=path,
        joints=joints,
        visibility=np.ones(4, np.float32),
        center=np.array([80.0, 60.0], np.float32),
        scale=0.9,
    )


def _colour_at_peaks(item: dict) -> list[int]:
    """Index of the colour found under each channel's target peak."""
    image = item["image"].numpy()
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    rgb = (image * std + mean) * 255
    target = item["target"].numpy()[None]
    hm = refine_taylor(target, get_max_preds(target)[0])[0]
    found = []
    for x, y in heatmap_to_input(hm, 4):
        pix = rgb[:, int(round(y)), int(round(x))]
        found.append(int(np.argmin([np.abs(pix - c).sum() for c in COLOURS])))
    return found


def test_dataset_targets_follow_augmentation_and_flip(tmp_path):
    record = _toy_record(tmp_path)
    ds = PoseDataset([record] * 12, TOY, input_size=64, train=True, seed=7)
    flips = 0
    for epoch in range(2):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            _, _, flipped = Augmentation().draw(np.random.default_rng([7, epoch, i]))
            flips += flipped
            expected = [1, 0, 3, 2] if flipped else [0, 1, 2, 3]
            assert _colour_at_peaks(item) == expected, (epoch, i, flipped)
            assert item["target_weight"].min() == 1
    assert 0 < flips < 24


def test_dataset_eval_item(tmp_path):
    record = _toy_record(tmp_path)
    record.visibility[2] = 0
    item = PoseDataset([record], TOY, input_size=64)[0]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["target"].shape == (4, 16, 16)
    assert item["target_weight"][:, 0].tolist() == [1, 1, 0, 1]
    assert item["index"] == 0
    np.testing.assert_allclose(item["center"].numpy(), [80, 60])
    assert float(item["scale"]) == pytest.approx(0.9)
    # decoding the targets with the item's centre and scale gives back the joints
    coords = heatmaps_to_image_coords(
        item["target"][None], item["center"][None], item["scale"][None], 64, refine="taylor"
    )[0]
    np.testing.assert_allclose(coords[[0, 1, 3]], record.joints[[0, 1, 3]], atol=1e-3)
    # grey at the centre normalises to (128/255 - mean) / std; beyond the image it is black
    assert float(item["image"][0, 0, 0]) == pytest.approx(-0.485 / 0.229, abs=1e-4)
    assert float(item["image"][0, 32, 32]) == pytest.approx((128 / 255 - 0.485) / 0.229, abs=0.02)


def test_dataset_is_deterministic_and_loader_seeded(tmp_path):
    records = [_toy_record(tmp_path)] * 10
    a = PoseDataset(records, TOY, train=True, seed=3)
    b = PoseDataset(records, TOY, train=True, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    torch.testing.assert_close(a[4]["image"], b[4]["image"])
    b.set_epoch(3)
    assert not torch.equal(a[4]["image"], b[4]["image"])

    def order(seed, epoch):
        return torch.cat([x["index"] for x in make_loader(a, 4, True, seed, epoch)]).tolist()

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2)
    assert sorted(order(0, 1)) == list(range(10))
    assert a.epoch == 2  # the augmentation epoch is the caller's business


def test_dataset_reports_unreadable_image(tmp_path):
    from fedpose.data.records import DatasetError

    record = _toy_record(tmp_path)
    record.image = tmp_path / "missing.jpg"
    with pytest.raises(DatasetError, match="missing.jpg"):
        PoseDataset([record], TOY)[0]
