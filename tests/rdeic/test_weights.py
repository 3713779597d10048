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


def _header_only(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def _torch_save(_path) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buf)
    return buf.getvalue()


# what a broken safetensors file holds instead -> what its one-line error says after the file's path
BROKEN_FILES = {
    "truncated": (lambda p: p.read_bytes()[: p.stat().st_size // 2], r" is not a safetensors file \(truncated\? \d+ bytes"),
    "header_cut": (lambda p: p.read_bytes()[:40], r" is not a safetensors file \(truncated\? 40 bytes"),
    "length_cut": (lambda p: p.read_bytes()[:5], r" is not a safetensors file \(truncated\? 5 bytes"),
    "random": (lambda p: np.random.default_rng(5).bytes(4096), r" is not a safetensors file \(4096 bytes without a safetensors header\)"),
    "empty": (lambda p: b"", r" is empty \(0 bytes\), not a safetensors file"),
    "pickle": (lambda p: __import__("pickle").dumps({"w": [1.0, 2.0]}), r" holds a pickle, not safetensors: convert it with `rdeic convert-weights`"),
    "torch_save": (_torch_save, r" holds a pickle, not safetensors: convert it with `rdeic convert-weights`"),
    "offsets_past_end": (lambda p: _header_only({"x": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}, bytes(16)),
                         r" is not a safetensors file \(truncated\? \d+ bytes, its header needs \d+\)"),
    "header_not_json": (lambda p: (9).to_bytes(8, "little") + b'{"x": 1,}', r" is not a safetensors file \(its header is not JSON"),
    "size_mismatch": (lambda p: _header_only({"x": {"dtype": "F32", "shape": [10], "data_offsets": [0, 8]}}, bytes(8)),
                      r" is not a safetensors file \(tensor x: shape \[10\] of F32 is 40 bytes, its offsets say 8\)"),
}


@pytest.mark.parametrize("file", [WEIGHTS_FILE, "entropy_tables.safetensors"])
@pytest.mark.parametrize("kind", sorted(BROKEN_FILES))
def test_broken_safetensors_files_are_refused_in_one_line(tiny_model_dir, tmp_path, file, kind):
    import re
    import shutil

    from rdeic.modeldir import compute_model_id

    make, message = BROKEN_FILES[kind]
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    (bad / file).write_bytes(make(bad / file))
    for load in (load_model, compute_model_id):  # with torch and safetensors, and the driver's way without
        with pytest.raises(ModelFormatError) as info:
            load(bad)
        text = str(info.value)
        assert "\n" not in text and re.match(re.escape(str(bad / file)) + message, text), text


@pytest.mark.parametrize("command", ["encode", "decode", "model-id"])
def test_cli_with_a_broken_model_dir_exits_2_with_one_line(tiny_model_dir, tmp_path, rng, command):
    import os
    import shutil
    import subprocess
    import sys

    from PIL import Image

    image, stream = tmp_path / "in.png", tmp_path / "a.rdeic"
    Image.fromarray(random_image(rng, 64, 64)).save(image)
    stream.write_bytes(Codec.load(tiny_model_dir).compress([np.asarray(Image.open(image))])[0])
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    (bad / WEIGHTS_FILE).write_bytes((bad / WEIGHTS_FILE).read_bytes()[:1000])
    args = {"encode": ["encode", image, tmp_path / "o.rdeic", "--model", bad],
            "decode": ["decode", stream, tmp_path / "o.png", "--model", bad],
            "model-id": ["model-id", bad, "--write"]}[command]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "rdeic.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"rdeic: error: {bad / WEIGHTS_FILE} is not a safetensors file (truncated? 1000 bytes"), proc.stderr


def test_a_header_that_starts_like_a_pickle_is_still_safetensors(tmp_path):
    from rdeic.modeldir import safetensors_index

    text = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "t.safetensors"
    path.write_bytes((640).to_bytes(8, "little") + text.ljust(640) + bytes(8))
    assert path.read_bytes()[:2] == b"\x80\x02"  # pickle protocol 2's first opcode
    assert load_file(str(path))["x"].tolist() == [0.0, 0.0]
    assert [dtype for dtype, _, _ in safetensors_index(path).values()] == ["F32"]
