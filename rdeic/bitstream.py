"""The RDEIC bitstream container: one image, self-describing and checkable on its own.

Two versions; :func:`write` writes the header's, :func:`read` reads both. All integers are
little-endian; ``varint`` is unsigned LEB128, minimally encoded.

Version 2 (what the codec writes), 18 bytes around the payload for a 512² image::

    magic        2 bytes  b"RD"
    version      u8       2
    flags        u8       bits 0-4: index_bits - 1; bit 5: a seed follows; bit 6: a tile plan follows;
                          bit 7: zero
    model_hash   2 bytes  the first two bytes of the model id's digest (the full id is in the model
                          directory and in every archive row)
    width        varint   original size; the padded size and the latent shapes follow from it
    height       varint
    tile/8       varint   only with flag bit 6: the decoder's tile side, in units of 8 latent pixels
    overlap      varint   only with flag bit 6: latent pixels shared by neighbouring tiles
    symbols_crc  u32      CRC32 of the integer symbols (hyper indices, then y), to detect entropy desync
    seed         u32      only with flag bit 5; otherwise the decode seed is symbols_crc
    hyper        the hyper-latent indices, bit-packed: exactly ceil(z_h * z_w * index_bits / 8) bytes
    y            the y symbols' rANS stream: every byte up to the CRC32
    crc32        u32      CRC32 of every byte before it

A stream without flag bit 6 decodes as one piece; with it, the UNet runs over the plan's tiles and
the VAE decoder over tiles of twice the size and overlap (:mod:`rdeic.tiling`). Readers from before
tiling refuse bit 6 as a reserved bit.

Version 1 (read for the archives written with it), 58 bytes around the payload for a 512² image
and a 14-byte model name::

    magic        4 bytes  b"RDEC"
    version      u8       1
    name_len     u8       then name_len bytes: the model's display name (UTF-8)
    model_hash   8 bytes  the model id's digest (rdeic/modeldir.py: tensors, entropy tables, decoding config)
    width        varint   original size
    height       varint
    pad_width    varint   padded to a multiple of 64
    pad_height   varint
    y_h, y_w     varint   latent y shape (1/16)
    z_h, z_w     varint   hyper-latent shape (1/64)
    index_bits   u8       bits per hyper-latent index
    seed         u32      decode seed (noise of the relay sampler)
    symbols_crc  u32      CRC32 of the integer symbols (hyper indices, then y), to detect entropy desync
    n_sections   u8       then per section: tag u8, length varint
    payload      the sections' bytes, in order
    crc32        u32      CRC32 of every byte before it

Sections of version 1: 1 = hyper-latent indices, bit-packed; 2 = y symbols, one rANS stream. The
table is always exactly (1, 2) in that order. Sides are 1 ... 2**20 pixels. :func:`read` is the
one parser: whatever it accepts is consistent, and nothing is sliced or allocated for a length
before it is checked against the bytes present.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from .config import plan_problem
from .errors import (
    BadMagicError,
    BitstreamError,
    ChecksumError,
    HeaderError,
    ImageTooLargeError,
    SectionTableError,
    TruncatedError,
    UnsupportedVersionError,
)

MAGIC = b"RDEC"  # version 1
MAGIC_V2 = b"RD"
FORMAT_VERSION = 2  # what the codec writes
VERSIONS = (1, 2)  # what read() reads
V2_HASH_BYTES = 2
_SEED_FLAG = 0x20
_TILED_FLAG = 0x40
PAD = 64
SECTION_HYPER = 1
SECTION_Y = 2
SECTIONS = (SECTION_HYPER, SECTION_Y)  # the only section table a stream may carry, in this order
MAX_SIDE = 1 << 20  # largest width or height the format allows (a multiple of PAD)
DEFAULT_MAX_PIXELS = 8192 * 8192  # padded pixels a decoder accepts unless told otherwise (tiled streams)
# The default limit for an untiled stream, whose UNet attention runs over its whole latent at a cost that
# grows with the square of the pixels. The codec tiles far below it; an explicit max_pixels applies to
# untiled and tiled streams alike.
UNTILED_DEFAULT_MAX_PIXELS = 4096 * 4096
CRC_SIZE = 4


@dataclass(frozen=True)
class Header:
    model_name: str
    model_hash: bytes
    width: int
    height: int
    pad_width: int
    pad_height: int
    y_shape: tuple[int, int]
    z_shape: tuple[int, int]
    index_bits: int
    seed: int
    symbols_crc: int
    version: int = 1
    tiles: tuple[int, int] | None = None  # (tile, overlap) in latent pixels for a tiled decode; version 2 only

    @property
    def model_id(self) -> str:
        return f"{self.model_name}@{self.model_hash.hex()}"

    @property
    def padded_pixels(self) -> int:
        """What decoding costs: the codec works on the padded image."""
        return self.pad_width * self.pad_height


@dataclass(frozen=True)
class Bitstream:
    header: Header
    hyper: bytes  # packed indices
    y: bytes  # rANS stream

    @property
    def hyper_indices(self) -> np.ndarray:
        h, w = self.header.z_shape
        return unpack_indices(self.hyper, h * w, self.header.index_bits).reshape(h, w)


def padded(n: int) -> int:
    return -(-n // PAD) * PAD


def size_limit(header: Header, max_pixels: int | None) -> int | None:
    """The padded pixels this stream may claim under ``max_pixels``: the default is lower for an untiled stream."""
    if header.tiles is None and max_pixels == DEFAULT_MAX_PIXELS:
        return UNTILED_DEFAULT_MAX_PIXELS
    return max_pixels


def check_size(header: Header, max_pixels: int | None) -> None:
    """Refuse a stream whose padded image is over its :func:`size_limit` (None: no limit), before decoding it."""
    pixels, limit = header.padded_pixels, size_limit(header, max_pixels)
    if limit is not None and pixels > limit:
        kind = "an untiled" if limit != max_pixels else "a"
        raise ImageTooLargeError(f"the bitstream claims {kind} {header.width}x{header.height} image ({pixels} padded "
                                 f"pixels), over the decode limit of {limit} padded pixels")


# ---------------------------------------------------------------- bit packing
def pack_indices(indices: np.ndarray, bits: int) -> bytes:
    """Indices (non-negative, < 2**bits) as a big-endian bit string, zero-padded to whole bytes."""
    flat = np.asarray(indices, dtype=np.int64).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= 1 << bits):
        raise ValueError(f"indices must be in [0, {1 << bits}), got range [{flat.min()}, {flat.max()}]")
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    bit_matrix = ((flat[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(bit_matrix.reshape(-1)).tobytes()


def unpack_indices(data: bytes, count: int, bits: int) -> np.ndarray:
    need = -(-count * bits // 8)
    if len(data) != need:
        raise BitstreamError(f"hyper-latent section has {len(data)} bytes, expected {need}")
    bit_array = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: count * bits].reshape(count, bits)
    weights = (1 << np.arange(bits - 1, -1, -1, dtype=np.int64))
    return bit_array.astype(np.int64) @ weights


# --------------------------------------------------------------------- varints
def _varint(n: int) -> bytes:
    if n < 0:
        raise ValueError(f"varint must be non-negative, got {n}")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise TruncatedError(f"bitstream truncated: it ends inside {what} ({len(self.data)} bytes in all)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def varint(self, what: str, limit: int) -> int:
        """An unsigned LEB128 of at most 63 bits, minimally encoded, refused as soon as it passes ``limit``."""
        value, shift = 0, 0
        while True:
            byte = self.u8(what)
            value |= (byte & 0x7F) << shift
            if value > limit:
                raise HeaderError(f"bitstream field {what} is over its limit of {limit}")
            if not byte & 0x80:
                if byte == 0 and shift:
                    raise HeaderError(f"bitstream field {what} is not minimally encoded")
                return value
            shift += 7
            if shift >= 63:
                raise HeaderError(f"bitstream field {what} is not a valid varint (over 63 bits)")


# ------------------------------------------------------------------ write/read
def write(header: Header, hyper: bytes, y: bytes) -> bytes:
    """The stream of ``header.version`` (1 or 2) for this header and payload."""
    if header.version == 2:
        return _write_v2(header, hyper, y)
    if header.version != 1:
        raise ValueError(f"bitstream version must be one of {VERSIONS}, got {header.version}")
    if header.tiles is not None:
        raise ValueError("a version 1 stream cannot carry a tile plan; this image needs version 2")
    name = header.model_name.encode()
    if len(name) > 255 or len(header.model_hash) != 8:
        raise ValueError("model name must be <= 255 bytes and model hash 8 bytes")
    parts = [
        MAGIC,
        bytes([header.version, len(name)]),
        name,
        header.model_hash,
        b"".join(_varint(v) for v in (header.width, header.height, header.pad_width, header.pad_height,
                                       *header.y_shape, *header.z_shape)),
        bytes([header.index_bits]),
        struct.pack("<II", header.seed & 0xFFFFFFFF, header.symbols_crc & 0xFFFFFFFF),
        bytes([2]),
        bytes([SECTION_HYPER]) + _varint(len(hyper)),
        bytes([SECTION_Y]) + _varint(len(y)),
        hyper,
        y,
    ]
    body = b"".join(parts)
    return body + struct.pack("<I", zlib.crc32(body))


def _write_v2(header: Header, hyper: bytes, y: bytes) -> bytes:
    _check_consistent(header, len(hyper))  # v2 stores no field another one implies: they must agree
    if len(header.model_hash) != V2_HASH_BYTES:
        raise ValueError(f"a version 2 stream carries {V2_HASH_BYTES} bytes of the model hash, got {len(header.model_hash)}")
    seeded = (header.seed & 0xFFFFFFFF) != (header.symbols_crc & 0xFFFFFFFF)
    tiles = b""
    if header.tiles is not None:
        problem = plan_problem(*header.tiles)
        if problem:
            raise ValueError(f"bad tile plan {header.tiles}: {problem}")
        tiles = _varint(header.tiles[0] // 8) + _varint(header.tiles[1])
    flags = (header.index_bits - 1) | (_SEED_FLAG if seeded else 0) | (_TILED_FLAG if tiles else 0)
    body = b"".join([
        MAGIC_V2,
        bytes([2, flags]),
        header.model_hash,
        _varint(header.width) + _varint(header.height),
        tiles,
        struct.pack("<I", header.symbols_crc & 0xFFFFFFFF),
        struct.pack("<I", header.seed & 0xFFFFFFFF) if seeded else b"",
        hyper,
        y,
    ])
    return body + struct.pack("<I", zlib.crc32(body))


def read(data: bytes) -> Bitstream:
    """Parse and verify a bitstream of either version; raises a specific BitstreamError subclass on any defect."""
    data = bytes(data)
    if not data or data[:len(MAGIC_V2)] != MAGIC_V2[:len(data)]:
        raise BadMagicError(f"not an RDEIC bitstream (starts with {data[:4]!r}, expected {MAGIC_V2!r} or {MAGIC!r})")
    if data[:len(MAGIC)] == MAGIC[:len(data)] and len(data) > len(MAGIC_V2):
        return _read_v1(data)
    r = _Reader(data)
    r.take(len(MAGIC_V2), "the magic bytes")
    version = r.u8("the format version")
    if version != 2:
        raise UnsupportedVersionError(f"bitstream format version {version} is not supported (this decoder reads {VERSIONS})")
    return _read_v2(r)


def _read_v2(r: _Reader) -> Bitstream:
    flags = r.u8("the flags")
    if flags & ~(_SEED_FLAG | _TILED_FLAG | 0x1F):
        raise HeaderError(f"bitstream flags {flags:#04x} set reserved bits")
    index_bits = (flags & 0x1F) + 1
    model_hash = r.take(V2_HASH_BYTES, "the model hash")
    width, height = r.varint("the width", MAX_SIDE), r.varint("the height", MAX_SIDE)
    tiles = None
    if flags & _TILED_FLAG:
        tiles = (8 * r.varint("the tile size", MAX_SIDE), r.varint("the tile overlap", MAX_SIDE))
        problem = plan_problem(*tiles)
        if problem:
            raise HeaderError(f"bitstream tile plan is not usable: {problem}")
    symbols_crc = r.u32("the symbol CRC")
    seed = r.u32("the seed") if flags & _SEED_FLAG else symbols_crc
    if flags & _SEED_FLAG and seed == symbols_crc:
        raise HeaderError("bitstream stores a seed equal to its symbol CRC, which a stream leaves implied")
    if width < 1 or height < 1:
        raise HeaderError(f"bitstream header is inconsistent: image size {width}x{height}")
    pw, ph = padded(width), padded(height)
    header = Header("", model_hash, width, height, pw, ph, (ph // 16, pw // 16), (ph // 64, pw // 64), index_bits,
                    seed, symbols_crc, version=2, tiles=tiles)
    hyper_len = -(-header.z_shape[0] * header.z_shape[1] * index_bits // 8)
    present = len(r.data) - r.pos - CRC_SIZE
    if hyper_len > present:
        raise TruncatedError(f"bitstream truncated: its hyper-latent section needs {hyper_len} bytes, "
                             f"{max(present, 0)} are present before the CRC32")
    hyper = r.take(hyper_len, "the hyper-latent section")
    y = r.take(present - hyper_len, "the y section")
    body_end = r.pos
    if zlib.crc32(r.data[:body_end]) != r.u32("the trailing CRC32"):  # the y section runs to the CRC: a cut is caught here
        raise ChecksumError("bitstream CRC32 mismatch: the data was altered, corrupted or truncated")
    return Bitstream(header, hyper, y)


def _read_v1(data: bytes) -> Bitstream:
    r = _Reader(data)
    r.take(len(MAGIC), "the magic bytes")
    version = r.u8("the format version")
    if version != 1:
        raise UnsupportedVersionError(f"bitstream format version {version} is not supported (this decoder reads {VERSIONS})")
    name_bytes = r.take(r.u8("the model name length"), "the model name")
    model_hash = r.take(8, "the model hash")
    dims = [r.varint(what, limit) for what, limit in _DIMENSIONS]
    index_bits = r.u8("the index width")
    seed, symbols_crc = r.u32("the seed"), r.u32("the symbol CRC")
    hyper, y = (r.take(n, f"section {tag}") for tag, n in zip(SECTIONS, _read_section_table(r)))
    body_end = r.pos
    stored_crc = r.u32("the trailing CRC32")
    if r.pos != len(data):
        raise BitstreamError(f"bitstream has {len(data) - r.pos} unexpected bytes after its CRC32")
    if zlib.crc32(data[:body_end]) != stored_crc:
        raise ChecksumError("bitstream CRC32 mismatch: the data was altered or corrupted")
    try:
        name = name_bytes.decode()
    except UnicodeDecodeError:
        raise BitstreamError("bitstream model name is not UTF-8") from None
    header = Header(name, model_hash, *dims[:4], tuple(dims[4:6]), tuple(dims[6:8]), index_bits, seed, symbols_crc, version)
    _check_consistent(header, len(hyper))
    return Bitstream(header, hyper, y)


_DIMENSIONS = [("the width", MAX_SIDE), ("the height", MAX_SIDE), ("the padded width", MAX_SIDE),
               ("the padded height", MAX_SIDE), ("the y height", MAX_SIDE // 16), ("the y width", MAX_SIDE // 16),
               ("the z height", MAX_SIDE // 64), ("the z width", MAX_SIDE // 64)]


def _read_section_table(r: _Reader) -> list[int]:
    """The sections' lengths, in :data:`SECTIONS` order, once they are known to fit in the bytes present."""
    count = r.u8("the section count")
    if count != len(SECTIONS):
        raise SectionTableError(f"bitstream has {count} sections, expected {len(SECTIONS)} (tags {list(SECTIONS)})")
    lengths: list[int] = []
    for position, expected in enumerate(SECTIONS):
        tag = r.u8("the section table")
        if tag not in SECTIONS:
            raise SectionTableError(f"bitstream has an unknown section tag {tag} (known: {list(SECTIONS)})")
        if tag in SECTIONS[:position]:
            raise SectionTableError(f"bitstream lists section {tag} twice")
        if tag != expected:
            raise SectionTableError(f"bitstream lists section {tag} at position {position + 1}, expected {expected}")
        lengths.append(r.varint(f"the length of section {tag}", (1 << 63) - 1))
    present = len(r.data) - r.pos - CRC_SIZE
    if sum(lengths) > present:
        raise TruncatedError(f"bitstream truncated: its sections claim {sum(lengths)} bytes, {max(present, 0)} are present "
                             f"before the CRC32")
    return lengths


def _check_consistent(h: Header, hyper_len: int) -> None:
    problems = []
    if h.width < 1 or h.height < 1:
        problems.append(f"image size {h.width}x{h.height}")
    if (h.pad_width, h.pad_height) != (padded(h.width), padded(h.height)):
        problems.append(f"padded size {h.pad_width}x{h.pad_height} for {h.width}x{h.height}")
    if h.y_shape != (h.pad_height // 16, h.pad_width // 16) or h.z_shape != (h.pad_height // 64, h.pad_width // 64):
        problems.append(f"latent shapes y={h.y_shape} z={h.z_shape}")
    if not 1 <= h.index_bits <= 32:
        problems.append(f"index width {h.index_bits}")
    elif hyper_len != -(-h.z_shape[0] * h.z_shape[1] * h.index_bits // 8):
        problems.append(f"hyper-latent section of {hyper_len} bytes for {h.z_shape[0]}x{h.z_shape[1]} "
                        f"{h.index_bits}-bit indices")
    if problems:
        raise HeaderError("bitstream header is inconsistent: " + "; ".join(problems))
