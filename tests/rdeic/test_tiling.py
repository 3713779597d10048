"""Tiled encode and decode (rdeic/tiling.py): the plan, the blending, and the codec forced through it on
small images by lowering the tiling threshold."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from rdeic import bitstream as bs
from rdeic.codec import Codec
from rdeic.config import ModelConfig, TilingConfig, load_preset, to_dict
from rdeic.errors import ConfigError, HeaderError
from rdeic.metrics import mse, psnr_from_mse
from rdeic.modeldir import decoding_config
from rdeic.tiling import TilePlan, blend
from tests.large_image import held_out_photo

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "rdeic" / "models" / "rdeic-tiny-demo"
# 512x384 -> a latent of 64x48 -> 5x4 UNet tiles of 16, 3x2 VAE tiles of 32
FORCED = TilingConfig(min_pixels=4096, tile=16, overlap=4)


def _coffee() -> np.ndarray:
    """A held-out photo (the demo model never trained on it), 512x384."""
    return np.asarray(held_out_photo())[:384, :512].copy()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return psnr_from_mse(mse(a, b))


def _border_mask(height: int, width: int, plan: TilePlan, band: int = 2) -> np.ndarray:
    """Image pixels within ``band`` of a tile's edge inside the image."""
    mask = np.zeros((height, width), bool)
    for axis, n in ((0, height // 8), (1, width // 8)):
        lines = {edge * 8 for s in plan.starts(n) for edge in (s, min(s + plan.tile, n))} - {0, n * 8}
        for line in lines:
            index = [slice(None), slice(None)]
            index[axis] = slice(max(0, line - band), line + band)
            mask[tuple(index)] = True
    return mask


@pytest.fixture(scope="module")
def demo():
    return Codec.load(DEMO)


@pytest.fixture(scope="module")
def demo_tiled():
    return Codec.load(DEMO, tiling=FORCED)


# ------------------------------------------------------------------ the plan
@pytest.mark.parametrize("tile,overlap", [(8, 1), (32, 8), (64, 16), (64, 32), (96, 24)])
def test_plan_covers_every_length_with_equal_tiles_and_the_overlap(tile, overlap):
    plan = TilePlan(tile, overlap)
    for length in range(1, 700):
        starts = plan.starts(length)
        assert starts == plan.starts(length) == TilePlan(tile, overlap).starts(length)  # a pure function
        size = min(tile, length)
        assert starts[0] == 0 and starts[-1] + size == length
        assert starts == sorted(set(starts))
        for a, b in zip(starts, starts[1:]):
            assert b - a <= tile - overlap  # neighbours share at least the overlap
        assert len(starts) == (1 if length <= tile else -(-(length - tile) // (tile - overlap)) + 1)


def test_plan_windows_are_one_shape_row_by_row():
    plan = TilePlan(32, 8)
    windows = plan.windows(48, 64)
    assert [(w[0].start, w[1].start) for w in windows] == [(0, 0), (0, 24), (0, 32), (16, 0), (16, 24), (16, 32)]
    assert {(w[0].stop - w[0].start, w[1].stop - w[1].start) for w in windows} == {(32, 32)}
    assert plan.count(48, 64) == 6 and plan.windows(20, 30) == [(slice(0, 20), slice(0, 30))]
    # the VAE's tiles (part of the format: a tiled stream decodes with them)
    assert plan.vae() == TilePlan(64, 16) and TilePlan(512, 200).vae() == TilePlan(512, 256)


@pytest.mark.parametrize("tile,overlap", [(0, 1), (12, 2), (520, 8), (32, 0), (32, 17), (True, 1)])
def test_a_bad_plan_is_refused_with_one_line(tile, overlap):
    with pytest.raises(ValueError, match="tile"):
        TilePlan(tile, overlap)
    with pytest.raises(ConfigError, match="^tiling: tile"):
        TilingConfig(tile=tile, overlap=overlap)


# -------------------------------------------------------------- the blending
def test_blending_a_pointwise_function_gives_the_whole_image_result():
    """Where every tile's output agrees (a per-pixel function), blending must reproduce it exactly:
    the weights sum to one everywhere, also where three or four tiles meet."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 56, 72, generator=g, dtype=torch.float64)
    hint = torch.randn(2, 5, 56, 72, generator=g, dtype=torch.float64)
    plan = TilePlan(24, 8)
    calls = []

    def fn(tiles):
        calls.append(tiles[0].shape[0])
        return torch.tanh(tiles[0]) * 2 + tiles[1][:, :3]

    out = blend(fn, [x, hint], plan, 3, batch=5, out_dtype=torch.float64)
    torch.testing.assert_close(out, torch.tanh(x) * 2 + hint[:, :3], rtol=0, atol=1e-12)
    assert calls == [5, 5, 5, 5, 4]  # 2 images x 3x4 tiles, in batches of at most 5, mixing images
    up = blend(lambda t: t[0].repeat_interleave(8, -1).repeat_interleave(8, -2), [x], plan, 3, out_scale=8,
               out_dtype=torch.float64)
    torch.testing.assert_close(up, x.repeat_interleave(8, -1).repeat_interleave(8, -2), rtol=0, atol=1e-12)
    down = blend(lambda t: t[0][..., ::8, ::8], [up], plan, 3, in_scale=8, out_dtype=torch.float64)
    torch.testing.assert_close(down, x, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ the codec
def test_a_small_image_is_not_tiled_and_writes_the_same_bytes(demo, rng):
    image = rng.integers(0, 256, (96, 130, 3), dtype=np.uint8)
    stream = demo.compress([image])[0]
    assert bs.read(stream).header.tiles is None
    assert Codec.load(DEMO, tiling=TilingConfig(min_pixels=4096, tile=64, overlap=16)).compress([image])[0] == stream
    assert demo.tile_plan(384, 512) is None  # the demo config tiles only above its threshold


def test_the_tiled_stream_carries_its_plan_and_any_codec_decodes_it_the_same(demo, demo_tiled):
    image = _coffee()
    stream = demo_tiled.compress([image])[0]
    assert bs.read(stream).header.tiles == (16, 4)
    pixels = demo_tiled.decompress([stream])[0]
    assert pixels.shape == image.shape
    # the decoder follows the stream, not its own tiling setting
    np.testing.assert_array_equal(demo.decompress([stream])[0], pixels)
    other = Codec.load(DEMO, tiling=TilingConfig(min_pixels=1 << 40, tile=64, overlap=24))
    np.testing.assert_array_equal(other.decompress([stream])[0], pixels)
    assert _psnr(pixels, image) > _psnr(demo.decompress(demo.compress([image]))[0], image) - 0.5


def test_tiled_decode_matches_the_whole_image_decode_without_seams(demo):
    """The same symbols decoded whole and over tiles (UNet 5x4 of 16, VAE 3x2 of 32; far smaller than the
    configs' 64): the two images agree to 28 dB, and next to the tile borders they differ no more than
    inside the tiles (no seams)."""
    image = _coffee()
    stream = demo.compress([image])[0]
    parsed = bs.read(stream)
    tiled_stream = bs.write(replace(parsed.header, tiles=(16, 4)), parsed.hyper, parsed.y)
    whole, tiled = demo.decompress([stream, tiled_stream])
    assert _psnr(tiled, whole) > 28.0
    assert _psnr(tiled, image) > _psnr(whole, image) - 0.5
    error = np.abs(tiled.astype(np.float64) - whole.astype(np.float64)).mean(-1)
    border = _border_mask(384, 512, TilePlan(16, 4)) | _border_mask(384, 512, TilePlan(16, 4).vae())
    assert border.mean() > 0.1  # the edges of both plans' tiles cross the image
    assert error[border].mean() < 1.25 * error[~border].mean()


def test_tiles_of_several_images_decode_as_each_alone(demo_tiled, rng):
    image = _coffee()
    other = np.ascontiguousarray(image[::-1, ::-1])
    streams = demo_tiled.compress([image, other])
    together = demo_tiled.decompress(streams)
    for stream, pixels in zip(streams, together):
        np.testing.assert_array_equal(demo_tiled.decompress([stream])[0], pixels)


# ---------------------------------------------------------------- the format
def _header(**change) -> bs.Header:
    base = bs.Header("", b"\x01\x02", 1000, 700, 1024, 704, (44, 64), (11, 16), 8, 5, 9, version=2)
    return replace(base, **change)


def test_the_tile_plan_round_trips_through_the_bitstream():
    hyper = bytes(11 * 16)
    for tiles in [None, (64, 16), (8, 1), (512, 256)]:
        data = bs.write(_header(tiles=tiles), hyper, b"\x00" * 8)
        assert bs.read(data).header.tiles == tiles
    assert len(bs.write(_header(tiles=(64, 16)), hyper, bytes(8))) == len(bs.write(_header(), hyper, bytes(8))) + 2


def _with_tiles(raw: bytes) -> bytes:
    """A v2 stream of _header() with flag bit 6 set and ``raw`` as its tile fields, CRC fixed."""
    base = bs.write(_header(), bytes(11 * 16), bytes(8))
    body = bytearray(base[:-4])
    body[3] |= 0x40
    at = 2 + 2 + 2 + 2 + 2  # magic, version+flags, hash, width (2 varint bytes), height (2 bytes)
    body[at:at] = raw
    import struct
    import zlib

    return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))


@pytest.mark.parametrize("raw,message", [
    (bytes([0, 4]), "tile must be"),
    (bytes([65, 4]), "tile must be"),
    (bytes([8, 0]), "overlap"),
    (bytes([8, 33]), "overlap"),
    (bytes([0xFF, 0xFF, 0xFF, 0x7F, 1]), "over its limit"),
])
def test_a_forged_tile_plan_is_refused_before_decoding(raw, message):
    assert bs.read(_with_tiles(bytes([8, 16]))).header.tiles == (64, 16)
    with pytest.raises(HeaderError, match=message):
        bs.read(_with_tiles(raw))


def test_version_1_cannot_carry_a_plan(demo_tiled):
    with pytest.raises(ValueError, match="version 1 stream cannot carry a tile plan"):
        bs.write(_header(tiles=(64, 16), version=1, model_hash=bytes(8)), bytes(11 * 16), bytes(8))
    stream = demo_tiled.compress([_coffee()])[0]
    with pytest.raises(ValueError, match="tile plan"):
        demo_tiled.rewrap(stream, version=1)


# ---------------------------------------------------------------- the config
def test_tiling_is_not_part_of_the_model_id():
    config = load_preset("tiny")
    other = replace(config, tiling=TilingConfig(min_pixels=4096, tile=16, overlap=4))
    assert decoding_config(other) == decoding_config(config)
    assert "tiling" in to_dict(other)


def test_presets_set_their_thresholds_and_a_config_file_may_too():
    assert load_preset("sd21").tiling == TilingConfig(min_pixels=2048 * 2048, tile=64, overlap=16)
    assert load_preset("tiny").tiling.min_pixels < load_preset("sd21").tiling.min_pixels
    data = to_dict(load_preset("tiny"))
    data["tiling"] = {"min_pixels": 65536, "tile": 16, "overlap": 4}
    assert ModelConfig.from_json(__import__("json").dumps(data)).tiling.tile == 16
    data["tiling"]["overlap"] = 9
    with pytest.raises(ConfigError, match="tiling: tile overlap"):
        ModelConfig.from_json(__import__("json").dumps(data))


def test_supported_pixels_grows_with_the_memory_and_stops_at_the_cap():
    from rdeic.tiling import supported_pixels

    sd21, tiny = load_preset("sd21"), load_preset("tiny")
    weights = 2_600_000_000  # sd21's UNet, VAE and control in float16, roughly
    by_memory = [supported_pixels(sd21, gib << 30, weights, 1 << 40) for gib in (8, 24, 80, 141)]
    assert by_memory == sorted(by_memory) and by_memory[1] > 6016 * 4032  # a 24 MP photo fits on a 24 GiB card
    assert supported_pixels(sd21, 80 << 30, weights, bs.DEFAULT_MAX_PIXELS) == bs.DEFAULT_MAX_PIXELS
    assert supported_pixels(sd21, 2 << 30, weights, bs.DEFAULT_MAX_PIXELS) == 0  # the weights alone do not fit
    # per pixel the tiny preset keeps 4 x (7 + 64/64 + 2 x 48/64) + 0.35 x 48 = 54.8 bytes of whole-image tensors
    a, b = (supported_pixels(tiny, gib << 30, 0, 1 << 40) for gib in (4, 8))
    assert (b - a) == pytest.approx(0.8 * (4 << 30) / 54.8, rel=1e-4)
