"""The bitstream container: round trip, and a specific error for every failure mode."""

from __future__ import annotations

import numpy as np
import pytest

from rdeic import bitstream as bs
from rdeic.errors import (
    BadMagicError,
    BitstreamError,
    ChecksumError,
    EntropyDesyncError,
    ModelMismatchError,
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


def test_model_mismatch(tiny_codec, rng):
    data = tiny_codec.compress([random_image(rng, 64, 64)])[0]
    stream = bs.read(data)
    other = bs.write(_header_from(stream.header, model_hash=b"\xff" * 8), stream.hyper, stream.y)
    with pytest.raises(ModelMismatchError, match="written by model"):
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
