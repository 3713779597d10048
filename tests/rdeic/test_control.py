"""Noise estimator (cross control, λs) and the relay residual schedule."""

from __future__ import annotations

import math

import pytest
import torch

from rdeic.config import DiffusionConfig, load_preset
from rdeic.control import controlled_unet, plain_unet, predict_noise
from rdeic.diffusion import RelaySchedule, sample, space_timesteps
from rdeic.model import RDEIC


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return RDEIC(load_preset("tiny")).eval()


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 24, generator=g)
    hint = torch.randn(batch, 48, 16, 24, generator=g)
    ctx = torch.randn(batch, 77, 32, generator=g)
    t = torch.tensor([299, 17][:batch])
    return x, t, ctx, hint


@torch.no_grad()
def test_plain_path_equals_diffusers_forward(model):
    x, t, ctx, _ = _inputs()
    assert torch.equal(plain_unet(model.unet, x, t, ctx), model.unet(x, t, ctx).sample)


@torch.no_grad()
def test_zero_initialised_control_equals_plain_unet(model):
    x, t, ctx, hint = _inputs()
    assert all(float(zc.weight.abs().sum()) == 0 for zc in model.control.enc_zero_convs)
    assert torch.equal(controlled_unet(model.unet, model.control, x, t, ctx, hint), model.unet(x, t, ctx).sample)


@torch.no_grad()
def test_detail_knob(model):
    import copy

    control = copy.deepcopy(model.control)
    g = torch.Generator().manual_seed(3)
    for p in control.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    x, t, ctx, hint = _inputs()
    eps_sd = model.unet(x, t, ctx).sample
    eps_ctrl = controlled_unet(model.unet, control, x, t, ctx, hint)
    assert (eps_ctrl - eps_sd).abs().max() > 1e-3  # control now matters
    assert torch.equal(predict_noise(model.unet, control, x, t, ctx, hint, detail=0.0), eps_sd)
    assert torch.equal(predict_noise(model.unet, control, x, t, ctx, hint, detail=1.0), eps_ctrl)
    for lam in (0.5, 1.7):
        got = predict_noise(model.unet, control, x, t, ctx, hint, detail=lam)
        assert torch.allclose(got, eps_sd + lam * (eps_ctrl - eps_sd), atol=1e-6)


@torch.no_grad()
def test_unet_passes_per_detail(model):
    calls = []
    handle = model.unet.conv_out.register_forward_hook(lambda *a: calls.append(1))
    x, t, _, hint = _inputs(batch=1)
    try:
        for detail, expected in ((1.0, 1), (0.0, 1), (0.3, 2)):
            calls.clear()
            model.eps(x, 299, hint, detail)
            assert len(calls) == expected == model.unet_passes(1, detail)
    finally:
        handle.remove()


def test_schedule_closed_forms():
    s = RelaySchedule(DiffusionConfig())
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(s.alphas_cumprod, torch.cumprod(1 - betas, 0))
    assert s.top == 299
    assert abs(float(s.alphas_cumprod[299]) - 0.592) < 1e-3
    assert abs(s.lam - 0.830) < 1e-3
    assert abs(float(s.eta(299)) - 1.0) < 1e-12  # η_N = 1
    assert float(s.eta(0)) < 0.05
    z_c, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    ab = float(s.alphas_cumprod[299])
    assert torch.allclose(s.start(z_c, eps), math.sqrt(ab) * z_c + math.sqrt(1 - ab) * eps, atol=1e-6)
    # the training forward at t = N equals the decoding start: relay from z_c
    z0 = torch.randn(1, 4, 8, 8)
    zt = s.q_sample(z0, z_c, torch.tensor([299]), eps)
    assert torch.allclose(zt, s.start(z_c, eps), atol=1e-5)
    # and in general z_t = sqrt(ᾱ_t)[z0 + η_t(z_c − z0)] + sqrt(1 − ᾱ_t) ε
    t = 120
    ab_t = float(s.alphas_cumprod[t])
    expected = math.sqrt(ab_t) * (z0 + float(s.eta(t)) * (z_c - z0)) + math.sqrt(1 - ab_t) * eps
    assert torch.allclose(s.q_sample(z0, z_c, torch.tensor([t]), eps), expected, atol=1e-5)


def test_respaced_timesteps():
    assert space_timesteps(300, 2) == [0, 299]
    assert space_timesteps(300, 5) == [0, 75, 150, 224, 299]
    assert space_timesteps(300, 1) == [299]  # one step is taken where the relay starts, not at t = 0
    with pytest.raises(ValueError):
        space_timesteps(300, 301)


def test_sampler_matches_ddpm_posterior_by_hand():
    s = RelaySchedule(DiffusionConfig())
    z = torch.randn(1, 4, 4, 4)
    noise = [torch.randn(1, 4, 4, 4)]
    eps_seq = [torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)]
    seen = []

    def eps_fn(x, t):
        seen.append(t)
        return eps_seq[len(seen) - 1]

    out = sample(eps_fn, z, s, 2, noise)
    assert seen == [299, 0]
    ab = s.alphas_cumprod
    a1, a0 = float(ab[299]), float(ab[0])
    x0 = (z - math.sqrt(1 - a1) * eps_seq[0]) / math.sqrt(a1)
    beta = 1 - a1 / a0
    mean = beta * math.sqrt(a0) / (1 - a1) * x0 + (1 - a0) * math.sqrt(1 - beta) / (1 - a1) * z
    x = mean + math.sqrt(beta * (1 - a0) / (1 - a1)) * noise[0]
    expected = (x - math.sqrt(1 - a0) * eps_seq[1]) / math.sqrt(a0)  # last step returns x0
    assert torch.allclose(out, expected, atol=1e-5)


def _authors_rule(num_timesteps: int, count: int) -> list[int]:
    """guided-diffusion's space_timesteps (the authors' sampler), one section: a fractional stride
    accumulated in floating point, each position rounded."""
    from itertools import accumulate

    stride = (num_timesteps - 1) / (count - 1) if count > 1 else 1
    return sorted({round(p) for p in accumulate([0.0] + [stride] * (count - 1))})


def test_respaced_timesteps_follow_the_authors_rule_for_every_step_count():
    differ = [n for n in range(2, 301) if space_timesteps(300, n) != _authors_rule(300, n)]
    assert differ == []
    assert 149 in space_timesteps(300, 29) and 150 not in space_timesteps(300, 29)  # round(14 × 299/28) would give 150


def test_one_step_decodes_nearly_as_well_as_two():
    """L = 1 used to run its one UNet pass at t = 0 on a latent noised to the top (15.0 vs 23.0 dB here)."""
    import io
    import tarfile
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from rdeic.cli import default_model
    from rdeic.codec import Codec
    from rdeic.metrics import psnr

    with tarfile.open(Path(__file__).resolve().parents[2] / "examples" / "shards" / "photos-000000.tar") as tar:
        image = np.asarray(Image.open(io.BytesIO(tar.extractfile("chelsea.png").read())).convert("RGB"))[:256, :256]
    codec = Codec.load(default_model())
    data = codec.compress([image])[0]
    one, two = (codec.decompress([data], steps=steps)[0] for steps in (1, 2))
    assert psnr(image, one) > psnr(image, two) - 3
