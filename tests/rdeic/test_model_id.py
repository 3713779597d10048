"""Model ids: canonical over tensors and the decoding config, stored in model_id.json, checked at load."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rdeic.codec import Codec
from rdeic.errors import ModelFormatError, ModelMismatchError
from rdeic.modeldir import ModelId
from rdeic.weights import TABLES_FILE, WEIGHTS_FILE, init_model, load_model, model_id_of, save_model
from tests.helpers import random_image

ID_FILE = "model_id.json"
DEMO = Path(__file__).resolve().parents[2] / "rdeic" / "models" / "rdeic-tiny-demo"
_ST_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64",
              torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], order: list[str], metadata: dict[str, str]) -> None:
    """A valid safetensors file with the tensors' data in the given order (save_file always sorts them)."""
    header: dict = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name in order:
        t = tensors[name]
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def old_file_digest(directory: Path) -> bytes:
    """The id digest before rdeic-model-id/2: SHA-256 over the bytes of the two safetensors files."""
    h = hashlib.sha256()
    for name in (WEIGHTS_FILE, TABLES_FILE):
        h.update((directory / name).read_bytes())
    return h.digest()[:8]


def edit_config(directory: Path, section: str, key: str, value) -> None:
    data = json.loads((directory / "config.json").read_text())
    data[section][key] = value
    (directory / "config.json").write_text(json.dumps(data, indent=2))


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, out)
    return out


def test_resaving_the_same_fp16_tensors_keeps_the_id(tiny_model_dir, tmp_path):
    model, _ = load_model(tiny_model_dir)
    half = tmp_path / "half"
    model_id = save_model(model, half, storage_dtype=torch.float16)
    resaved = tmp_path / "resaved"
    shutil.copytree(half, resaved)
    state = load_file(str(half / WEIGHTS_FILE))
    write_safetensors(resaved / WEIGHTS_FILE, state, sorted(state, reverse=True), {"format": "other", "by": "hand"})
    assert (resaved / WEIGHTS_FILE).read_bytes() != (half / WEIGHTS_FILE).read_bytes()
    assert load_model(resaved)[1] == model_id_of(resaved) == model_id
    (resaved / ID_FILE).unlink(missing_ok=True)  # computed from the tensors, not the stored file
    assert model_id_of(resaved) == model_id


@pytest.mark.parametrize("section,key,value", [("control", "scale", 0.5), ("diffusion", "beta_end", 0.013),
                                               ("diffusion", "default_steps", 3)])
def test_decoding_config_is_part_of_the_id(tiny_model_dir, model_copy, section, key, value):
    edit_config(model_copy, section, key, value)
    (model_copy / ID_FILE).unlink(missing_ok=True)
    changed = model_id_of(model_copy)
    assert changed.name == model_id_of(tiny_model_dir).name and changed != model_id_of(tiny_model_dir)
    assert load_model(model_copy)[1] == changed


def test_name_and_trained_flag_only_change_the_display_name(tiny_model_dir, model_copy):
    data = json.loads((model_copy / "config.json").read_text())
    data.update(name="renamed", trained=True)
    (model_copy / "config.json").write_text(json.dumps(data))
    (model_copy / ID_FILE).unlink(missing_ok=True)
    assert model_id_of(model_copy) == ModelId("renamed", model_id_of(tiny_model_dir).digest)


def test_config_edited_after_the_id_was_written_is_refused(model_copy):
    assert (model_copy / ID_FILE).is_file()
    edit_config(model_copy, "control", "scale", 0.5)
    with pytest.raises(ModelFormatError, match="config.json .*changed after model_id.json was written"):
        load_model(model_copy)
    with pytest.raises(ModelFormatError, match="changed after model_id.json was written"):
        model_id_of(model_copy)


def test_model_id_of_reads_the_id_file_not_the_weights(model_copy, tmp_path):
    stored = model_id_of(model_copy)
    assert json.loads((model_copy / ID_FILE).read_text())["model_id"] == str(stored)
    other = tmp_path / "other"
    save_model(init_model("tiny", seed=1), other)
    shutil.copy(other / WEIGHTS_FILE, model_copy / WEIGHTS_FILE)  # loadable, but other tensors
    assert model_id_of(model_copy) == stored
    with pytest.raises(ModelFormatError, match="weights .*changed after model_id.json was written.*rdeic model-id"):
        load_model(model_copy)
    for name in (WEIGHTS_FILE, TABLES_FILE):
        (model_copy / name).write_bytes(b"not safetensors")
    assert model_id_of(model_copy) == stored
    with pytest.raises(ModelFormatError, match=r"is not a safetensors file \(15 bytes without a safetensors header\)"):
        load_model(model_copy)


def test_directory_without_id_file_computes_it_and_cli_writes_it(model_copy, caplog, capsys):
    from rdeic.cli import main

    stored = (model_copy / ID_FILE).read_text()
    (model_copy / ID_FILE).unlink()
    caplog.set_level("WARNING")
    assert str(model_id_of(model_copy)) == json.loads(stored)["model_id"]
    model_id_of(model_copy)
    assert sum("rdeic model-id" in r.getMessage() for r in caplog.records) == 1  # logged once per directory
    assert main(["model-id", str(model_copy)]) == 0 and not (model_copy / ID_FILE).exists()
    assert capsys.readouterr().out.strip() == json.loads(stored)["model_id"]
    assert main(["model-id", str(model_copy), "--write"]) == 0
    assert (model_copy / ID_FILE).read_text() == stored


def test_id_file_is_written_with_the_mode_of_the_other_files(tiny_model_dir):
    modes = {f.name: f.stat().st_mode for f in tiny_model_dir.iterdir()}
    assert modes[ID_FILE] == modes[WEIGHTS_FILE] == modes["config.json"]
    assert json.loads((tiny_model_dir / ID_FILE).read_text())["algorithm"] == "rdeic-model-id/2"


def test_modeldir_computes_ids_without_torch(model_copy):
    (model_copy / ID_FILE).unlink()
    code = ("import sys; sys.modules['torch'] = None; sys.modules['safetensors'] = None\n"
            "from rdeic.modeldir import model_id_of; print(model_id_of(sys.argv[1]))")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code, str(model_copy)], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(load_model(model_copy)[1])


def test_streams_with_the_legacy_file_digest_still_decode(tiny_model_dir, rng, monkeypatch):
    import rdeic.codec

    codec = Codec.load(tiny_model_dir)
    legacy = old_file_digest(tiny_model_dir)
    old_writer = Codec(codec.model, ModelId(codec.model_id.name, legacy))  # how streams were written before
    image = random_image(rng, 64, 64)
    old, new = old_writer.rewrap(old_writer.compress([image])[0], 1), codec.compress([image])[0]  # legacy ids: v1 only
    assert old != new
    calls = []
    real = rdeic.codec.legacy_digest
    monkeypatch.setattr(rdeic.codec, "legacy_digest", lambda d: calls.append(d) or real(d))
    codec.decompress([new])
    assert calls == []  # the legacy digest is computed only when a stream needs it
    assert np.array_equal(codec.decompress([old])[0], codec.decompress([new])[0])
    codec.decompress([old])
    assert len(calls) == 1
    foreign = Codec(codec.model, ModelId(codec.model_id.name, bytes(8))).compress([image])[0]
    with pytest.raises(ModelMismatchError, match="written by a model whose id digest starts 0000"):
        codec.decompress([foreign])
    assert len(calls) == 1  # cached


def test_bundled_demo_model_loads_and_its_stored_id_matches(tmp_path):
    stored = json.loads((DEMO / ID_FILE).read_text())
    model, loaded = load_model(DEMO)
    assert str(loaded) == stored["model_id"] == str(model_id_of(DEMO))
    assert loaded.name == "rdeic-tiny-demo" and model.config.trained
    assert stored["algorithm"] == "rdeic-model-id/2"
