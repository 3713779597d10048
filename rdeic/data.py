"""Training data: random crops from WebDataset shards on any fsspec URL, resumable.

The order is a pure function of (seed, epoch), and each crop's randomness of (seed, epoch,
position), so a run restarted at "sample n" sees exactly the samples an uninterrupted run
would have seen. With several workers every rank reads its own subset of shards
(``shards[rank::world]``): an iterable stream cannot use a DistributedSampler.

Shards are listed and read as the jobs read them (:mod:`rdeic.shards`): brace patterns and globs,
WebDataset samples, and the same rule for which of a sample's files is its image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import fsspec
import numpy as np
import torch
from PIL import Image

from .images import ImageReadError, open_image, to_rgb
from .shards import Sample, ShardReader, pick_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CropSpec:
    size: int = 256
    scale_min: float = 1.0  # random down-scaling before the crop (1.0: none)
    scale_max: float = 1.0
    flip: bool = True
    permute_channels: bool = False  # random RGB order: colour variety for tiny training sets
    colour_gain: float = 0.0  # per-channel gains in [1 - g, 1 + g]: casts and tints a model must keep


def random_crop(image: np.ndarray, spec: CropSpec, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    scale = rng.uniform(spec.scale_min, spec.scale_max)
    scale = max(scale, spec.size / min(h, w))  # never smaller than the crop
    if abs(scale - 1.0) > 1e-6:
        nh, nw = max(spec.size, round(h * scale)), max(spec.size, round(w * scale))
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
        h, w = nh, nw
    top = int(rng.integers(0, h - spec.size + 1))
    left = int(rng.integers(0, w - spec.size + 1))
    crop = image[top:top + spec.size, left:left + spec.size]
    if spec.flip and rng.random() < 0.5:
        crop = crop[:, ::-1]
    if spec.permute_channels:
        crop = crop[:, :, rng.permutation(3)]
    if spec.colour_gain > 0:
        gains = rng.uniform(1.0 - spec.colour_gain, 1.0 + spec.colour_gain, size=3).astype(np.float32)
        crop = np.clip(crop.astype(np.float32) * gains + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(crop)


class ShardImages:
    """Endless stream of crops (uint8 HWC) from this rank's shards; ``position`` counts samples."""

    def __init__(self, urls: list[str], crop: CropSpec, seed: int = 0, rank: int = 0, world: int = 1,
                 storage_options: dict | None = None) -> None:
        if not urls:
            raise ValueError("no training shards given")
        if len(urls) < world:
            raise ValueError(f"{len(urls)} shards cannot be split over {world} workers: give at least one shard per worker")
        self.urls = sorted(urls)[rank::world]
        self.crop, self.seed, self.rank = crop, seed, rank
        self.storage_options = storage_options or {}
        self.skipped = 0  # unreadable samples seen (logged, never silently)
        self.epoch = self.index = 0

    def _samples(self, url: str) -> Iterator[Sample]:
        with fsspec.open(url, "rb", **self.storage_options) as f:
            reader = ShardReader(f)
            yield from reader
        if reader.error:
            log.warning("training shard %s is damaged, its samples before the damage were used: %s", url, reader.error)

    def _image(self, sample: Sample, ext: str | None) -> np.ndarray | None:
        """The sample's image as RGB, or None (logged, and counted in ``skipped``)."""
        try:
            if sample.error is not None:
                raise ValueError(sample.error)
            if ext is None:
                raise ValueError(f"no image file among its files {sorted(sample.files)}")
            return to_rgb(open_image(sample.files[ext], max_pixels=64_000_000))
        except (ImageReadError, ValueError, OSError) as exc:
            self.skipped += 1
            log.warning("skipping unreadable training sample %s: %s", sample.key, exc)
            return None

    def iterate(self, epoch: int = 0, index: int = 0) -> Iterator[np.ndarray]:
        """Crops from sample ``index`` of ``epoch`` on, forever. ``self.epoch``/``self.index``
        always name the next sample, so they are the data position to checkpoint."""
        self.epoch, self.index = epoch, index
        while True:
            order = np.random.default_rng([self.seed, self.rank, self.epoch]).permutation(len(self.urls))
            position, seen_any = 0, False
            for shard_index in order:
                for sample in self._samples(self.urls[shard_index]):
                    ext = pick_image(sample.files)
                    seen_any = seen_any or ext is not None
                    if position < self.index:  # resuming: skip without decoding
                        position += 1
                        continue
                    rng = np.random.default_rng([self.seed, self.rank, self.epoch, position])
                    position += 1
                    self.index = position
                    image = self._image(sample, ext)
                    if image is not None:
                        yield random_crop(image, self.crop, rng)
            if not seen_any:
                raise ValueError(f"no images in shards {self.urls}")
            self.epoch, self.index = self.epoch + 1, 0


def batches(stream: Iterator[np.ndarray], batch_size: int) -> Iterator[torch.Tensor]:
    """(B, 3, H, W) float tensors in [-1, 1]."""
    while True:
        crops = [next(stream) for _ in range(batch_size)]
        yield torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
