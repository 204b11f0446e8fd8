"""Torch dataset over PoseRecords: crop, augment, and Gaussian heatmap targets.

Augmentation for item i in epoch e is drawn from np.random.default_rng([seed, e, i]), so a batch
is a pure function of (seed, epoch, index): training is reproducible and resumable, in any number
of worker processes, without saving RNG state.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fedpose.data.image_cache import ImageCache
from fedpose.data.records import DatasetError, PoseRecord, Skeleton
from fedpose.data.transforms import (
    Augmentation,
    affine_transform,
    compose,
    crop_matrix,
    flip_matrix,
    gaussian_heatmaps,
    input_to_heatmap,
    load_image,
    reduction_factor,
    warp_image,
)
from fedpose.seeding import augmentation_rng, loader_seed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEATMAP_STRIDE = 4


class PoseDataset(Dataset):
    """Items: dict(image (3, S, S) normalised float32, target (J, S/4, S/4), target_weight (J, 1),
    index, center (2,), scale ()).

    center and scale are those of the crop taken (scale after augmentation); with train=False
    they are the record's, which is what decoding predictions back to the image needs.

    image_cache: decoded images to reuse across epochs (None: decode on every access).
    normalize=False gives the image as uint8 (3, S, S) instead, a quarter of the bytes to move to
    an accelerator, normalised there by `normalize_images` (bit-identical on the CPU).
    """

    def __init__(
        self,
        records: Sequence[PoseRecord],
        skeleton: Skeleton,
        input_size: int = 64,
        sigma: float = 2.0,
        train: bool = False,
        seed: int = 0,
        augmentation: Augmentation | None = None,
        image_cache: ImageCache | None = None,
        normalize: bool = True,
    ):
        if input_size % HEATMAP_STRIDE:
            raise ValueError(f"input_size must be a multiple of {HEATMAP_STRIDE}, got {input_size}")
        self.records = list(records)
        self.skeleton = skeleton
        self.input_size = input_size
        self.heatmap_size = input_size // HEATMAP_STRIDE
        self.sigma = sigma
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.augmentation = augmentation or Augmentation()
        self.image_cache = image_cache
        self.normalize = normalize
        self._flip_perm = skeleton.flip_permutation()
        self._mean, self._inv_std = _normalization()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """Item `key`, augmented for the current epoch; or key = (epoch, index), as a loader
        over several epochs asks (its worker processes never see set_epoch)."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        index = range(len(self.records))[index]  # wraps negatives, rejects out of range
        rec = self.records[index]
        center = np.asarray(rec.center, dtype=np.float64)
        scale = float(rec.scale)
        joints = np.asarray(rec.joints, dtype=np.float64)
        visibility = np.asarray(rec.visibility, dtype=np.float32)
        rotation, flip = 0.0, False
        if self.train:
            rng = augmentation_rng(self.seed, epoch, index)
            s, rotation, flip = self.augmentation.draw(rng)
            scale *= s

        try:
            if self.image_cache is not None:
                source = self.image_cache.source(rec.image)
                m = self._crop_matrix(center, scale, rotation, flip, source.width)
                image, m_image = self.image_cache.load(rec.image, m)
                crop = warp_image(image, m_image, self.input_size)
            else:
                with Image.open(rec.image) as opened:
                    m = self._crop_matrix(center, scale, rotation, flip, opened.width)
                    image, m_image = load_image(opened, m)
                    crop = warp_image(image, m_image, self.input_size)
        except OSError as e:
            raise DatasetError(rec.image, f"cannot read image: {e}", rec.record_id or index) from e

        if self.normalize:
            # numpy for the per-pixel arithmetic: tiny torch ops cost more in dispatch than work
            pixels = (np.asarray(crop, dtype=np.float32) - self._mean) * self._inv_std
        else:
            pixels = np.asarray(crop, dtype=np.uint8)
        tensor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

        hm_joints = input_to_heatmap(affine_transform(joints, m), HEATMAP_STRIDE)
        if flip:
            # the mirrored left wrist is now the right wrist
            hm_joints = hm_joints[self._flip_perm]
            visibility = visibility[self._flip_perm]
        target, weight = gaussian_heatmaps(hm_joints, visibility, self.heatmap_size, self.sigma)
        return {
            "image": tensor,
            "target": torch.from_numpy(target),
            "target_weight": torch.from_numpy(weight),
            "index": index,
            "center": torch.tensor(center, dtype=torch.float32),
            "scale": torch.tensor(scale, dtype=torch.float32),
        }

    def _crop_matrix(
        self, center: np.ndarray, scale: float, rotation: float, flip: bool, width: int
    ) -> np.ndarray:
        if not flip:
            return crop_matrix(center, scale, rotation, self.input_size)
        # SimpleBaseline mirrors the whole image and the centre, then crops; fold the mirror
        # into the crop matrix instead of copying the image
        mirror = flip_matrix(width)
        mirrored = affine_transform(center, mirror)
        return compose(crop_matrix(mirrored, scale, rotation, self.input_size), mirror)

    def warm_cache(self) -> None:
        """Decode every image this dataset can crop into the image cache, at every JPEG
        reduction its augmentation can ask for, so that forked loader workers share them."""
        if self.image_cache is None:
            return
        scales = [1.0]
        if self.train:
            sf = self.augmentation.scale_factor
            scales = [1.0 - sf, 1.0 + sf]
        for index, rec in enumerate(self.records):
            try:
                # the reduction grows with the scale, so the extremes bound it
                factors = [
                    reduction_factor(crop_matrix(rec.center, rec.scale * s, 0.0, self.input_size))
                    for s in scales
                ]
                for factor in (1, 2, 4, 8):
                    if min(factors) <= factor <= max(factors):
                        self.image_cache.decoded(rec.image, factor)
            except OSError as e:
                raise DatasetError(
                    rec.image, f"cannot read image: {e}", rec.record_id or index
                ) from e


def _normalization() -> tuple[np.ndarray, np.ndarray]:
    """(mean, 1 / std) per channel in 0..255 pixel units, float32."""
    mean = np.array(IMAGENET_MEAN, dtype=np.float32) * 255.0
    inv_std = 1.0 / (np.array(IMAGENET_STD, dtype=np.float32) * 255.0)
    return mean, inv_std


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> normalised float32 on the images' device; the same numbers as the
    dataset's own normalisation (one subtraction, one multiplication, both in float32)."""
    mean, inv_std = (
        torch.from_numpy(a).to(images.device).view(1, 3, 1, 1) for a in _normalization()
    )
    return (images.float() - mean) * inv_std


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader whose shuffle order is a function of (seed, epoch) alone.

    The augmentation epoch is the dataset's own (PoseDataset.set_epoch), set by the caller: a
    federated client may shuffle by local epoch but augment by global round.
    pin_memory: page-locked batches, for asynchronous copies to a CUDA device.
    """
    if workers > 0 and isinstance(dataset, PoseDataset):
        dataset.warm_cache()  # decoded once here, shared by the forked workers
    generator = torch.Generator()
    generator.manual_seed(loader_seed(seed, epoch))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def shuffled_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order in which make_loader's shuffling DataLoader visits n items for (seed, epoch).

    The DataLoader draws its workers' base seed from the generator before the sampler's
    permutation, so the same draw is made here first (a test holds the two equal).
    """
    generator = torch.Generator()
    generator.manual_seed(loader_seed(seed, epoch))
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    return torch.randperm(n, generator=generator).tolist()


class EpochBatchSampler:
    """Batches of (epoch, index) keys for several epochs in a row, each epoch in make_loader's
    order, so one DataLoader (one set of worker processes) serves a whole training run."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool,
        seed: int,
        epochs: range,
        drop_last: bool = False,
    ):
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.seed, self.epochs, self.drop_last = seed, epochs, drop_last

    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __len__(self) -> int:
        return self.batches_per_epoch() * len(self.epochs)

    def __iter__(self):
        for epoch in self.epochs:
            order = shuffled_order(self.n, self.seed, epoch) if self.shuffle else range(self.n)
            for start in range(0, self.n, self.batch_size):
                chunk = order[start : start + self.batch_size]
                if len(chunk) < self.batch_size and self.drop_last:
                    break
                yield [(epoch, i) for i in chunk]


def make_epochs_loader(
    dataset: PoseDataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    epochs: range,
    workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """One DataLoader over `epochs`: the batches make_loader gives epoch by epoch (shuffle order,
    augmentation), with worker processes started once instead of once per epoch."""
    if workers > 0:
        dataset.warm_cache()
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle, seed, epochs, drop_last)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
    )
