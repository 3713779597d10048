import numpy as np

from rdeic.data import CropSpec, random_crop


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(40, 200, (96, 80, 3), dtype=np.uint8)


def test_crop_is_reproducible_from_its_generator():
    spec = CropSpec(size=48, scale_min=0.6, scale_max=1.0, permute_channels=True, colour_gain=0.3)
    a = random_crop(_image(), spec, np.random.default_rng(7))
    b = random_crop(_image(), spec, np.random.default_rng(7))
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)


def test_channel_permutation_only_reorders_channels():
    image = _image()
    spec = CropSpec(size=80, flip=False, permute_channels=True)
    seen = set()
    for seed in range(12):
        crop = random_crop(image[:80], spec, np.random.default_rng(seed))
        order = tuple(int(np.flatnonzero([np.array_equal(crop[..., c], image[:80, :, k]) for k in range(3)])[0]) for c in range(3))
        assert sorted(order) == [0, 1, 2]
        seen.add(order)
    assert len(seen) > 1


def test_colour_gain_scales_each_channel_within_its_bounds():
    image = np.full((64, 64, 3), 100, dtype=np.uint8)
    spec = CropSpec(size=64, flip=False, colour_gain=0.3)
    means = np.array([random_crop(image, spec, np.random.default_rng(s)).reshape(-1, 3).mean(0) for s in range(20)])
    assert means.min() >= 70 - 0.5 and means.max() <= 130 + 0.5
    assert np.ptp(means[:, 0] - means[:, 1]) > 10  # casts differ between channels and between draws
    assert np.array_equal(random_crop(image, CropSpec(size=64, flip=False), np.random.default_rng(0)), image)
