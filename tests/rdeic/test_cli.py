"""The `rdeic` command: encode / decode / info, and one-line errors."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from rdeic import bitstream as bs
from rdeic.cli import main
from rdeic.codec import Codec
from tests.helpers import random_image
from tests.rdeic.test_bitstream import _with_table, forged_size


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
    assert info["size"] == [90, 70] and info["format_version"] == 2
    assert info["model_id"] == "@" + Codec.load(tiny_model_dir).model_id.digest[:2].hex()  # a v2 stream carries a prefix
    assert info["container_bytes"] == 16  # 90x70: each side fits one varint byte
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
    _assert_one_line_error(_run_cli("decode", stream, tmp_path / "o.png", "--model", tiny_model_dir), message)


def _run_cli(*args, memory_cap: int | None = None) -> subprocess.CompletedProcess:
    """``rdeic ARGS`` in a child process, its address space capped at ``memory_cap`` bytes if given."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_cap, memory_cap))

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rdeic.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120, preexec_fn=cap if memory_cap else None)


def _assert_one_line_error(proc: subprocess.CompletedProcess, message: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
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
    assert "was written by a model whose id digest starts" in capsys.readouterr().err
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


@pytest.fixture
def huge(tiny_codec, rng, tmp_path):
    """A 2.4 MB stream claiming 100000x100000 pixels, valid in every other respect."""
    path = tmp_path / "huge.rdeic"
    path.write_bytes(forged_size(tiny_codec.compress([random_image(rng, 64, 64)])[0], 100_000, 100_000))
    return path


def test_decode_refuses_a_huge_claimed_size_before_allocating(huge, tiny_model_dir, tmp_path):
    proc = _run_cli("decode", huge, tmp_path / "o.png", "--model", tiny_model_dir, memory_cap=2 << 30)
    _assert_one_line_error(proc, "over the decode limit of 16777216 padded pixels")
    assert "--max-pixels" in proc.stderr and not (tmp_path / "o.png").exists()


def test_decode_max_pixels_option(tiny_model_dir, png, tmp_path, capsys):
    stream = tmp_path / "a.rdeic"  # 90x70: 128x128 = 16384 padded pixels
    assert main(["encode", str(png), str(stream), "--model", str(tiny_model_dir)]) == 0
    decode = ["decode", str(stream), str(tmp_path / "o.png"), "--model", str(tiny_model_dir), "--steps", "1"]
    capsys.readouterr()
    assert main(decode + ["--max-pixels", "16383"]) == 2
    assert "over the decode limit of 16383" in capsys.readouterr().err
    assert main(decode + ["--max-pixels", "16384"]) == 0
    with pytest.raises(SystemExit):
        main(decode + ["--max-pixels", "0"])
    assert "positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["decode", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--max-pixels N refuse" in help_text and "padded pixels" in help_text and "Raise it" in help_text


def test_info_shows_the_size_and_the_limit_without_decoding(huge, capsys):
    assert main(["info", str(huge), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["size"] == [100_000, 100_000] and info["padded_pixels"] == 100_032 ** 2
    assert info["over_default_max_pixels"] is True
    assert main(["info", str(huge)]) == 0
    out = capsys.readouterr().out
    assert "over the default decode limit of 16777216 padded pixels" in out and "--max-pixels" in out


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda data: _with_table([(2, 1), (1, 5)], b"y" + bytes(5)), "section 2 at position 1"),
        (lambda data: forged_size(data, bs.MAX_SIDE + 1, 64), "over its limit"),
        (lambda data: bs.write(replace(bs.read(data).header, version=1, model_name="m", model_hash=bytes(8)),  # v2 has
                               bs.read(data).hyper[:-1], bs.read(data).y), "hyper-latent section of"),  # no such field
    ],
)
def test_info_and_decode_use_the_same_parser(tiny_codec, tiny_model_dir, rng, tmp_path, capsys, make, message):
    path = tmp_path / "bad.rdeic"
    path.write_bytes(make(tiny_codec.compress([random_image(rng, 64, 64)])[0]))
    errors = []
    for argv in (["info", str(path)], ["decode", str(path), str(tmp_path / "o.png"), "--model", str(tiny_model_dir)]):
        assert main(argv) == 2
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1] and message in errors[0]
