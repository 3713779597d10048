"""Our converted model reproduces the authors' implementation (max abs diff ≤ 1e-4, float32).

The fixture (tests/fixtures/authors_tiny) is a tiny configuration of the authors' architecture,
its weights in their checkpoint layout, and outputs computed with their public code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rdeic.compression import LatentCode
from rdeic.control import controlled_unet, plain_unet, predict_noise
from rdeic.convert import convert
from rdeic.diffusion import sample
from rdeic.weights import load_model

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "authors_tiny"
TOL = 1e-4


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "authors-tiny"
    ckpt = FIXTURE / "checkpoint.safetensors"
    model_id = convert(sd=ckpt, rdeic=ckpt, rdeic_config=str(FIXTURE / "model.yaml"),
                       text_embedding=str(FIXTURE / "text_context.safetensors"), out=out, name="authors-tiny")
    model, loaded_id = load_model(out)
    assert loaded_id == model_id and model_id.name == "authors-tiny"
    return model


@pytest.fixture(scope="module")
def ref():
    return load_file(str(FIXTURE / "reference.safetensors"))


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = float((a - b).abs().max())
    assert diff <= TOL, diff
    return diff


@torch.no_grad()
def test_vae_feature_tap_and_decoder(converted, ref):
    feature, moments = converted.vae_features(ref["image"])
    close(feature, ref["vae_feature"])
    close(converted.latent_from_moments(moments), ref["vae_mean"])
    close(converted.decode_latent(ref["vae_mean"]), ref["vae_decoded"])


@torch.no_grad()
def test_compression_forward(converted, ref):
    out = converted.compression.eval()(ref["vae_feature"])
    close(out["z_c"], ref["comp_zc"])
    close(out["guide_hint"], ref["comp_hint"])
    close(out["likelihoods"], ref["comp_likelihoods"])


def test_compress_then_decompress(converted, ref):
    code = converted.compression.compress(ref["vae_feature"])[0]
    assert np.array_equal(code.hyper_indices, ref["z_indices"][0].numpy())
    decoded = converted.compression.decompress([LatentCode(code.hyper_indices, code.y_string, code.y_shape, 0)])
    close(decoded.z_c, ref["coded_zc"])
    close(decoded.guide_hint, ref["coded_hint"])


@torch.no_grad()
def test_noise_estimator_with_and_without_control(converted, ref):
    m, ctx = converted, converted.context(1)
    close(controlled_unet(m.unet, m.control, ref["x_t"], ref["t"], ctx, ref["coded_hint"]), ref["eps_ctrl"])
    close(plain_unet(m.unet, ref["x_t"], ref["t"], ctx), ref["eps_plain"])
    close(predict_noise(m.unet, m.control, ref["x_t"], ref["t"], ctx, ref["coded_hint"], detail=0.7), ref["eps_detail_0p7"])


@torch.no_grad()
@pytest.mark.parametrize("steps, detail, name", [(2, 1.0, "L2"), (5, 1.0, "L5"), (2, 0.7, "L2_detail_0p7")])
def test_relay_sampler(converted, ref, steps, detail, name):
    m = converted
    start = m.schedule.start(ref["coded_zc"], ref["start_noise"])
    close(start, ref["z_start"])
    noises = list(ref[f"noise_{name}"])
    out = sample(lambda x, t: m.eps(x, t, ref["coded_hint"], detail), start, m.schedule, steps, noises)
    close(out, ref[f"sample_{name}"])
