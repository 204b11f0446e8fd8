"""The fast data pipeline must give exactly the samples the plain one gives."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fedpose.data.dataset import PoseDataset, make_epochs_loader, make_loader, normalize_images
from fedpose.data.image_cache import ImageCache
from fedpose.data.records import PoseRecord, Skeleton

pytestmark = pytest.mark.usefixtures("one_thread")

SKELETON = Skeleton("three", ("a", "b", "c"), ((0, 2),))


def _records(tmp_path, n: int = 6) -> list[PoseRecord]:
    """JPEGs of several sizes (so crops take every libjpeg reduction) and a PNG."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        w, h = 160 + 140 * i, 120 + 90 * i
        pixels = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize((w, h), Image.Resampling.BILINEAR)
        path = tmp_path / (f"im{i}.png" if i == n - 1 else f"im{i}.jpg")
        image.save(path)
        joints = rng.uniform([0.3 * w, 0.3 * h], [0.7 * w, 0.7 * h], (3, 2)).astype(np.float32)
        records.append(
            PoseRecord(
                image=path,
                joints=joints,
                visibility=np.ones(3, np.float32),
                center=np.array([w / 2, h / 2], np.float32),
                scale=0.9 * min(w, h) / 200.0,
            )
        )
    return records


@pytest.mark.parametrize("input_size", [32, 64])
def test_cached_and_uint8_items_equal_plain_items(tmp_path, input_size):
    records = _records(tmp_path)
    plain = PoseDataset(records, SKELETON, input_size, train=True, seed=5)
    cache = ImageCache()
    cached = PoseDataset(records, SKELETON, input_size, train=True, seed=5, image_cache=cache)
    raw = PoseDataset(
        records, SKELETON, input_size, train=True, seed=5, image_cache=cache, normalize=False
    )
    cached.warm_cache()
    decodes = cache.misses
    assert decodes >= len(records)
    for epoch in range(3):
        for ds in (plain, cached, raw):
            ds.set_epoch(epoch)
        for i in range(len(records)):
            a, b, c = plain[i], cached[i], raw[i]
            assert torch.equal(a["image"], b["image"])
            assert torch.equal(a["target"], b["target"])
            assert c["image"].dtype == torch.uint8
            assert torch.equal(a["image"], normalize_images(c["image"][None])[0])
    assert cache.misses == decodes  # the warm cache served every epoch


def test_cache_redecodes_a_rewritten_file(tmp_path):
    records = _records(tmp_path, n=2)
    cache = ImageCache()
    ds = PoseDataset(records, SKELETON, 32, image_cache=cache)
    before = ds[0]["image"]
    Image.new("RGB", (160, 120), (200, 10, 10)).save(records[0].image)
    os.utime(records[0].image, ns=(1, 1))  # a different mtime even on a coarse clock
    after = ds[0]["image"]
    assert not torch.equal(before, after)
    assert torch.equal(after, PoseDataset(records, SKELETON, 32)[0]["image"])


def test_cache_budget_is_respected(tmp_path):
    records = _records(tmp_path, n=4)
    cache = ImageCache(max_bytes=160 * 120 * 3)  # room for the smallest image only
    ds = PoseDataset(records, SKELETON, 32, image_cache=cache)
    for i in range(len(records)):
        ds[i]
    assert cache.bytes <= cache.max_bytes
    plain = PoseDataset(records, SKELETON, 32)
    for i in range(len(records)):
        assert torch.equal(ds[i]["image"], plain[i]["image"])


def test_loader_with_workers_gives_the_same_batches(tmp_path):
    records = _records(tmp_path, n=4)
    cache = ImageCache()
    ds = PoseDataset(records, SKELETON, 32, train=True, seed=1, image_cache=cache)
    plain = PoseDataset(records, SKELETON, 32, train=True, seed=1)
    forked = list(make_loader(ds, 2, shuffle=True, seed=3, epoch=0, workers=2))
    inline = list(make_loader(plain, 2, shuffle=True, seed=3, epoch=0, workers=0))
    assert len(cache) == len(records)  # warmed in this process before the workers forked
    for a, b in zip(forked, inline, strict=True):
        assert torch.equal(a["index"], b["index"])
        assert torch.equal(a["image"], b["image"])


@pytest.mark.parametrize("workers", [0, 2])
def test_one_loader_over_epochs_gives_each_epochs_batches(tmp_path, workers):
    records = _records(tmp_path, n=5)
    ds = PoseDataset(records, SKELETON, 32, train=True, seed=2, image_cache=ImageCache())
    plain = PoseDataset(records, SKELETON, 32, train=True, seed=2)
    joined = list(
        make_epochs_loader(
            ds, 2, shuffle=True, seed=4, epochs=range(1, 4), workers=workers, drop_last=True
        )
    )
    expected = []
    for epoch in range(1, 4):
        plain.set_epoch(epoch)
        expected += list(make_loader(plain, 2, shuffle=True, seed=4, epoch=epoch, drop_last=True))
    assert len(joined) == len(expected) == 3 * 2
    for a, b in zip(joined, expected, strict=True):
        assert torch.equal(a["index"], b["index"])
        assert torch.equal(a["image"], b["image"])
        assert torch.equal(a["target"], b["target"])
