"""Classical codecs at a matched rate (Pillow): what a user would get from JPEG, WebP or AVIF instead.

For an RDEIC row at ``target_bpp``, :func:`matched` finds the quality setting whose bits per pixel
is the smallest one at or above the target (closest from above), or the format's lowest rate when
even that is above the target (``at_floor``).

Encoder settings are fixed so that a quality always gives the same bytes:

- JPEG: quality 1..95, 4:2:0 chroma subsampling, ``optimize=True`` (Huffman tables), baseline (not progressive).
- WebP: quality 0..100, lossy, ``method=6`` (slowest, best compression).
- AVIF: quality 0..100, libaom via Pillow's plugin, ``speed=6``, 4:2:0, full range, one thread
  (libaom's output depends on the thread count: 11 704 vs 11 684 bytes for 1 and 2 threads).

:class:`Sweep` gives a format's rate–distortion curve instead: fixed qualities over a set of images,
chosen to cover a bpp interval (``rdeic eval``).

No metadata (EXIF, ICC) is written; bpp = 8 · bytes / (width · height) counts every byte of the file.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, features

from .errors import RdeicError

FORMATS = ("jpeg", "webp", "avif")

QUALITY_RANGE = {"jpeg": (1, 95), "webp": (0, 100), "avif": (0, 100)}

_SAVE_OPTIONS = {
    "jpeg": {"format": "JPEG", "subsampling": "4:2:0", "optimize": True, "progressive": False},
    "webp": {"format": "WEBP", "method": 6, "lossless": False},
    "avif": {"format": "AVIF", "speed": 6, "subsampling": "4:2:0", "range": "full", "max_threads": 1},
}

_FEATURE = {"jpeg": "jpg", "webp": "webp", "avif": "avif"}


class BaselineUnavailableError(RdeicError, RuntimeError):
    """The format cannot be encoded with this Pillow build."""


@dataclass(frozen=True)
class Baseline:
    """One classical encoding of an image: ``at_floor`` when the format's lowest rate is still above the target,
    ``at_ceiling`` when even its highest quality stays below it."""

    format: str
    quality: int
    bpp: float
    num_bytes: int
    decoded: np.ndarray
    at_floor: bool
    at_ceiling: bool = False


def check_format(fmt: str) -> None:
    """Raise a one-line error when ``fmt`` is not a known format or this Pillow build cannot encode it."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown baseline format {fmt!r}: valid formats are {', '.join(FORMATS)}")
    if not features.check(_FEATURE[fmt]):
        raise BaselineUnavailableError(f"{fmt} is not supported by this Pillow build (PIL.features.check({_FEATURE[fmt]!r}) is False)")


def encode(image: np.ndarray, fmt: str, quality: int) -> bytes:
    """The bytes of ``image`` ((H, W, 3) uint8) in ``fmt`` at ``quality``, with the fixed settings above."""
    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, quality=quality, **_SAVE_OPTIONS[fmt])
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.array(img.convert("RGB"))


def matched(image: np.ndarray, target_bpp: float, fmt: str) -> Baseline:
    """The encoding of ``image`` in ``fmt`` whose bpp is the smallest that is >= ``target_bpp``.

    A binary search over quality assumes bpp grows with quality; as it need not exactly, the answer
    is the closest valid encoding among all qualities tried, and its neighbours are tried until none
    is closer. The returned bpp is measured >= the target, unless ``at_floor`` (the lowest quality
    is already above it: that one is returned) or ``at_ceiling`` (the highest quality is still below
    it: that one is returned).
    """
    check_format(fmt)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    search = _Search(image, fmt)
    low, high = QUALITY_RANGE[fmt]
    if search.bpp(low) > target_bpp:
        return search.result(low, at_floor=True)
    if search.bpp(high) < target_bpp:
        return search.result(high, at_ceiling=True)
    quality = search.lowest_reaching(target_bpp, low, high)
    while True:  # walk to a closer neighbour while there is one
        for neighbour in (quality - 1, quality + 1):
            if low <= neighbour <= high:
                search.bpp(neighbour)
        closest = search.closest_above(target_bpp)
        if closest == quality:
            return search.result(quality)
        quality = closest


class _Search:
    """Encodings of one image in one format, by quality, each made at most once."""

    def __init__(self, image: np.ndarray, fmt: str) -> None:
        self.image = image
        self.fmt = fmt
        self.pixels = image.shape[0] * image.shape[1]
        self.encoded: dict[int, bytes] = {}

    def bpp(self, quality: int) -> float:
        if quality not in self.encoded:
            self.encoded[quality] = encode(self.image, self.fmt, quality)
        return 8 * len(self.encoded[quality]) / self.pixels

    def lowest_reaching(self, target: float, low: int, high: int) -> int:
        """Binary search: bpp(low) <= target <= bpp(high) in, the lowest quality measured >= target out."""
        if self.bpp(low) >= target:
            return low
        while high - low > 1:  # invariant: bpp(low) < target <= bpp(high)
            middle = (low + high) // 2
            if self.bpp(middle) >= target:
                high = middle
            else:
                low = middle
        return high

    def closest_above(self, target: float) -> int:
        """Among the qualities tried, the one with the smallest bpp >= target (the lower quality on a tie)."""
        return min((q for q in self.encoded if self.bpp(q) >= target), key=lambda q: (self.bpp(q), q))

    def result(self, quality: int, at_floor: bool = False, at_ceiling: bool = False) -> Baseline:
        data = self.encoded[quality]
        return Baseline(format=self.fmt, quality=quality, bpp=8 * len(data) / self.pixels, num_bytes=len(data),
                        decoded=decode(data), at_floor=at_floor, at_ceiling=at_ceiling)


class Sweep:
    """One format at fixed qualities over a set of images, for rate–distortion curves (``rdeic eval``).

    Each point of a classical codec's curve is one quality applied to every image (CompressAI's way);
    :meth:`qualities` picks them to cover a bpp interval, by the images' mean bpp. Each encoding is
    made once and kept with its encoding time.
    """

    def __init__(self, fmt: str, images: list[np.ndarray]) -> None:
        check_format(fmt)
        self.fmt, self.images = fmt, images
        self.low, self.high = QUALITY_RANGE[fmt]
        self.encoded: dict[int, list[tuple[bytes, float]]] = {}

    def encodings(self, quality: int) -> list[tuple[bytes, float]]:
        if quality not in self.encoded:
            out = []
            for image in self.images:
                t0 = time.perf_counter()
                out.append((encode(image, self.fmt, quality), time.perf_counter() - t0))
            self.encoded[quality] = out
        return self.encoded[quality]

    def bpp(self, quality: int) -> float:
        return float(np.mean([8 * len(data) / (im.shape[0] * im.shape[1])
                              for (data, _), im in zip(self.encodings(quality), self.images)]))

    def reaching(self, target: float) -> int:
        """The lowest quality whose mean bpp is >= target (the highest quality if none is)."""
        low, high = self.low, self.high
        if self.bpp(high) < target:
            return high
        if self.bpp(low) >= target:
            return low
        while high - low > 1:  # bpp(low) < target <= bpp(high)
            middle = (low + high) // 2
            low, high = (low, middle) if self.bpp(middle) >= target else (middle, high)
        return high

    def qualities(self, interval: tuple[float, float], points: int) -> list[int]:
        """For each of ``points`` rates evenly spaced in log-bpp over the interval, the lowest quality reaching it;
        the quality just below the interval's low end; when that gives fewer than ``points`` qualities (the
        interval is out of the format's reach), the next higher ones."""
        targets = np.geomspace(interval[0], interval[1], points)
        chosen = {self.reaching(float(t)) for t in targets}
        first = min(chosen)
        if first > self.low and self.bpp(first) > interval[0]:
            chosen.add(first - 1)  # the quality just below the interval's low end, so the curve covers it
        step = max(1, (self.high - self.low) // 20)
        while len(chosen) < points and max(chosen) < self.high:  # out of reach: the nearest qualities instead
            chosen.add(min(self.high, max(chosen) + step))
        return sorted(chosen)


def codec_versions() -> dict[str, str]:
    """Versions of the codec libraries in this Pillow build (the baselines' bytes depend on them)."""
    out = {fmt: features.version(_FEATURE[fmt]) or "unavailable" for fmt in FORMATS}
    out["libjpeg-turbo"] = features.version("libjpeg_turbo") or "unavailable"
    return out
