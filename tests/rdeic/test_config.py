"""Configs as data: strict keys, presets, validation at construction."""

from __future__ import annotations

import json

import pytest

from rdeic.config import CompressionConfig, ModelConfig, from_dict, load_preset
from rdeic.errors import ConfigError


@pytest.mark.parametrize("name", ["tiny", "sd21"])
def test_presets_roundtrip_json(name):
    cfg = load_preset(name)
    assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_sd21_preset_has_the_papers_sizes():
    cfg = load_preset("sd21")
    c = cfg.compression
    assert (c.M, c.N, c.codebook_size, c.index_bits) == (256, 256, 16384, 14)
    assert c.slices == (8, 8, 8, 8, 16, 16, 32, 32, 64, 64)
    assert cfg.control.channel_ratio == 0.2
    assert cfg.unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert cfg.vae["block_out_channels"][-1] == c.in_channels == 512
    assert (cfg.diffusion.used_timesteps, cfg.diffusion.beta_start, cfg.diffusion.beta_end) == (300, 0.00085, 0.012)


def test_unknown_and_missing_keys_raise():
    data = json.loads(load_preset("tiny").to_json())
    data["compresion"] = {}
    with pytest.raises(ConfigError, match="unknown keys \\['compresion'\\]"):
        from_dict(ModelConfig, data)
    data = json.loads(load_preset("tiny").to_json())
    del data["compression"]["M"]
    with pytest.raises(ConfigError, match="missing key 'M'"):
        from_dict(ModelConfig, data)


def test_values_are_validated():
    base = dict(in_channels=8, latent_channels=4, N=8, M=8, slices=[4, 4], codebook_size=16)
    from_dict(CompressionConfig, base)
    with pytest.raises(ConfigError, match="slices sum to 6"):
        from_dict(CompressionConfig, {**base, "slices": [4, 2]})
    with pytest.raises(ConfigError, match="expected int"):
        from_dict(CompressionConfig, {**base, "M": "8"})
    with pytest.raises(ConfigError, match="unknown preset"):
        load_preset("sd15")
    data = json.loads(load_preset("tiny").to_json())
    data["compression"]["in_channels"] = 32
    with pytest.raises(ConfigError, match="must equal the VAE"):
        from_dict(ModelConfig, data)
