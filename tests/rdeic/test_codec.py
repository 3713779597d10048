"""The Codec API: batching, sizes, reproducibility, argument checks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rdeic.codec import Codec
from rdeic.errors import ImageTooLargeError
from tests.helpers import random_image
from tests.rdeic.test_bitstream import forged_size


def test_any_size_roundtrip_shapes_and_bpp(tiny_codec, rng):
    images = [random_image(rng, h, w) for h, w in [(1, 1), (50, 70), (64, 64), (130, 65)]]
    streams = tiny_codec.compress(images)
    decoded = tiny_codec.decompress(streams)
    for im, data, out in zip(images, streams, decoded):
        assert out.shape == im.shape and out.dtype == np.uint8
        assert tiny_codec.parse(data).header.width == im.shape[1]


def test_batched_equals_one_by_one(tiny_codec, rng):
    """Bitstreams are batch-independent; pixels agree up to float rounding of batched kernels."""
    images = [random_image(rng, 64, 128) for _ in range(5)] + [random_image(rng, 70, 70)]
    streams = tiny_codec.compress(images)  # max_batch=4: two batches of the 64x128 group
    assert streams == [tiny_codec.compress([im])[0] for im in images]
    batched = tiny_codec.decompress(streams, steps=2)
    for data, out in zip(streams, batched):
        single = tiny_codec.decompress([data], steps=2)[0]
        diff = np.abs(single.astype(int) - out.astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.01


def test_seed_controls_decode_noise(tiny_codec, rng):
    image = random_image(rng, 64, 64)
    a, b = tiny_codec.compress([image, image], seeds=[1, 2])
    assert tiny_codec.parse(a).header.seed == 1
    assert a != b
    da = tiny_codec.decompress([a], steps=5)[0]
    db = tiny_codec.decompress([b], steps=5)[0]
    assert np.abs(da.astype(int) - db.astype(int)).mean() > 1  # other noise, another picture
    assert np.array_equal(tiny_codec.decompress([a], steps=5)[0], da)  # same seed, same bytes
    # the default seed derives from the content: re-encoding is idempotent
    assert tiny_codec.compress([image])[0] == tiny_codec.compress([image])[0]


def test_steps_and_detail_change_the_output(tiny_codec, rng):
    data = tiny_codec.compress([random_image(rng, 64, 64)])[0]
    outs = [tiny_codec.decompress([data], steps=s, detail=d)[0] for s, d in [(2, 1.0), (5, 1.0), (2, 0.0)]]
    assert not np.array_equal(outs[0], outs[1])
    assert outs[2].shape == outs[0].shape


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8),
                                 np.zeros((8, 8, 3), np.float32), np.zeros((0, 8, 3), np.uint8)])
def test_bad_images_refused(tiny_codec, bad):
    with pytest.raises(ValueError, match="images\\[0\\]"):
        tiny_codec.compress([bad])


def test_bad_decode_arguments_refused(tiny_codec, rng):
    data = tiny_codec.compress([random_image(rng, 64, 64)])[0]
    for steps in (0, 301, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            tiny_codec.decompress([data], steps=steps)
    with pytest.raises(ValueError, match="detail"):
        tiny_codec.decompress([data], detail=float("nan"))


def test_max_pixels_counts_padded_pixels(tiny_codec, rng):
    data = tiny_codec.compress([random_image(rng, 70, 90)])[0]  # padded to 128x128 = 16384 pixels
    with pytest.raises(ImageTooLargeError, match="over the decode limit of 16383"):
        tiny_codec.decompress([data], steps=1, max_pixels=16383)
    assert tiny_codec.decompress([data], steps=1, max_pixels=16384)[0].shape == (70, 90, 3)
    assert tiny_codec.decompress([data], steps=1, max_pixels=None)[0].shape == (70, 90, 3)
    for bad in (0, -1, 2.5, True, "16384"):
        with pytest.raises(ValueError, match="max_pixels"):
            tiny_codec.decompress([data], max_pixels=bad)


def test_default_limit_refuses_before_decoding(tiny_codec, rng, monkeypatch):
    def decode_steps(*args, **kwargs):
        raise AssertionError("a stream over the default limit reached the decoder")

    monkeypatch.setattr(type(tiny_codec.model.compression), "decode_steps", decode_steps)
    huge = forged_size(tiny_codec.compress([random_image(rng, 64, 64)])[0], 5000, 5000)
    with pytest.raises(ImageTooLargeError, match="over the decode limit of 16777216"):
        tiny_codec.decompress([huge])
    assert isinstance(tiny_codec.decompress_results([huge])[0], ImageTooLargeError)


def test_indices_past_the_codebook_are_refused(rng):
    """A codebook of 200 codes takes 8-bit indices: a stream can name codes 200..255, which do not exist."""
    from dataclasses import replace

    from rdeic import bitstream as bs
    from rdeic.config import load_preset
    from rdeic.errors import PayloadError
    from rdeic.weights import ModelId, init_model

    config = load_preset("tiny")
    config = replace(config, compression=replace(config.compression, codebook_size=200))
    codec = Codec(init_model(config), ModelId("UNTRAINED-codebook-200", bytes(8)))
    stream = bs.read(codec.compress([random_image(rng, 64, 64)])[0])
    bad = bs.write(stream.header, bs.pack_indices(np.full(stream.header.z_shape, 255), 8), stream.y)
    with pytest.raises(PayloadError, match="index 255, .* 200 codes"):
        codec.decompress([bad])


@pytest.mark.parametrize("y", [bytes(8), b"\x5a" * 12])
def test_the_entropy_decoder_never_reads_past_the_bytes_it_is_given(tiny_codec, rng, monkeypatch, y):
    """compressai's rANS decoder does not check bounds: on a short or garbage y section it reads on past the end of
    its buffer. What the codec hands it must hold every byte it can read, so trailing bytes never matter."""
    from dataclasses import replace

    from rdeic import bitstream as bs
    from rdeic import coders

    compression = tiny_codec.model.compression
    steps, given, handed = type(compression).decode_steps, [], []
    monkeypatch.setattr(type(compression), "decode_steps", lambda self, codes: given.extend(codes) or steps(self, codes))
    opener = coders._open_decoder
    monkeypatch.setattr(coders, "_open_decoder", lambda cls, s: handed.append(s) or opener(cls, s))
    stream = bs.read(forged_size(tiny_codec.compress([random_image(rng, 64, 64)])[0], 256, 256))  # 12288 y symbols
    tiny_codec.decompress_results([bs.write(stream.header, stream.hyper, y)], steps=1)
    (code,), (ys,) = given, handed
    full = ys.data + bytes(ys.margin)  # what the decoder was handed
    assert ys.data == y and ys.margin >= 4 * 12288
    exact = replace(code, y_string=full)
    longer = replace(code, y_string=full + rng.bytes(4096) + b"\xff" * 4096)
    with tiny_codec._numerics():
        assert np.array_equal(compression.decompress([exact]).symbols[0], compression.decompress([longer]).symbols[0])


@pytest.mark.parametrize("y, message", [(b"", "has 0 bytes"), (bytes(4), "has 4 bytes"), (bytes(13), "has 13 bytes"),
                                        (bytes(8) + b"\xff" * 16 + bytes(8), "run of 16 bytes 0xFF")])
def test_y_sections_no_encoder_writes_are_refused(tiny_codec, rng, y, message):
    from rdeic import bitstream as bs
    from rdeic.errors import PayloadError

    stream = bs.read(tiny_codec.compress([random_image(rng, 64, 64)])[0])
    with pytest.raises(PayloadError, match=message):
        tiny_codec.decompress([bs.write(stream.header, stream.hyper, y)])


_FF_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np
    from rdeic import bitstream as bs
    from rdeic.codec import Codec
    codec = Codec.load(sys.argv[1])
    stream = bs.read(codec.compress([np.zeros((64, 64, 3), np.uint8)])[0])
    print(type(codec.decompress_results([bs.write(stream.header, stream.hyper, b"\\xff" * (8 << 20))], steps=1)[0]).__name__)
    """
)


def test_a_run_of_ff_bytes_cannot_crash_the_decoder(tiny_model_dir):
    """In compressai's escape code each 0xF nibble adds 15 raw nibbles to read: an 8 MB y section of 0xFF bytes made
    the decoder read gigabytes past its buffer (SIGSEGV). A child process, so that a crash fails the test only."""
    proc = subprocess.run([sys.executable, "-c", _FF_SCRIPT, str(tiny_model_dir)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["PayloadError"]


_SCRIPT = textwrap.dedent(
    """
    import sys, torch, numpy as np
    torch.set_num_threads(int(sys.argv[1]))
    from rdeic.codec import Codec
    codec = Codec.load(sys.argv[2])
    mode, path = sys.argv[3], sys.argv[4]
    if mode == "encode":
        rng = np.random.default_rng(5)
        yy, xx = np.mgrid[0:150, 0:200]
        img = np.stack([(xx * 1.3) % 256, (yy * 1.7) % 256, (xx + yy) % 256], -1) + rng.normal(0, 9, (150, 200, 3))
        img = np.clip(img, 0, 255).astype(np.uint8)
        data = codec.compress([img])[0]
        open(path, "wb").write(data)
        np.save(path + f".dec{sys.argv[1]}.npy", codec.decompress([data], steps=5, detail=0.7)[0])
    else:
        data = open(path, "rb").read()
        np.save(path + f".dec{sys.argv[1]}.npy", codec.decompress([data], steps=5, detail=0.7)[0])
    """
)


@pytest.mark.slow
def test_decoding_identical_across_processes_and_thread_counts(tiny_model_dir, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    stream = tmp_path / "img.rdeic"
    run = lambda threads, mode: subprocess.run(  # noqa: E731
        [sys.executable, "-c", _SCRIPT, str(threads), str(tiny_model_dir), mode, str(stream)],
        check=True, env=env, capture_output=True, timeout=300)
    run(1, "encode")
    run(2, "decode")
    one = np.load(f"{stream}.dec1.npy")
    two = np.load(f"{stream}.dec2.npy")
    assert one.shape == (150, 200, 3)
    assert np.array_equal(one, two)


def _recrc(data: bytes) -> bytes:
    import struct
    import zlib

    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


def test_verify_entropy_decodes_without_diffusion(tiny_codec, rng, monkeypatch):
    """What the audit's integrity scan runs on every row: parse, model, payload and the symbol CRC."""
    from rdeic.errors import BadMagicError, ChecksumError, EntropyDesyncError

    good = tiny_codec.compress([random_image(rng, 64, 96)])[0]
    stream = tiny_codec.parse(good)
    y_at = len(good) - 4 - len(stream.y)
    forged = bytearray(good)
    forged[y_at + len(stream.y) // 2] ^= 0x5A  # the container CRC fixed below: only the symbol CRC can tell
    forged = _recrc(bytes(forged))
    monkeypatch.setattr(tiny_codec.model, "relay_decode", lambda *a, **k: pytest.fail("verify must not diffuse"))
    other = tiny_codec.compress([random_image(rng, 130, 65)])[0]  # another latent shape in the same call
    results = tiny_codec.verify([good, b"JUNK" + good[4:], good[:-1] + bytes([good[-1] ^ 1]), forged, other])
    assert results[0] is None and results[4] is None
    assert isinstance(results[1], BadMagicError)
    assert isinstance(results[2], ChecksumError)
    assert isinstance(results[3], EntropyDesyncError)


def test_the_codec_imports_no_more_of_compressai_than_it_uses_and_compressai_stays_whole():
    """`import compressai` pulls in torch_geometric through its point-cloud datasets (2.5 s of start-up
    here); the codec needs its coder and Gaussian conditional only (rdeic/entropy.py)."""
    code = textwrap.dedent("""
        import sys
        import rdeic.codec
        print("torch_geometric" in sys.modules, "compressai.datasets" in sys.modules)
        import compressai
        print(compressai.get_entropy_coder(), compressai.zoo.__name__, compressai.available_entropy_coders()[0])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "ans", "compressai.zoo", "ans"]


def test_the_runtime_dtype_does_not_change_the_bitstream(rng):
    """bfloat16 runs the decoder side (UNet, control, VAE decoder) in bfloat16; the encoder side (VAE
    encoder, compression module) stays float32, so the same image gives the same bytes in either."""
    import torch

    from rdeic.cli import default_model

    images = [random_image(rng, 64, 64) for _ in range(3)] + [random_image(rng, 96, 128)]
    fp32 = Codec.load(default_model())
    bf16 = Codec.load(default_model(), dtype=torch.bfloat16)
    assert bf16.model.unet.conv_in.weight.dtype == torch.bfloat16
    assert bf16.compress(images) == fp32.compress(images)
    assert all(d.shape == im.shape for d, im in zip(bf16.decompress(fp32.compress(images[:1]), steps=1), images))
