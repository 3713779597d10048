"""Quality metrics; learned backbones are random here, and each test that uses one says so."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rdeic import metrics
from tests.helpers import random_image


def test_psnr_known_value():
    a = np.zeros((8, 8, 3), np.uint8)
    b = np.full((8, 8, 3), 255, np.uint8)
    assert metrics.psnr(a, b) == pytest.approx(0.0)
    c = a.copy()
    c[0, 0, 0] = 255  # MSE = 1/192 of the range squared
    assert metrics.psnr(a, c) == pytest.approx(10 * math.log10(192), rel=1e-6)
    assert metrics.psnr(a, a) == float("inf")


def test_ms_ssim_bounds_and_size_check(rng):
    img = random_image(rng, 200, 240)
    assert metrics.ms_ssim(img, img) == pytest.approx(1.0, abs=1e-6)
    noisy = np.clip(img.astype(int) + rng.integers(-40, 40, img.shape), 0, 255).astype(np.uint8)
    assert 0 < metrics.ms_ssim(img, noisy) < 1
    with pytest.raises(ValueError, match="> 160"):
        metrics.ms_ssim(img[:100], img[:100])


def test_backbones_are_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("RDEIC_BACKBONES", raising=False)
    with pytest.raises(metrics.MissingWeightsError, match="alexnet-owt-7be5be79.pth"):
        metrics.LPIPS()
    with pytest.raises(metrics.MissingWeightsError, match="vgg16-397923af.pth"):
        metrics.DISTS()
    with pytest.raises(metrics.MissingWeightsError, match="weights-inception-2015-12-05-6726825d.pth"):
        metrics.DistributionMetrics()


def test_backbone_from_an_explicit_local_file(tmp_path):
    import torchvision

    path = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)  # random weights, saved locally
    lpips = metrics.LPIPS(weights=path)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert float(lpips(x, x)) == pytest.approx(0.0, abs=1e-6)


def test_lpips_and_dists_with_random_backbones(rng):
    """Random backbones (stated): only identity and ordering properties are checked."""
    img = random_image(rng, 64, 64)
    worse = np.clip(img.astype(int) + rng.integers(-80, 80, img.shape), 0, 255).astype(np.uint8)
    x, y = metrics.to_unit(img), metrics.to_unit(worse)
    lp = metrics.LPIPS(random_backbone=True)
    assert float(lp(x * 2 - 1, x * 2 - 1)) == pytest.approx(0.0, abs=1e-6)
    assert float(lp(x * 2 - 1, y * 2 - 1)) > 0
    ds = metrics.DISTS(random_backbone=True)
    assert float(ds(x, x)) == pytest.approx(0.0, abs=1e-5)
    assert float(ds(x, y)) > float(ds(x, x))


def test_patches_follow_the_shifted_grid():
    img = np.zeros((600, 520, 3), np.uint8)
    assert len(metrics.patches(img)) == 2 * 2 + 1 * 1  # grid 2x2, shifted grid (128 px) 1x1
    assert len(metrics.patches(img[:200])) == 0


def test_fid_kid_over_patches_with_a_random_feature_network(rng):
    """A random convolutional feature network stands in for InceptionV3 (stated)."""

    class Features(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 8, 16, 16)

        def forward(self, x):
            return self.conv(x.float() / 255).mean([2, 3])

    same, worse = (metrics.DistributionMetrics(feature=Features(), kid_subset=4, kid_subsets=10) for _ in range(2))
    for _ in range(3):
        img = random_image(rng, 300, 300)
        assert same.update(img, img) == 1
        worse.update(img, np.zeros_like(img))
    a, b = same.compute(), worse.compute()  # 3 patches each: KID's subset shrinks to fit
    assert a["patches"] == b["patches"] == 3
    assert abs(a["fid"]) < 1e-3 and abs(a["kid"]) < 1e-3  # KID draws its subsets at random
    assert b["fid"] > 100 * max(a["fid"], 1e-4) and b["kid"] > 100 * max(a["kid"], 1e-4), (a, b)
