"""On a CUDA device: one training step of each RDEIC stage and of the denoiser, and a codec round trip.

Skipped (and reported) where torch sees no CUDA device; ``python bench/gpu.py`` gives the figures.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rdeic.codec import Codec
from rdeic.config import from_dict
from rdeic.training import Trainer, TrainConfig
from rdeic.weights import init_model
from tests.helpers import random_image

pytestmark = pytest.mark.gpu

# loss terms made only of the model and the generator's noise (bpp is not: compressai's training
# noise comes from the device's own RNG)
NOISE_TERMS = {"stage1": ("noise_x0_mse", "guide_mse"), "stage2": ("mse", "guide_mse"), "denoiser": ("loss",)}


def _trainer(stage: str, device: str, tmp_path) -> Trainer:
    cfg = from_dict(TrainConfig, {
        "stage": stage, "output": str(tmp_path / stage), "init_preset": "tiny", "steps": 1, "perceptual": "none",
        "data": {"shards": [str(tmp_path / "unread.tar")], "crop": 64, "batch_size": 2}, "optim": {"lr": 1e-3}})
    return Trainer(init_model("tiny", seed=0), cfg, torch.device(device))


@pytest.mark.parametrize("stage", ["stage1", "stage2", "denoiser"])
def test_one_training_step_on_cuda_uses_the_noise_of_a_cpu_run(stage, tmp_path, rng, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # compare float32 with float32
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    batch = torch.from_numpy(np.stack([random_image(rng, 64, 64) for _ in range(2)])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    cuda = _trainer(stage, "cuda", tmp_path)
    before = [p.detach().clone() for p in cuda.params]
    terms = cuda.step(batch)
    assert all(p.device.type == "cuda" for p in cuda.params)
    assert all(math.isfinite(v) for v in terms.values()), terms
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, cuda.params))
    on_cpu = _trainer(stage, "cpu", tmp_path).step(batch)
    for key in NOISE_TERMS[stage]:
        assert terms[key] == pytest.approx(on_cpu[key], rel=1e-2), key


def test_codec_round_trip_on_cuda_decodes_on_cpu_too(tiny_model_dir, tiny_codec, rng):
    codec = Codec.load(tiny_model_dir, device="cuda", max_batch=4)
    images = [random_image(rng, 64, 96), random_image(rng, 50, 70), random_image(rng, 64, 96)]
    streams = codec.compress(images)
    decoded = codec.decompress(streams, steps=2)
    assert [d.shape for d in decoded] == [im.shape for im in images]
    # an archive written by GPU workers decodes anywhere; pixels differ by float rounding only
    on_cpu = tiny_codec.decompress(streams, steps=2)
    for a, b in zip(decoded, on_cpu):
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.0
