"""Entropy coding of the latent compression module: bit-exact round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rdeic import checkerboard as ckbd
from rdeic.config import load_preset
from rdeic.compression import LatentCompression
from tests.helpers import random_image


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    m = LatentCompression(load_preset("tiny").compression).eval()
    m.update()
    return m


def test_checkerboard_squeeze_roundtrip_and_partition():
    y = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    for anchor in (True, False):
        assert torch.equal(ckbd.unsqueeze(ckbd.squeeze(y, anchor), anchor), ckbd.mask(y, anchor))
    assert torch.equal(ckbd.mask(y, True) + ckbd.mask(y, False), y)
    # anchors are (even row, odd col) and (odd row, even col)
    m = ckbd.mask(torch.ones(1, 1, 2, 2), True)[0, 0]
    assert m.tolist() == [[0.0, 1.0], [1.0, 0.0]]


@pytest.mark.parametrize("scale", [0.5, 4.0, 60.0])
def test_symbols_and_indices_roundtrip_bit_exact(module, scale):
    gen = torch.Generator().manual_seed(int(scale * 10))
    for hw in [(8, 8), (8, 24), (16, 16), (24, 8)]:
        feat = torch.randn(3, 64, *hw, generator=gen) * scale
        codes = module.compress(feat)
        decoded = module.decompress(codes)
        for code, symbols, crc in zip(codes, decoded.symbols, decoded.symbols_crc):
            assert np.array_equal(code.symbols, symbols)
            assert crc == code.symbols_crc
        assert decoded.z_c.shape == (3, 4, *hw)
        assert decoded.guide_hint.shape == (3, 48, *hw)


def test_coded_ŷ_matches_training_forward_rounding(module):
    """compress→decompress reproduces the eval-mode forward's latent (same rounding around the means)."""
    feat = torch.randn(2, 64, 16, 16) * 3
    with torch.no_grad():
        ref = module(feat)
    decoded = module.decompress(module.compress(feat))
    assert torch.allclose(decoded.z_c, ref["z_c"], atol=1e-4)
    assert torch.allclose(decoded.guide_hint, ref["guide_hint"], atol=1e-4)


def test_codec_roundtrip_many_images_and_sizes(tiny_codec):
    """Full path image → VAE feature → bitstream → parsed sections → decoded symbols, many sizes."""
    from rdeic import bitstream as bs

    rng = np.random.default_rng(7)
    sizes = [(1, 1), (17, 64), (64, 64), (65, 130), (100, 37), (128, 200), (37, 257)]
    images = [random_image(rng, h, w) for h, w in sizes for _ in range(2)]
    model = tiny_codec.model
    for image in images:
        h, w = image.shape[:2]
        x = tiny_codec._to_tensor(image, bs.padded(h), bs.padded(w))[None]
        feat, _ = model.vae_features(x)
        code = model.compression.compress(feat)[0]
        data = tiny_codec.compress([image])[0]
        stream = tiny_codec.parse(data)
        assert np.array_equal(stream.hyper_indices, code.hyper_indices)
        assert stream.y == code.y_string
        assert stream.header.symbols_crc == code.symbols_crc
        decoded = model.compression.decompress([code])
        assert np.array_equal(decoded.symbols[0], code.symbols)


def test_update_builds_tables_once(module):
    tables = module.entropy_tables()
    assert not module.update()  # already built: nothing recomputed
    assert all(torch.equal(tables[k], v) for k, v in module.entropy_tables().items())


def test_training_forward_outputs_and_gradients():
    torch.manual_seed(1)
    m = LatentCompression(load_preset("tiny").compression).train()
    out = m(torch.randn(2, 64, 16, 16))
    assert out["likelihoods"].shape == (2, 48, 8, 8)
    assert torch.all(out["likelihoods"] > 0) and torch.all(out["likelihoods"] <= 1)
    loss = -torch.log2(out["likelihoods"]).sum() + out["vq_loss"] + out["z_c"].square().mean()
    loss.backward()
    assert m.g_a[0].conv1.weight.grad.abs().sum() > 0  # straight-through rounding passes gradients
    assert m.quantizer.embedding.weight.grad is not None
