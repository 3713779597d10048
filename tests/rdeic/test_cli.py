"""The `rdeic` command: encode / decode / info, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from rdeic.cli import main
from tests.helpers import random_image


@pytest.fixture
def png(tmp_path, rng):
    path = tmp_path / "in.png"
    Image.fromarray(random_image(rng, 70, 90)).save(path)
    return path


def test_encode_info_decode(tiny_model_dir, png, tmp_path, capsys):
    stream, out = tmp_path / "a.rdeic", tmp_path / "out.png"
    assert main(["encode", str(png), str(stream), "--model", str(tiny_model_dir)]) == 0
    assert "bpp" in capsys.readouterr().out
    assert main(["info", str(stream), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["size"] == [90, 70] and info["model_id"].startswith("UNTRAINED-rdeic-tiny@")
    assert main(["decode", str(stream), str(out), "--model", str(tiny_model_dir), "--steps", "5", "--detail", "0.5"]) == 0
    assert np.asarray(Image.open(out)).shape == (70, 90, 3)


def test_model_from_environment(tiny_model_dir, png, tmp_path, monkeypatch):
    monkeypatch.setenv("RDEIC_MODEL", str(tiny_model_dir))
    assert main(["encode", str(png), str(tmp_path / "a.rdeic")]) == 0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d.write_bytes(b"hello world, not a bitstream"), "not an RDEIC bitstream"),
        (lambda d: d.write_bytes(d.read_bytes()[:-3]), "truncated"),
        (lambda d: d.write_bytes(d.read_bytes()[:-5] + bytes([d.read_bytes()[-5] ^ 1]) + d.read_bytes()[-4:]), "CRC32 mismatch"),
    ],
)
def test_decode_errors_are_one_line_without_traceback(tiny_model_dir, png, tmp_path, make, message):
    stream = tmp_path / "a.rdeic"
    assert main(["encode", str(png), str(stream), "--model", str(tiny_model_dir)]) == 0
    make(stream)
    proc = subprocess.run(
        [sys.executable, "-m", "rdeic.cli", "decode", str(stream), str(tmp_path / "o.png"), "--model", str(tiny_model_dir)],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rdeic: error:") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_model_mismatch_and_missing_inputs(tiny_model_dir, png, tmp_path, capsys):
    from rdeic.weights import init_model, save_model

    other = tmp_path / "other"
    save_model(init_model("tiny", seed=1), other)
    stream = tmp_path / "a.rdeic"
    main(["encode", str(png), str(stream), "--model", str(tiny_model_dir)])
    capsys.readouterr()
    assert main(["decode", str(stream), str(tmp_path / "o.png"), "--model", str(other)]) == 2
    assert "written by model" in capsys.readouterr().err
    assert main(["encode", str(tmp_path / "missing.png"), str(stream), "--model", str(tiny_model_dir)]) == 2
    assert "No such file" in capsys.readouterr().err
    (tmp_path / "text.png").write_text("not an image")
    assert main(["encode", str(tmp_path / "text.png"), str(stream), "--model", str(tiny_model_dir)]) == 2
    assert "not a recognised image format" in capsys.readouterr().err


def test_no_model_given(png, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RDEIC_MODEL", raising=False)
    monkeypatch.setattr("rdeic.cli.default_model", lambda: None)
    assert main(["encode", str(png), str(tmp_path / "a.rdeic")]) == 2
    assert "no model given" in capsys.readouterr().err
