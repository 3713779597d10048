"""Red-team fuzzing of the bitstream container and of the decoder behind it.

A stranger's stream may only be refused with a BitstreamError (any subclass; the same one from
``bitstream.read`` and from ``Codec.decompress_results``: there is one parser) or decode to an image
of exactly the size its header gives. ``MAX_PIXELS`` is small, so no forged size can make the decoder
allocate much. (a) sets header fields, the section table and the payload to boundary and random
values, the CRC recomputed; (b) flips, overwrites, cuts and inserts bytes of real streams, with and
without the CRC recomputed; (c) checks on hostile y sections that compressai's unchecked rANS
decoder reads nothing past the bytes the codec hands it.

Case counts scale with ``RDEIC_FUZZ_SCALE`` (default 1: 1806 cases, a few seconds in all); a long
run, about 10⁵ cases in 3-4 minutes on two cores, which also logs the outcome counts, is
``RDEIC_FUZZ_SCALE=56 python -m pytest -q tests/rdeic/test_bitstream_fuzz.py -o log_cli=true --log-cli-level=INFO``.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from rdeic import bitstream as bs
from rdeic.errors import BitstreamError, EntropyDesyncError, ImageTooLargeError, ModelMismatchError, PayloadError
from tests.helpers import random_image

log = logging.getLogger(__name__)

SCALE = float(os.environ.get("RDEIC_FUZZ_SCALE", "1"))
HEADER_CASES = round(1500 * SCALE)
BYTE_CASES = round(300 * SCALE)
ENTROPY_CASES = round(6 * SCALE)
MAX_PIXELS = 512 * 512
CHUNK = 500  # streams per decompress_results call

DIMS = ("width", "height", "pad_width", "pad_height", "y_h", "y_w", "z_h", "z_w")
U8_VALUES = (0, 1, 2, 7, 8, 9, 14, 31, 32, 33, 64, 127, 128, 254, 255)
U32_VALUES = (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
SIDES = (1, 2, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 513, 4096, 100_000, bs.MAX_SIDE, bs.MAX_SIDE + 1)


@pytest.fixture(scope="module")
def seeds_v2(tiny_codec) -> list[bytes]:
    """Version 2 streams, one of them with an explicit decode seed (the flag and the optional field)."""
    rng = np.random.default_rng(7)
    images = [random_image(rng, h, w) for h, w in [(1, 1), (64, 64), (70, 90)]]
    return tiny_codec.compress(images[:2]) + tiny_codec.compress(images[2:], seeds=[12345])


@pytest.fixture(scope="module")
def seeds(tiny_codec, seeds_v2) -> list[bytes]:
    """Version 1 streams (the field-level fuzzing below speaks its layout): the same images, rewrapped."""
    return [tiny_codec.rewrap(data, 1) for data in seeds_v2]


# --- (a) fields ---------------------------------------------------------------------------------


def _fields(data: bytes) -> dict:
    """A stream as the values of its fields; ``None`` lengths and counts follow the content."""
    s = bs.read(data)
    h = s.header
    return dict(magic=bs.MAGIC, version=h.version, name_len=None, name=h.model_name.encode(), hash=h.model_hash,
                width=h.width, height=h.height, pad_width=h.pad_width, pad_height=h.pad_height,
                y_h=h.y_shape[0], y_w=h.y_shape[1], z_h=h.z_shape[0], z_w=h.z_shape[1],
                index_bits=h.index_bits, seed=h.seed, symbols_crc=h.symbols_crc,
                count=None, table=[[bs.SECTION_HYPER, None], [bs.SECTION_Y, None]], payload={1: s.hyper, 2: s.y})


def _varint(value: int | bytes) -> bytes:
    return value if isinstance(value, bytes) else bs._varint(value)


def _encode(f: dict) -> bytes:
    """The stream of ``f``, sections in table order, with a valid CRC32."""
    table = [(tag, len(f["payload"].get(tag, b"")) if n is None else n) for tag, n in f["table"]]
    body = b"".join([
        f["magic"], bytes([f["version"], len(f["name"]) if f["name_len"] is None else f["name_len"]]), f["name"], f["hash"],
        *(_varint(f[k]) for k in DIMS), bytes([f["index_bits"]]), struct.pack("<II", f["seed"], f["symbols_crc"]),
        bytes([len(table) if f["count"] is None else f["count"]]), *(bytes([t]) + _varint(n) for t, n in table),
        *(f["payload"].get(tag, b"") for tag, _ in table),
    ])
    return body + struct.pack("<I", zlib.crc32(body))


def _any_varint(rng: np.random.Generator) -> int | bytes:
    """0, 1, 2**k and its neighbours, random values, or raw bytes: overlong, endless, over 63 bits."""
    k = int(rng.integers(0, 66))
    kind = rng.integers(6)
    if kind == 0:
        return int(rng.choice([0, 1, 2]))
    if kind <= 2:
        return (1 << k) + int(rng.integers(-1, 2)) if k else 1
    if kind == 3:
        return int(rng.integers(0, 1 << min(k, 62), dtype=np.int64)) if k else 0
    if kind == 4:
        return bs._varint(int(rng.integers(0, 1 << 20)))[:-1] + bytes([0x80, 0])  # not minimal
    return bytes([0xFF]) * int(rng.integers(1, 12)) + bytes([int(rng.integers(0, 128))])


def _resize(rng: np.random.Generator, f: dict) -> None:
    """A consistent forged size, the hyper section as long as it must be: only the size limit can refuse it."""
    _set_size(rng, f, *(int(rng.choice(SIDES)) if rng.random() < 0.5 else int(rng.integers(1, 600)) for _ in range(2)))


def _set_size(rng: np.random.Generator, f: dict, w: int, h: int) -> None:
    f.update(width=w, height=h, pad_width=bs.padded(w), pad_height=bs.padded(h))
    f.update(y_h=f["pad_height"] // 16, y_w=f["pad_width"] // 16, z_h=f["pad_height"] // 64, z_w=f["pad_width"] // 64)
    count = f["z_h"] * f["z_w"]
    if count * f["index_bits"] <= 8 * 2**20:
        f["payload"][1] = rng.bytes(-(-count * f["index_bits"] // 8))


def _mutate_table(rng: np.random.Generator, f: dict) -> None:
    table = f["table"]
    kind = rng.integers(6) if table else 2
    if kind == 0:
        table.reverse()
    elif kind == 1:
        table.insert(int(rng.integers(len(table) + 1)), list(table[int(rng.integers(len(table)))]))
    elif kind == 2:
        tag = int(rng.choice([0, 3, 255]))
        f["payload"][tag] = rng.bytes(int(rng.integers(0, 8)))
        table.insert(int(rng.integers(len(table) + 1)), [tag, None])
    elif kind == 3:
        del table[int(rng.integers(len(table)))]
    elif kind == 4:
        entry = table[int(rng.integers(len(table)))]
        entry[1] = max(0, len(f["payload"].get(entry[0], b"")) + int(rng.integers(-9, 10)))
    else:
        table[int(rng.integers(len(table)))][1] = _any_varint(rng)


def _hostile_y(rng: np.random.Generator) -> bytes:
    """Short, long, random, zero or nearly all 0xFF y sections (0xFF drives the coder's escape code)."""
    n = int(rng.choice([8, 12, 16, 100, 1000, 4096]))
    unit = [rng.bytes(4), bytes(4), b"\xff\xff\xff\x7f", b"\xff" * 15 + b"\x00", b"\xff" * 4][int(rng.integers(5))]
    return (unit * n)[:n]


def _mutate_payload(rng: np.random.Generator, f: dict) -> None:
    tag = int(rng.choice([bs.SECTION_HYPER, bs.SECTION_Y]))
    old = f["payload"][tag]
    kind = rng.integers(4)
    if kind == 0:
        f["payload"][tag] = rng.bytes(int(rng.choice([0, 1, 3, 4, 7, 8, 9, len(old), 2 * len(old) + 1])))
    elif kind == 1:
        f["payload"][tag] = _hostile_y(rng)
    elif kind == 2:
        f["payload"][tag] = old[: int(rng.integers(len(old) + 1))]
    else:
        f["payload"][tag] = old + rng.bytes(int(rng.integers(1, 9)))


def _mutate_scalar(rng: np.random.Generator, f: dict) -> None:
    key = str(rng.choice(["version", "name_len", "index_bits", "count", "name", "hash", "magic"]))
    if key == "name":
        f["name"] = rng.bytes(int(rng.integers(0, 20)))
    elif key == "hash":
        f["hash"] = rng.bytes(8)
    elif key == "magic":
        f["magic"] = rng.bytes(4)
    elif key == "name_len" and rng.random() < 0.5:
        f["name_len"] = min(255, len(f["name"]) + int(rng.integers(1, 256)))  # past the end of the name, often of the data
    else:
        f[key] = int(rng.choice(U8_VALUES)) if rng.random() < 0.8 else int(rng.integers(256))


# Weighted so that about one case in seventy reaches the entropy decoder (0.1 s a stream).
MUTATIONS = [
    (lambda rng, f: f.__setitem__(str(rng.choice(DIMS)), _any_varint(rng)), 30),
    (_mutate_scalar, 25),
    (_mutate_table, 25),
    (_resize, 1.5),
    (_mutate_payload, 1),
    (lambda rng, f: f.__setitem__(str(rng.choice(["seed", "symbols_crc"])),
                                  int(rng.choice(U32_VALUES)) if rng.random() < 0.5 else int(rng.integers(2**32))), 0.5),
]


def _mutate_fields(rng: np.random.Generator, data: bytes) -> bytes:
    f = _fields(data)
    weights = np.array([w for _, w in MUTATIONS], dtype=float)
    for k in rng.choice(len(MUTATIONS), size=int(rng.choice([1, 1, 2, 3])), p=weights / weights.sum()):
        MUTATIONS[k][0](rng, f)
    return _encode(f)


# --- (b) bytes ----------------------------------------------------------------------------------


def _mutate_bytes(rng: np.random.Generator, data: bytes) -> bytes:
    """Bit flips, a run overwritten, a cut, a deletion or an insertion; then, half the time, a fresh CRC32."""
    out = bytearray(data)
    pos = int(rng.integers(len(out)))
    kind = rng.integers(5)
    if kind == 0:
        for p in rng.integers(len(out), size=int(rng.integers(1, 4))):
            out[p] ^= 1 << int(rng.integers(8))
    elif kind == 1:
        n = int(rng.integers(1, 9))
        out[pos:pos + n] = [rng.bytes(n), bytes(n), b"\xff" * n][int(rng.integers(3))]
    elif kind == 2:
        del out[pos:]
    elif kind == 3:
        del out[pos:pos + int(rng.integers(1, 9))]
    else:
        out[pos:pos] = rng.bytes(int(rng.integers(1, 9)))
    if rng.random() < 0.5 and len(out) >= 4:
        out[-4:] = struct.pack("<I", zlib.crc32(out[:-4]))
    return bytes(out)


# --- the oracle ---------------------------------------------------------------------------------


def _read(data: bytes) -> bs.Bitstream | BitstreamError:
    try:
        stream = bs.read(data)
    except BitstreamError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - the finding itself
        pytest.fail(f"bitstream.read raised {exc!r} on {data.hex()}")
    assert bs.write(stream.header, stream.hyper, stream.y) == data, f"accepted a non-canonical stream {data.hex()}"
    return stream


def _decode(codec, streams: list[bytes]) -> list:
    try:
        return codec.decompress_results(streams, steps=1, max_pixels=MAX_PIXELS)
    except Exception:  # noqa: BLE001 - find the stream that did it
        for data in streams:
            try:
                codec.decompress_results([data], steps=1, max_pixels=MAX_PIXELS)
            except Exception as exc:  # noqa: BLE001
                pytest.fail(f"decompress_results raised {exc!r} on {data.hex()}")
        raise


def _check(data: bytes, parsed, result) -> str:
    """The outcome's name, once it is known to be allowed."""
    where = f"on {data.hex()}"
    if isinstance(parsed, BitstreamError):
        assert type(result) is type(parsed), f"read: {parsed!r}, decode: {result!r} {where}"
    elif isinstance(result, np.ndarray):
        h = parsed.header
        assert result.shape == (h.height, h.width, 3) and result.dtype == np.uint8, f"{result.shape} {where}"
    else:
        assert isinstance(result, BitstreamError), f"{result!r} {where}"
        too_large = parsed.header.padded_pixels > MAX_PIXELS
        allowed = (ModelMismatchError, ImageTooLargeError, PayloadError, EntropyDesyncError)
        assert isinstance(result, allowed), f"{result!r} {where}"
        assert isinstance(result, ImageTooLargeError) == too_large or isinstance(result, ModelMismatchError), where
    return "image" if isinstance(result, np.ndarray) else type(result).__name__


def _fuzz(codec, cases: list[bytes], what: str) -> Counter:
    """Outcome counts over all cases; each distinct stream is decoded once (decoding is deterministic)."""
    times = Counter(cases)
    distinct = list(times)
    outcomes: Counter = Counter()
    for start in range(0, len(distinct), CHUNK):
        chunk = distinct[start:start + CHUNK]
        parsed = [_read(data) for data in chunk]
        for data, p, result in zip(chunk, parsed, _decode(codec, chunk)):
            outcomes[_check(data, p, result)] += times[data]
    log.info("%d %s (%d distinct): %s", len(cases), what, len(distinct), dict(outcomes.most_common()))
    return outcomes


def test_header_fields(tiny_codec, seeds):
    rng = np.random.default_rng(2024)
    cases = [_mutate_fields(rng, seeds[i % len(seeds)]) for i in range(HEADER_CASES)]
    outcomes = _fuzz(tiny_codec, cases, "header mutations")
    assert outcomes["image"] + outcomes["EntropyDesyncError"] > 0  # some cases did reach the decoder


@pytest.mark.parametrize("version, seed", [(1, 2025), (2, 2028)])
def test_bytes(tiny_codec, request, version, seed):
    streams = request.getfixturevalue("seeds" if version == 1 else "seeds_v2")
    rng = np.random.default_rng(seed)
    cases = [_mutate_bytes(rng, streams[i % len(streams)]) for i in range(BYTE_CASES)]
    outcomes = _fuzz(tiny_codec, cases, f"v{version} byte mutations")
    assert outcomes["ChecksumError"] > 0


def test_entropy_decoding_stays_in_bounds(tiny_codec, seeds):
    """Whatever a y section holds, the rANS decoder reads only bytes the codec handed it (see Codec._latent_code)."""
    rng = np.random.default_rng(2026)
    compression = tiny_codec.model.compression
    outcomes: Counter = Counter()
    for _ in range(ENTROPY_CASES):
        f = _fields(seeds[1])
        _set_size(rng, f, int(rng.integers(1, 257)), int(rng.integers(1, 257)))
        f["payload"][bs.SECTION_Y] = _hostile_y(rng)
        try:
            code = tiny_codec._latent_code(tiny_codec._accept(_encode(f), MAX_PIXELS))
        except PayloadError:
            outcomes["PayloadError"] += 1
            continue
        longer = replace(code, y_string=code.y_string + rng.bytes(4096) + b"\xff" * 4096)
        with tiny_codec._numerics():
            assert np.array_equal(compression.decompress([code]).symbols[0], compression.decompress([longer]).symbols[0])
        outcomes["in bounds"] += 1
    log.info("%d hostile y sections: %s", ENTROPY_CASES, dict(outcomes))


# --- version 2 ----------------------------------------------------------------------------------


def _v2_fields(data: bytes) -> dict:
    s = bs.read(data)
    h = s.header
    return dict(magic=bs.MAGIC_V2, version=2, flags=(h.index_bits - 1) | (0x20 if h.seed != h.symbols_crc else 0),
                hash=h.model_hash, width=h.width, height=h.height, symbols_crc=h.symbols_crc, seed=h.seed,
                hyper=s.hyper, y=s.y)


def _v2_encode(f: dict) -> bytes:
    body = (f["magic"] + bytes([f["version"], f["flags"]]) + f["hash"] + _varint(f["width"]) + _varint(f["height"])
            + struct.pack("<I", f["symbols_crc"]) + (struct.pack("<I", f["seed"]) if f["flags"] & 0x20 else b"")
            + f["hyper"] + f["y"])
    return body + struct.pack("<I", zlib.crc32(body))


def _v2_mutate(rng: np.random.Generator, data: bytes) -> bytes:
    """One or two v2 fields set to a boundary or random value (sizes with a consistent hyper section
    half the time), the CRC recomputed."""
    f = _v2_fields(data)
    for _ in range(int(rng.integers(1, 3))):
        field = str(rng.choice(["version", "flags", "hash", "size", "symbols_crc", "seed", "hyper", "y", "magic"]))
        if field in ("version", "flags"):
            f[field] = int(rng.choice(U8_VALUES))
        elif field == "hash":
            f["hash"] = [rng.bytes(2), bytes(2), f["hash"], rng.bytes(int(rng.integers(0, 4)))][int(rng.integers(4))]
        elif field == "size":
            f["width"], f["height"] = (_any_varint(rng) if rng.random() < 0.3 else int(rng.choice(SIDES)) for _ in range(2))
            # (raw varint bytes pass through _varint as they are: overlong, non-minimal, cut)
            if rng.random() < 0.5 and all(isinstance(v, int) and 1 <= v <= bs.MAX_SIDE for v in (f["width"], f["height"])):
                z = (bs.padded(f["height"]) // 64) * (bs.padded(f["width"]) // 64)
                f["hyper"] = bytes(min(-(-z * ((f["flags"] & 0x1F) + 1) // 8), 1 << 16))
        elif field in ("symbols_crc", "seed"):
            f[field] = int(rng.choice(U32_VALUES))
        elif field == "hyper":
            f["hyper"] = f["hyper"][: max(len(f["hyper"]) + int(rng.integers(-2, 3)), 0)] + rng.bytes(2)
        elif field == "y":
            f["y"] = _hostile_y(rng)
        else:
            f["magic"] = [b"RD", b"RE", b"rd", b""][int(rng.integers(4))]
    return _v2_encode(f)


def test_v2_header_fields(tiny_codec, seeds_v2):
    rng = np.random.default_rng(2027)
    cases = [_v2_mutate(rng, seeds_v2[i % len(seeds_v2)]) for i in range(HEADER_CASES)]
    outcomes = _fuzz(tiny_codec, cases, "v2 header mutations")
    assert outcomes["image"] + outcomes["EntropyDesyncError"] > 0 and outcomes["HeaderError"] > 0


def test_v1_and_v2_of_a_stream_hold_the_same_symbols_and_decode_alike(tiny_codec, seeds_v2):
    for data in seeds_v2:
        v1 = tiny_codec.rewrap(data, 1)
        a, b = bs.read(data), bs.read(v1)
        assert (a.hyper, a.y, a.header.seed, a.header.symbols_crc) == (b.hyper, b.y, b.header.seed, b.header.symbols_crc)
        assert tiny_codec.rewrap(v1, 2) == data and len(v1) > len(data)
        assert np.array_equal(*tiny_codec.decompress([data, v1], steps=1))
