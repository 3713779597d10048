"""Classical codecs at a matched rate (Pillow), on small synthetic images."""

from __future__ import annotations

import numpy as np
import pytest

from rdeic import baselines


def photo_like(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    """Smooth gradients and an edge with mild noise: compressible like a photo, unlike pure noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([200 * xx + 30, 180 * yy + 40, 120 + 80 * np.sin(6 * xx + 4 * yy)], -1)
    base[h // 3:2 * h // 3, w // 4:w // 2] = (230, 40, 50)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def bpp_at(image, fmt, quality):
    return 8 * len(baselines.encode(image, fmt, quality)) / (image.shape[0] * image.shape[1])


@pytest.mark.parametrize("fmt", baselines.FORMATS)
def test_matched_rate_is_closest_from_above(fmt):
    image = photo_like()
    low, high = baselines.QUALITY_RANGE[fmt]
    target = (bpp_at(image, fmt, low) + bpp_at(image, fmt, high)) / 2  # reachable from above
    result = baselines.matched(image, target, fmt)
    assert result.format == fmt and not result.at_floor and not result.at_ceiling
    assert low < result.quality <= high and result.bpp >= target
    assert result.bpp == 8 * result.num_bytes / (96 * 128) == bpp_at(image, fmt, result.quality)
    below = bpp_at(image, fmt, result.quality - 1)
    assert below < target or below >= result.bpp  # the next lower quality is not a closer match
    assert result.decoded.shape == image.shape and result.decoded.dtype == np.uint8
    assert np.abs(result.decoded.astype(int) - image).mean() < 40


@pytest.mark.parametrize("fmt", baselines.FORMATS)
@pytest.mark.parametrize("target", [0.02, 0.3, 1.5])
def test_matched_rate_is_above_the_target_or_at_the_floor(fmt, target):
    result = baselines.matched(photo_like(), target, fmt)
    assert result.bpp >= target or result.at_floor
    if result.at_floor:
        assert result.quality == baselines.QUALITY_RANGE[fmt][0] and result.bpp > target


def test_a_tiny_target_is_at_the_jpeg_floor():
    result = baselines.matched(photo_like(), 0.02, "jpeg")
    assert result.at_floor and result.quality == 1 and result.bpp > 0.02
    assert result.decoded.shape == (96, 128, 3)


def test_an_unreachable_target_is_at_the_ceiling():
    result = baselines.matched(photo_like(), 50.0, "jpeg")
    assert result.at_ceiling and not result.at_floor and result.quality == 95


def test_the_search_does_not_trust_monotone_rates(monkeypatch):
    """Rates that dip and jump with quality: the answer's measured bpp is still >= the target and the closest seen."""
    image = np.zeros((10, 10, 3), np.uint8)  # 100 pixels: bpp = 8 · bytes / 100
    rng = np.random.default_rng(7)
    for _ in range(50):
        sizes = np.maximum(1, np.arange(101) * 10 + rng.integers(-60, 60, 101))
        monkeypatch.setattr(baselines, "encode", lambda img, fmt, q, sizes=sizes: bytes(int(sizes[q])))
        monkeypatch.setattr(baselines, "decode", lambda data: image)
        target = float(rng.uniform(0, 80))
        result = baselines.matched(image, target, "webp")
        assert result.bpp == 8 * sizes[result.quality] / 100
        rate = 8 * sizes / 100
        if result.at_floor:
            assert rate[0] > target and result.quality == 0
        elif result.at_ceiling:
            assert rate[100] < target and result.quality == 100
        else:
            assert result.bpp >= target
            neighbours = rate[max(0, result.quality - 1):result.quality + 2]
            assert result.bpp == neighbours[neighbours >= target].min()  # no closer match next to it


def test_the_same_image_gives_the_same_bytes():
    image = photo_like(seed=3)
    for fmt in baselines.FORMATS:
        first, second = baselines.matched(image, 0.8, fmt), baselines.matched(image, 0.8, fmt)
        assert (first.quality, first.num_bytes) == (second.quality, second.num_bytes)
        assert np.array_equal(first.decoded, second.decoded)


def test_unknown_and_unavailable_formats(monkeypatch):
    with pytest.raises(ValueError, match="unknown baseline format 'jxl': valid formats are jpeg, webp, avif"):
        baselines.matched(photo_like(), 0.1, "jxl")
    monkeypatch.setattr(baselines.features, "check", lambda name: name != "avif")
    with pytest.raises(baselines.BaselineUnavailableError, match="avif is not supported by this Pillow build"):
        baselines.matched(photo_like(), 0.1, "avif")


def test_codec_versions_are_recorded():
    found = baselines.codec_versions()
    assert set(found) >= set(baselines.FORMATS) and all(found[fmt] != "unavailable" for fmt in baselines.FORMATS)


@pytest.mark.parametrize("fmt", ("jpeg", "webp"))
def test_a_sweep_covers_the_interval_with_fixed_qualities(fmt):
    images = [photo_like(seed=0), photo_like(80, 96, seed=1)]
    sweep = baselines.Sweep(fmt, images)
    low, high = sweep.bpp(30), sweep.bpp(80)
    qualities = sweep.qualities((low * 1.05, high), 5)
    rates = [sweep.bpp(q) for q in qualities]
    assert len(qualities) >= 5 and rates == sorted(rates)
    assert rates[0] < low * 1.05 and rates[-1] >= high  # the interval is covered at both ends
    assert all(len(sweep.encodings(q)) == 2 for q in qualities)


def test_a_sweep_out_of_reach_gives_the_lowest_qualities():
    sweep = baselines.Sweep("jpeg", [photo_like()])
    qualities = sweep.qualities((0.0001, 0.0004), 4)  # far below JPEG's floor
    assert qualities[0] == 1 and len(qualities) == 4
