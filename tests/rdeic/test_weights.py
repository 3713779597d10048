"""Model directory format: save → load → same outputs; strict loading; stored entropy tables; ids."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rdeic.codec import Codec
from rdeic.compression import LatentCompression
from rdeic.config import load_preset
from rdeic.errors import ModelFormatError
from rdeic.model import RDEIC
from rdeic.weights import WEIGHTS_FILE, load_model, model_id_of, save_model
from tests.helpers import random_image


def test_untrained_model_id_says_so(tiny_codec):
    assert str(tiny_codec.model_id).startswith("UNTRAINED-rdeic-tiny@")
    assert len(tiny_codec.model_id.digest) == 8


def test_save_load_same_outputs_and_id(tiny_model_dir, tmp_path, rng):
    model, model_id = load_model(tiny_model_dir)
    copy_id = save_model(model, tmp_path / "copy")
    assert copy_id == model_id == model_id_of(tiny_model_dir)
    image = random_image(rng, 64, 96)
    a = Codec.load(tiny_model_dir)
    b = Codec.load(tmp_path / "copy")
    data = a.compress([image])[0]
    assert b.compress([image])[0] == data
    assert np.array_equal(a.decompress([data])[0], b.decompress([data])[0])


def test_decoding_never_rebuilds_entropy_tables(tiny_model_dir, monkeypatch, rng):
    def refuse(*args, **kwargs):
        raise AssertionError("entropy tables were recomputed")

    monkeypatch.setattr(LatentCompression, "update", refuse)
    monkeypatch.setattr("compressai.entropy_models.GaussianConditional.update", refuse)
    codec = Codec.load(tiny_model_dir)
    data = codec.compress([random_image(rng, 64, 64)])[0]
    codec.decompress([data])


def test_changed_weights_change_the_id(tiny_model_dir, tmp_path):
    model, model_id = load_model(tiny_model_dir)
    with torch.no_grad():
        model.compression.out.bias.add_(1e-3)
    assert save_model(model, tmp_path / "changed") != model_id


def test_strict_loading_names_bad_keys(tiny_model_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    state = load_file(str(bad / WEIGHTS_FILE))
    state.pop("compression.out.bias")
    state["compression.extra"] = torch.zeros(1)
    save_file(state, str(bad / WEIGHTS_FILE))
    with pytest.raises(ModelFormatError, match=r"1 missing: compression.out.bias; 1 unexpected: compression.extra"):
        load_model(bad)


def test_missing_files_are_named(tmp_path, tiny_model_dir):
    with pytest.raises(ModelFormatError, match="config.json is missing"):
        load_model(tmp_path)
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, partial)
    (partial / "entropy_tables.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="entropy_tables.safetensors is missing"):
        load_model(partial)


def test_config_is_saved_as_json(tiny_model_dir):
    data = json.loads((tiny_model_dir / "config.json").read_text())
    assert data["compression"]["codebook_size"] == 256 and data["trained"] is False


def test_sd21_builds_with_the_published_sizes():
    with torch.device("meta"):
        model = RDEIC(load_preset("sd21"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.unet) == 865_910_724  # SD 2.1-base UNet
    assert count(model.vae) == 83_653_863  # SD VAE
    ctrl = model.control
    assert ctrl.conv_in.weight.shape == (64, 260, 3, 3)  # 0.2 x 320 channels on concat(x_t, hint)
    assert len(ctrl.enc_zero_convs) == 12 and len(ctrl.dec_zero_convs) == 12 and ctrl.scales.numel() == 25
    assert model.compression.quantizer.embedding.weight.shape == (16384, 256)
