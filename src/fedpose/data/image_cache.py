"""Decoded images kept in memory, so that every epoch after the first crops without decoding.

Decoding a JPEG is most of the cost of a training sample at 128 px, and the same file is decoded
again every epoch (every round, for a federated client). The cache holds the RGB image exactly as
`transforms.load_image` would produce it, including libjpeg's reduced-size (1/2, 1/4, 1/8) decode,
so a cached sample is bit-identical to an uncached one. Entries are keyed by file path,
modification time and size: a file rewritten in place is decoded again.

The cache belongs to one process. DataLoader workers are forked from the process that owns the
dataset, so filling the cache before the loader starts (`PoseDataset.warm_cache`) shares it with
every worker at no cost; images a worker decodes itself stay in that worker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fedpose.data.transforms import compose, decode_reduced, invert_affine, reduction_factor


@dataclass
class SourceImage:
    """One image file: its header, and its decodes by reduction factor."""

    path: str
    width: int
    height: int
    is_jpeg: bool
    decoded: dict[int, tuple[Image.Image, np.ndarray | None]] = field(default_factory=dict)


def _decode(path: str, factor: int) -> tuple[Image.Image, np.ndarray | None]:
    with Image.open(path) as image:
        rgb, to_reduced = decode_reduced(image, factor)
        rgb = rgb.copy() if rgb is image else rgb  # outlive the file handle
        rgb.load()
    return rgb, to_reduced


class ImageCache:
    """Decoded RGB images up to `max_bytes` of pixels; past the budget images are decoded on
    every use (nothing is evicted, so a full cache costs no churn)."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: dict[tuple[str, int, int], SourceImage] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def source(self, path: str | Path) -> SourceImage:
        """The header of `path` (read once), with its cached decodes."""
        path = str(path)
        st = os.stat(path)
        key = (path, st.st_mtime_ns, st.st_size)
        entry = self._entries.get(key)
        if entry is None:
            with Image.open(path) as image:
                entry = SourceImage(path, image.width, image.height, image.format == "JPEG")
            self._entries[key] = entry
        return entry

    def decoded(self, path: str | Path, factor: int) -> tuple[Image.Image, np.ndarray | None]:
        """`path` decoded at 1/`factor` size (JPEG only; other formats at full size), with the
        map from original to reduced pixels (None when not reduced)."""
        entry = self.source(path)
        factor = factor if entry.is_jpeg else 1
        decoded = entry.decoded.get(factor)
        if decoded is not None:
            self.hits += 1
            return decoded
        self.misses += 1
        decoded = _decode(entry.path, factor)
        size = decoded[0].width * decoded[0].height * 3
        if self.bytes + size <= self.max_bytes:
            entry.decoded[factor] = decoded
            self.bytes += size
        return decoded

    def load(self, path: str | Path, m: np.ndarray) -> tuple[Image.Image, np.ndarray]:
        """Same result as `transforms.load_image(path, m)`, from the cache when possible."""
        image, to_reduced = self.decoded(path, reduction_factor(m))
        if to_reduced is not None:
            m = compose(m, invert_affine(to_reduced))
        return image, m
