from pathlib import Path

import numpy as np
import torch

from rdeic.config import from_dict
from rdeic.data import CropSpec, random_crop
from rdeic.training import Trainer, TrainConfig
from rdeic.weights import init_model
from tests.helpers import encode, write_shard

# the extensions the compress job takes as a sample's image (pipelines/samples.py before issue 13)
JOB_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pbm", "pnm", "jp2", "jpx")


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


def _grey(level: int) -> bytes:
    return encode(np.full((16, 16, 3), level, dtype=np.uint8))


def _trainer(shards: str) -> Trainer:
    cfg = from_dict(TrainConfig, {"stage": "stage1", "output": "unused", "init_preset": "tiny",
                                  "data": {"shards": [shards], "crop": 16, "batch_size": 1}})
    return Trainer(init_model("tiny"), cfg, torch.device("cpu"))


def test_training_reads_every_shard_of_a_brace_pattern(tmp_path):
    """The jobs take ``shard-{000000..000001}.tar``; training took it for one file's name."""
    for s in range(2):
        write_shard(tmp_path / f"shard-{s:06d}.tar", [{"__key__": f"{s}_{i}", "png": _grey(100 * s)} for i in range(2)])
    trainer = _trainer(str(tmp_path / "shard-{000000..000001}.tar"))
    assert [Path(u).name for u in trainer.data.urls] == ["shard-000000.tar", "shard-000001.tar"]
    stream = trainer.data.iterate()
    assert sorted(int(next(stream).mean()) for _ in range(4)) == [0, 0, 100, 100]


def test_training_reads_every_image_format_the_jobs_read(tmp_path):
    """The sample's image is found by one rule for both; training knew 8 of the jobs' 14 extensions.
    (The bytes are PNG under every name: images are recognised by their content.)"""
    write_shard(tmp_path / "shard.tar", [{"__key__": f"k{i:02d}", ext: _grey(10 * i)} for i, ext in enumerate(JOB_IMAGE_EXTENSIONS)])
    stream = _trainer(str(tmp_path / "shard.tar")).data.iterate()
    levels = [int(next(stream).mean()) for _ in JOB_IMAGE_EXTENSIONS]
    assert sorted(levels) == [10 * i for i in range(len(JOB_IMAGE_EXTENSIONS))]
