"""Quality metrics; learned backbones are random here, and each test that uses one says so."""

from __future__ import annotations

import math
import sys
import types

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
    same, worse = (metrics.DistributionMetrics(feature=RandomFeatures(), kid_subset=4, kid_subsets=10) for _ in range(2))
    for _ in range(3):
        img = random_image(rng, 300, 300)
        assert same.update(img, img) == 1
        worse.update(img, np.zeros_like(img))
    a, b = same.compute(), worse.compute()  # 3 patches each: KID's subset shrinks to fit
    assert a["patches"] == b["patches"] == 3
    assert abs(a["fid"]) < 1e-3 and abs(a["kid"]) < 1e-3  # KID draws its subsets at random
    assert b["fid"] > 100 * max(a["fid"], 1e-4) and b["kid"] > 100 * max(a["kid"], 1e-4), (a, b)


class RandomFeatures(torch.nn.Module):
    """A random convolutional stand-in for InceptionV3 (8 features per patch; uint8 in)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 16, 16)

    def forward(self, x):
        return self.conv(x.float() / 255).mean([2, 3])


def noisy(rng, img, amplitude=40):
    return np.clip(img.astype(int) + rng.integers(-amplitude, amplitude, img.shape), 0, 255).astype(np.uint8)


def test_ssim_known_values_and_bounds(rng):
    img = random_image(rng, 64, 80)
    assert metrics.ssim(img, img) == pytest.approx(1.0, abs=1e-6)
    worse = noisy(rng, img)
    assert 0 < metrics.ssim(img, worse) < 1
    assert metrics.ssim(img, worse) == pytest.approx(metrics.ssim(worse, img), abs=1e-6)
    # constant images: only the luminance term remains, C1 / (1 + C1) with C1 = 0.01²
    black, white = np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8)
    assert metrics.ssim(black, white) == pytest.approx(1e-4 / (1 + 1e-4), rel=1e-3)


def test_mse_on_the_255_scale():
    a = np.zeros((8, 8, 3), np.uint8)
    c = a.copy()
    c[0, 0, 0] = 255
    assert metrics.mse(a, c) == pytest.approx(255**2 / 192)
    assert metrics.mse(a, a) == 0
    assert metrics.mse(metrics.to_unit(a), metrics.to_unit(c)) == pytest.approx(255**2 / 192)
    assert metrics.psnr_from_mse(metrics.mse(a, c)) == pytest.approx(metrics.psnr(a, c), rel=1e-6)


def test_backbone_lookup_order(tmp_path, monkeypatch):
    file = metrics.BACKBONE_FILES["alexnet"]
    explicit, directory, env, hub = (tmp_path / name for name in ("explicit.pth", "dir", "env", "hub"))
    for folder in (directory, env, hub / "checkpoints"):
        folder.mkdir(parents=True)
        (folder / file).write_bytes(b"")
    explicit.write_bytes(b"")
    monkeypatch.setenv("RDEIC_BACKBONES", str(env))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert metrics.backbone_path("alexnet", explicit, directory) == explicit
    assert metrics.backbone_path("alexnet", None, directory) == directory / file
    assert metrics.backbone_path("alexnet") == env / file
    monkeypatch.delenv("RDEIC_BACKBONES")
    assert metrics.backbone_path("alexnet") == hub / "checkpoints" / file
    (hub / "checkpoints" / file).unlink()
    with pytest.raises(metrics.MissingWeightsError, match=file) as caught:
        metrics.backbone_path("alexnet", None, directory / "elsewhere")
    assert caught.value.file == file


def test_suite_rejects_unknown_metrics():
    with pytest.raises(ValueError, match="unknown metric 'psnr_y': valid metrics are psnr, ssim, ms_ssim"):
        metrics.MetricSuite(["psnr", "psnr_y"])


def test_suite_reports_missing_backbones_as_unavailable(tmp_path, monkeypatch, rng):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("RDEIC_BACKBONES", raising=False)
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # as if not installed
    suite = metrics.MetricSuite("psnr,ssim,lpips,dists,niqe,fid,kid", backbones=tmp_path)
    assert suite.unavailable == {
        "lpips": "unavailable (missing alexnet-owt-7be5be79.pth)",
        "dists": "unavailable (missing vgg16-397923af.pth)",
        "niqe": "unavailable (pyiqa is not installed)",
        "fid": "unavailable (missing weights-inception-2015-12-05-6726825d.pth)",
        "kid": "unavailable (missing weights-inception-2015-12-05-6726825d.pth)",
    }
    img = random_image(rng, 96, 128)
    decoded = noisy(rng, img)
    row = suite.pair(img, decoded)
    assert set(row) == {"mse", "psnr", "ssim", "lpips", "dists", "niqe"}
    assert row["lpips"] is row["dists"] is row["niqe"] is None
    assert row["psnr"] == pytest.approx(metrics.psnr(img, decoded), rel=1e-5)
    assert row["ssim"] == pytest.approx(metrics.ssim(img, decoded))
    assert suite.distribution == []
    with pytest.raises(metrics.MetricUnavailableError, match="fid and kid are unavailable .missing weights-inception"):
        suite.features([img])


def test_suite_pair_with_random_backbones_and_skips(rng):
    """Random LPIPS and Inception stand-ins (stated): only identity, ordering and bookkeeping are checked."""
    suite = metrics.MetricSuite(["psnr", "ssim", "ms_ssim", "lpips", "fid"],
                                modules={"lpips": metrics.LPIPS(random_backbone=True), "inception": RandomFeatures()})
    assert suite.unavailable == {} and suite.distribution == ["fid"]
    small = random_image(rng, 96, 128)
    row = suite.pair(small, small)
    assert row["mse"] == 0 and row["psnr"] == float("inf") and row["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert row["ms_ssim"] is None and row["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert suite.skipped == {"ms_ssim": 1} and "161" in suite.skip_reasons["ms_ssim"]
    big = random_image(rng, 200, 240)
    worse = suite.pair(big, noisy(rng, big))
    assert 0 < worse["ms_ssim"] < 1 and worse["lpips"] > 0 and suite.skipped == {"ms_ssim": 1}
    assert set(suite.seconds) >= {"mse", "ssim", "ms_ssim", "lpips"}


def test_suite_features_for_fid_kid(rng):
    suite = metrics.MetricSuite(["kid"], modules={"inception": RandomFeatures()})
    images = [random_image(rng, 300, 300), random_image(rng, 200, 200), random_image(rng, 384, 640)]
    feats = suite.features(images)
    assert feats.dtype == np.float32 and feats.shape == (1 + 0 + (2 + 2), 8)  # 384×640: grid 1×2, shifted 1×2
    assert suite.features(images[1:2]).shape == (0, 8)
    assert np.array_equal(np.concatenate([suite.features(images[:1]), suite.features(images[2:])]), feats)


def test_niqe_needs_pyiqa_and_its_parameter_file(tmp_path, monkeypatch, rng):
    """A fake pyiqa stands in for the real one (not a dependency): only the wiring is checked."""
    made = []

    class NIQE(torch.nn.Module):
        def __init__(self, pretrained_model_path=None):
            super().__init__()
            made.append(pretrained_model_path)

        def forward(self, x):
            return x.mean([1, 2, 3]) * 10

    module = types.ModuleType("pyiqa.archs.niqe_arch")
    module.NIQE = NIQE
    for name, mod in (("pyiqa", types.ModuleType("pyiqa")), ("pyiqa.archs", types.ModuleType("pyiqa.archs")),
                      ("pyiqa.archs.niqe_arch", module)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("RDEIC_BACKBONES", raising=False)
    backbones = tmp_path / "backbones"
    backbones.mkdir()
    suite = metrics.MetricSuite(["niqe"], backbones=backbones)
    assert suite.unavailable == {"niqe": "unavailable (missing niqe_modelparameters.mat)"}
    (backbones / "niqe_modelparameters.mat").write_bytes(b"")
    suite = metrics.MetricSuite(["niqe"], backbones=backbones)
    assert suite.unavailable == {} and made == [str(backbones / "niqe_modelparameters.mat")]
    img = random_image(rng, 200, 200)
    decoded = np.zeros_like(img)
    assert suite.pair(img, decoded)["niqe"] == pytest.approx(0.0)  # on the decoded image
    assert suite.pair(img[:96, :160], decoded[:96, :160])["niqe"] is None and suite.skipped == {"niqe": 1}


def test_fid_kid_on_synthetic_features():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 16))
    other = rng.normal(size=(300, 16))
    same = metrics.fid_kid(real, real, kid_subset=100, kid_subsets=20)
    assert same["patches"] == 300 and same["warning"] is None
    shifted = metrics.fid_kid(real, other + 0.5, kid_subset=100, kid_subsets=20)
    assert abs(same["fid"]) < 1e-9 and shifted["fid"] == pytest.approx(16 * 0.5**2, rel=0.3)
    # KID is unbiased for independent samples, so ~0 (not exactly) for identical or same-distribution sets
    assert shifted["kid"] > 0.5
    assert abs(same["kid"]) < 0.1 * shifted["kid"]
    assert abs(metrics.fid_kid(real, other, kid_subset=100, kid_subsets=20)["kid"]) < 0.01 * shifted["kid"]
    assert metrics.fid_kid(real, real + 0.5, kid_subset=100, kid_subsets=20) == metrics.fid_kid(
        real, real + 0.5, kid_subset=100, kid_subsets=20)  # seeded
    few = metrics.fid_kid(real[:5], real[5:10])
    assert few["patches"] == 5 and few["warning"] == "5 patches < 16 (the feature dimension): FID is biased"
    assert np.isfinite(few["fid"]) and np.isfinite(few["kid"])
    one = metrics.fid_kid(real[:1], real[1:2])
    assert one["fid"] is None and one["kid"] is None and one["patches"] == 1


def test_fid_kid_agree_with_reference_formulas():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    from torchmetrics.image.kid import poly_mmd

    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(60, 12)), rng.normal(size=(60, 12)) * 1.3 + 0.2
    cov_r, cov_f = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    fid = (np.sum((real.mean(0) - fake.mean(0)) ** 2) + np.trace(cov_r + cov_f)
           - 2 * np.trace(scipy_linalg.sqrtm(cov_r @ cov_f)).real)
    kid = float(poly_mmd(torch.from_numpy(real), torch.from_numpy(fake)))  # subset = the whole set
    result = metrics.fid_kid(real, fake, kid_subset=60)
    assert result["fid"] == pytest.approx(fid, rel=1e-8) and result["kid"] == pytest.approx(kid, rel=1e-8)


def test_versions_of_the_metric_libraries():
    found = metrics.versions()
    assert {"torch", "torchvision", "torchmetrics", "torch-fidelity", "lpips", "pytorch-msssim", "pillow", "numpy"} <= set(found)
    assert found["torchmetrics"] == "1.9.0" and found["pytorch-msssim"] == "1.0.0"


def test_pooled_psnr_weighs_images_by_their_pixels():
    from rdeic.metrics import pooled_psnr, psnr_from_mse

    assert pooled_psnr([(10.0, 100), (40.0, 300)]) == pytest.approx(psnr_from_mse((10 * 100 + 40 * 300) / 400))
    assert pooled_psnr([(None, 100)]) is None and pooled_psnr([]) is None
    assert pooled_psnr([(0.0, 10)]) == float("inf")


def test_lab_of_known_colours():
    """sRGB white, red and mid-grey against their published CIELAB (D65) values."""
    colours = np.array([[[255, 255, 255], [255, 0, 0], [119, 119, 119], [0, 0, 0]]], np.uint8)
    lab = metrics.srgb_to_lab(metrics.to_unit(colours))[0].reshape(3, -1).T.numpy()
    assert lab[0] == pytest.approx([100.0, 0.0, 0.0], abs=1e-3)
    assert lab[1] == pytest.approx([53.24, 80.09, 67.20], abs=0.01)
    assert lab[2] == pytest.approx([50.0, 0.0, 0.0], abs=0.1)
    assert lab[3] == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)


def test_delta_e_measures_a_cast_and_not_texture(rng):
    black, white = np.zeros((16, 24, 3), np.uint8), np.full((16, 24, 3), 255, np.uint8)
    assert metrics.delta_e(black, white) == pytest.approx(100.0, abs=1e-3)
    img = random_image(rng, 64, 80)
    assert metrics.delta_e(img, img) == 0.0
    cast = img.copy()
    cast[..., 0] = np.clip(cast[..., 0].astype(int) + 20, 0, 255)  # a red cast
    noise = np.clip(img.astype(int) + rng.choice([-20, 20], img.shape), 0, 255).astype(np.uint8)  # texture, zero mean
    assert metrics.mse(img, cast) < metrics.mse(img, noise)  # PSNR ranks the cast better ...
    assert metrics.delta_e(img, cast) > 3 * metrics.delta_e(img, noise)  # ... ΔE ranks it far worse
    assert metrics.channel_shift(img, cast)[0] > 15 and abs(metrics.channel_shift(img, cast)[1]) < 1e-9
    assert metrics.delta_e(random_image(rng, 5, 7), random_image(rng, 5, 7)) > 0  # smaller than one block
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.delta_e(img, img[:32])


def test_suite_computes_delta_e_as_a_lower_is_better_pair_metric(rng):
    suite = metrics.MetricSuite("psnr,delta_e")
    img = random_image(rng, 40, 48)
    tinted = np.clip(img.astype(int) + [0, 0, 12], 0, 255).astype(np.uint8)
    row = suite.pair(img, tinted)
    assert row["delta_e"] == pytest.approx(metrics.delta_e(img, tinted)) and row["delta_e"] > 1
    assert "delta_e" in metrics.LOWER_IS_BETTER and "delta_e" in suite.seconds
