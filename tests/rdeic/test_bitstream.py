"""The bitstream container: round trip, and a specific error for every failure mode."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from rdeic import bitstream as bs
from rdeic.errors import (
    BadMagicError,
    BitstreamError,
    ChecksumError,
    EntropyDesyncError,
    HeaderError,
    ModelMismatchError,
    SectionTableError,
    TruncatedError,
    UnsupportedVersionError,
)
from tests.helpers import random_image


def _header(**over):
    fields = dict(model_name="m", model_hash=b"\x01" * 8, width=100, height=70, pad_width=128, pad_height=128,
                  y_shape=(8, 8), z_shape=(2, 2), index_bits=10, seed=7, symbols_crc=123)
    fields.update(over)
    return bs.Header(**fields)


@pytest.mark.parametrize("bits", [1, 10, 14, 17])
def test_index_packing_roundtrip(bits):
    rng = np.random.default_rng(bits)
    idx = rng.integers(0, 1 << bits, size=37)
    packed = bs.pack_indices(idx, bits)
    assert len(packed) == -(-37 * bits // 8)
    assert np.array_equal(bs.unpack_indices(packed, 37, bits), idx)


def test_fourteen_bits_per_index():
    assert len(bs.pack_indices(np.full(64, 16383), 14)) == 64 * 14 // 8


def test_write_read_roundtrip():
    data = bs.write(_header(), b"\x00\x01\x02\x03\x04", b"payload")
    stream = bs.read(data)
    assert stream.header == _header()
    assert (stream.hyper, stream.y) == (b"\x00\x01\x02\x03\x04", b"payload")


def test_bad_magic():
    with pytest.raises(BadMagicError):
        bs.read(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(BadMagicError):
        bs.read(b"")


def test_unsupported_version():
    data = bytearray(bs.write(_header(), b"\x00" * 5, b"y"))
    data[4] = 9
    with pytest.raises(UnsupportedVersionError, match="version 9"):
        bs.read(bytes(data))


@pytest.mark.parametrize("keep", [2, 5, 12, 30, -5, -1])
def test_truncation(keep):
    data = bs.write(_header(), b"\x00" * 5, b"some y stream bytes")
    with pytest.raises(TruncatedError):
        bs.read(data[:keep])


def test_crc_mismatch_on_any_flipped_byte():
    data = bs.write(_header(), b"\x00" * 5, b"some y stream bytes")
    name_end = 4 + 2 + 1  # magic, version, name length, 1-byte name
    for pos in range(name_end, len(data)):
        corrupt = bytearray(data)
        corrupt[pos] ^= 0x40
        with pytest.raises(BitstreamError):
            bs.read(bytes(corrupt))
    corrupt = bytearray(data)
    corrupt[-8] ^= 1  # inside the y payload: structure intact, only the CRC can tell
    with pytest.raises(ChecksumError):
        bs.read(bytes(corrupt))


def test_trailing_bytes_refused():
    with pytest.raises(BitstreamError, match="unexpected bytes"):
        bs.read(bs.write(_header(), b"\x00" * 5, b"y") + b"\x00")


def test_inconsistent_header_refused():
    with pytest.raises(BitstreamError, match="inconsistent"):
        bs.read(bs.write(_header(pad_width=192), b"\x00" * 5, b"y"))


@pytest.mark.parametrize("version, digest", [(2, b"\xff" * 2), (1, b"\xff" * 8)])
def test_model_mismatch(tiny_codec, rng, version, digest):
    data = tiny_codec.rewrap(tiny_codec.compress([random_image(rng, 64, 64)])[0], version)
    stream = bs.read(data)
    other = bs.write(_header_from(stream.header, model_hash=digest), stream.hyper, stream.y)
    with pytest.raises(ModelMismatchError, match="written by"):
        tiny_codec.decompress([other])


def test_entropy_desync_detected(tiny_codec, rng):
    """A stream whose symbols do not decode to the encoder's (here: a wrong symbol CRC) is refused."""
    data = tiny_codec.compress([random_image(rng, 64, 64)])[0]
    stream = bs.read(data)
    bad = bs.write(_header_from(stream.header, symbols_crc=stream.header.symbols_crc ^ 1), stream.hyper, stream.y)
    with pytest.raises(EntropyDesyncError):
        tiny_codec.decompress([bad])
    # a valid CRC over a damaged rANS payload is caught the same way
    y = bytearray(stream.y)
    y[len(y) // 2] ^= 0xFF
    results = tiny_codec.decompress_results([bs.write(stream.header, stream.hyper, bytes(y)), data])
    assert isinstance(results[0], EntropyDesyncError)
    assert isinstance(results[1], np.ndarray)  # the good stream in the same batch still decodes


def _header_from(h: bs.Header, **over) -> bs.Header:
    fields = {k: getattr(h, k) for k in bs.Header.__dataclass_fields__}
    fields.update(over)
    return bs.Header(**fields)


def test_hyper_section_length_is_checked_by_the_parser():
    # 2x2 indices of 10 bits need 5 bytes: info and decode must refuse the same streams
    with pytest.raises(BitstreamError, match="hyper-latent section of 3 bytes"):
        bs.read(bs.write(_header(), b"\x00" * 3, b"y"))


# ---------------------------------------------------------------- hostile headers (CRC always valid)
def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _with_table(table: list[tuple[int, int]], payload: bytes, header: bs.Header | None = None) -> bytes:
    """A stream with any section table after a valid header; write() ends with 2 one-byte-length entries."""
    head = bs.write(header or _header(), b"", b"")[: -4 - 5]
    entries = b"".join(bytes([tag]) + bs._varint(n) for tag, n in table)
    return _with_crc(head + bytes([len(table)]) + entries + payload)


HYPER, Y = b"\x00" * 5, b"y"
MAX_SIDE = 1 << 20  # docs/codec.md: an image side is at most 2**20


@pytest.mark.parametrize(
    "table, payload, message",
    [
        ([(2, 1), (1, 5)], Y + HYPER, "section 2 at position 1, expected 1"),
        ([(1, 5), (1, 5)], HYPER + HYPER, "section 1 twice"),
        ([(2, 1), (2, 1)], Y + Y, "section 2 at position 1, expected 1"),
        ([(1, 5), (2, 1), (2, 1)], HYPER + Y + Y, "3 sections, expected 2"),
        ([(1, 5), (1, 5), (2, 1)], HYPER + HYPER + Y, "3 sections, expected 2"),
        ([(1, 5)], HYPER, "1 sections, expected 2"),
        ([], b"", "0 sections, expected 2"),
        ([(1, 5), (3, 1)], HYPER + Y, "unknown section tag 3"),
        ([(0, 5), (2, 1)], HYPER + Y, "unknown section tag 0"),
    ],
)
def test_section_table_must_be_the_canonical_one(table, payload, message):
    with pytest.raises(SectionTableError, match=message):
        bs.read(_with_table(table, payload))


@pytest.mark.parametrize("lengths", [(2**62, 1), (5, 2**62), (2**63 - 1, 2**63 - 1), (6, 1), (5, 2)])
def test_section_lengths_are_bounded_by_the_bytes_present(lengths):
    with pytest.raises(TruncatedError, match="sections claim"):
        bs.read(_with_table([(1, lengths[0]), (2, lengths[1])], HYPER + Y))


def _resized(width: int, height: int) -> bytes:
    return forged_size(bs.write(_header(index_bits=1), b"\x00", b"y"), width, height)


def test_sizes_are_bounded_by_what_the_fields_mean():
    assert bs.read(_resized(MAX_SIDE, 64)).header.width == MAX_SIDE
    for width, height in [(MAX_SIDE + 1, 64), (64, MAX_SIDE + 64)]:
        with pytest.raises(HeaderError, match="over its limit"):
            bs.read(_resized(width, height))
    for field in ("width", "pad_height"):
        with pytest.raises(HeaderError, match="over its limit"):
            bs.read(bs.write(_header(**{field: 2**62}), HYPER, Y))
    with pytest.raises(HeaderError, match="image size 0x"):
        bs.read(bs.write(_header(width=0, pad_width=0, y_shape=(8, 0), z_shape=(2, 0)), b"", b"y"))


def test_overlong_varints_are_refused():
    data = bs.write(_header(), HYPER, Y)
    start = 4 + 2 + 1 + 8  # magic, version and name length, name "m", model hash: width (100) comes next
    assert data[start] == 100
    overlong = _with_crc(data[:start] + bytes([100 | 0x80, 0]) + data[start + 1: -4])
    with pytest.raises(HeaderError, match="not minimally encoded"):
        bs.read(overlong)
    endless = _with_crc(data[:start] + b"\xff" * 20 + data[start + 1: -4])
    with pytest.raises(HeaderError):
        bs.read(endless)


def forged_size(data: bytes, width: int, height: int) -> bytes:
    """``data`` claiming another image size, every other field consistent (CRC, shapes, hyper section length)."""
    stream = bs.read(data)
    pw, ph = bs.padded(width), bs.padded(height)
    z_shape = (ph // 64, pw // 64)
    header = _header_from(stream.header, width=width, height=height, pad_width=pw, pad_height=ph,
                          y_shape=(ph // 16, pw // 16), z_shape=z_shape)
    return bs.write(header, bytes(-(-z_shape[0] * z_shape[1] * header.index_bits // 8)), stream.y)


def test_a_stream_written_in_version_1_still_decodes_and_converts_both_ways():
    """tests/fixtures/bitstream_v1: a stream and its steps=2 decoding, both written by the code before
    version 2 (commit 5c4d9df) with the bundled demo model (rewritten with that commit's code whenever
    the demo model is replaced)."""
    from pathlib import Path

    from PIL import Image

    from rdeic.cli import default_model
    from rdeic.codec import Codec

    folder = Path(__file__).resolve().parents[1] / "fixtures" / "bitstream_v1"
    data = (folder / "demo-100x70.rdeic").read_bytes()
    codec = Codec.load(default_model())
    assert bs.read(data).header.version == 1 and codec.verify([data]) == [None]  # the symbols decode to their CRC
    v2 = codec.rewrap(data, 2)
    payload = len(bs.read(data).hyper) + len(bs.read(data).y)
    assert codec.rewrap(v2, 1) == data and (len(data) - payload, len(v2) - payload) == (57, 16)  # v1's header: 57 bytes with a 120-byte y
    new_v1, new_v2 = codec.decompress([data, v2], steps=2)
    assert np.array_equal(new_v1, new_v2)
    old = np.asarray(Image.open(folder / "demo-100x70.steps2.png"))
    # the same pixels as before on this kind of machine; another CPU's kernels may move a level (docs/codec.md)
    assert np.abs(new_v1.astype(int) - old).max() <= 1 and (new_v1 == old).mean() > 0.99
