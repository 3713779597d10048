"""Seeded fuzzing: nothing a stranger's shard holds may make the reader or prepare() raise.

Case counts scale with ``RDEIC_FUZZ_SCALE`` (default 1: a few seconds in all); a long run is
``RDEIC_FUZZ_SCALE=100 python -m pytest -q tests/pipelines/test_fuzz.py -o log_cli=true --log-cli-level=INFO``,
which also logs the outcome counts.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import tarfile
import zlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin

from pipelines import reasons
from pipelines.samples import prepare
from rdeic.shards import Sample, ShardReader, UnreadableShardError, split_name
from tests.helpers import random_image

log = logging.getLogger(__name__)

SCALE = float(os.environ.get("RDEIC_FUZZ_SCALE", "1"))
IMAGE_CASES = round(3000 * SCALE)
TAR_CASES = round(2000 * SCALE)
NAME_CASES = round(1000 * SCALE)
MAX_PIXELS = 256 * 256  # the seeds are tiny; a mutated header claiming more is refused before decoding

pytestmark = pytest.mark.filterwarnings("ignore")  # PIL warns about every odd EXIF tag it meets


# --- seeds --------------------------------------------------------------------------------------


def _seed_images(with_exif: bool = True) -> dict[str, bytes]:
    """Small JPEG, PNG and WebP files, each with an EXIF block (orientation and a few other tags)."""
    img = Image.fromarray(random_image(np.random.default_rng(0), 12, 16))
    exif = img.getexif() if with_exif else Image.Exif()
    if with_exif:
        exif[0x0112] = 6  # Orientation
        exif[0x010F] = "rdeic"  # Make
        exif[0x011A] = TiffImagePlugin.IFDRational(72, 1)  # XResolution
        exif[0x0132] = "2024:01:01 00:00:00"  # DateTime
    out = {}
    for ext, fmt in (("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")):
        buf = io.BytesIO()
        img.save(buf, format=fmt, exif=exif.tobytes())
        out[ext] = buf.getvalue()
    return out


def _member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data)
    return info, data


def _seed_tars() -> list[bytes]:
    """Shards in each tar format with files, sidecars, a directory, links, a FIFO, long and odd names."""
    images = _seed_images(with_exif=False)  # EXIF is the image fuzz's work; here it would only cost time
    members = [
        _member("a/000.jpg", images["jpg"]), _member("a/000.json", b'{"caption": "x"}'),
        _member("a", kind=tarfile.DIRTYPE), _member("a/001.png", images["png"]),
        _member("a/001.txt", kind=tarfile.SYMTYPE, link="../../etc/passwd"),
        _member("a/002.webp", images["webp"]), _member("a/002.cls", b"7"),
        _member("b.jpg", kind=tarfile.LNKTYPE, link="a/000.jpg"), _member("c.jpg", kind=tarfile.FIFOTYPE),
        _member("d\u00e9j\u00e0.png", images["png"]), _member("caf\udce9.png", images["png"]),
        _member("x" * 120 + ".png", images["png"]),
    ]
    tars = []
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
            for info, data in members:
                tar.addfile(info, io.BytesIO(data))
        tars.append(buf.getvalue())
    return tars


def _header_blocks(data: bytes) -> list[int]:
    """Offsets of every header block of a tar (pax and GNU long-name blocks included)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding="utf-8", errors="surrogateescape") as tar:
        return [offset for m in tar for offset in range(m.offset, m.offset_data, 512)]


# --- mutations ----------------------------------------------------------------------------------


def _mutate_bytes(rng: np.random.Generator, data: bytes) -> bytes:
    """One of: bit flips, a run of bytes overwritten, a truncation, a chunk duplicated elsewhere."""
    if not data:
        return data
    data = bytearray(data)
    kind = rng.integers(4)
    if kind == 0:
        for pos in rng.integers(len(data), size=rng.integers(1, 9)):
            data[pos] ^= 1 << rng.integers(8)
    elif kind == 1:
        pos, n = rng.integers(len(data)), rng.integers(1, 17)
        data[pos:pos + n] = [rng.bytes(n), bytes(n), b"\xff" * n][rng.integers(3)]
    elif kind == 2:
        del data[rng.integers(len(data)):]
    else:
        start = rng.integers(len(data))
        chunk = data[start:start + rng.integers(1, 1025)]
        pos = rng.integers(len(data) + 1)
        data[pos:pos] = chunk
    return bytes(data)


EXIF_TAGS = (0x0112, 0x010F, 0x011A, 0x0132, 0x0128, 0x0213, 0x8769, 0x8825, 0x927C, 0xA005, 0x0100)


def _mutate_exif(rng: np.random.Generator, data: bytes) -> bytes:
    """Change the tag, type, count or value of one entry of the first EXIF IFD."""
    tiff = data.find(b"II*\x00")
    if tiff < 0:
        return _mutate_bytes(rng, data)
    ifd = tiff + int.from_bytes(data[tiff + 4:tiff + 8], "little")
    entries = int.from_bytes(data[ifd:ifd + 2], "little")
    entry = ifd + 2 + 12 * int(rng.integers(max(1, min(entries, 16))))
    field = rng.integers(4)
    if field == 0:
        start, value = entry, int(rng.choice(EXIF_TAGS)).to_bytes(2, "little")
    elif field == 1:
        start, value = entry + 2, int(rng.integers(0, 20)).to_bytes(2, "little")
    elif field == 2:
        start, value = entry + 4, int(rng.choice([0, 1, 2, 3, 255, 1 << 31, 0xFFFFFFFF])).to_bytes(4, "little")
    else:
        start, value = entry + 8, rng.bytes(4)
    return data[:start] + value + data[start + len(value):]


def _fix_png_crcs(data: bytes) -> bytes:
    """Recompute the CRC of every whole chunk, so that the decoder reads on past a mutation."""
    out, pos = bytearray(data), 8
    while pos + 12 <= len(out):
        length = int.from_bytes(out[pos:pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > len(out):
            break
        out[end:end + 4] = zlib.crc32(out[pos + 4:end]).to_bytes(4, "big")
        pos = end + 4
    return bytes(out)


def _mutate_image(rng: np.random.Generator, ext: str, data: bytes) -> bytes:
    for _ in range(rng.integers(1, 4)):
        data = _mutate_exif(rng, data) if rng.random() < 0.4 else _mutate_bytes(rng, data)
    if ext == "png" and rng.random() < 0.5:
        data = _fix_png_crcs(data)
    return data


# name, offset and length of the ustar header fields
HEADER_FIELDS = {"name": (0, 100), "mode": (100, 8), "size": (124, 12), "mtime": (136, 12), "chksum": (148, 8),
                 "type": (156, 1), "linkname": (157, 100), "magic": (257, 8), "prefix": (345, 155)}
NAMES = [b"", b".", b"/", b"../../etc/passwd", b"a/000.jpg", b"a/000.json", b"k\xff\xfe.jpg", b"\xc3.png",
         b"x.y.z.w", b"a/", b"caf\xe9.jpg", b"\xed\xa0\x80.png"]
TYPES = b"0123456789LKxgSDVMN\x00Z"
PAX_RECORDS = [b"path=\xff\xfe.jpg", b"path=", b"size=99999999999", b"size=-5", b"size=abc", b"linkpath=../x",
               b"hdrcharset=BINARY", b"GNU.sparse.map=1,2,3", b"GNU.sparse.size=abc", b"uid=abc", b"mtime=1e400"]


def _field_value(rng: np.random.Generator, field: str, n: int) -> bytes:
    if field in ("name", "linkname", "prefix"):
        value = NAMES[rng.integers(len(NAMES))] if rng.random() < 0.7 else rng.bytes(rng.integers(n))
    elif field == "type":
        value = bytes([TYPES[rng.integers(len(TYPES))]]) if rng.random() < 0.9 else rng.bytes(1)
    elif field == "magic":
        value = [b"ustar\x0000", b"ustar  \x00", rng.bytes(8)][rng.integers(3)]
    else:  # numbers: octal, huge, base-256 (also negative), garbage
        choices = [b"%0*o\x00" % (n - 1, rng.integers(0, 1 << 16)), b"7" * (n - 1) + b"\x00",
                   b"\x80" + rng.bytes(n - 1), b"\xff" * n, rng.bytes(n), bytes(n)]
        value = choices[rng.integers(len(choices))]
    return value[:n].ljust(n, b"\x00")


def _set_checksum(data: bytearray, header: int) -> None:
    data[header + 148:header + 156] = b" " * 8
    data[header + 148:header + 156] = b"%06o\x00 " % sum(data[header:header + 512])


def _mutate_tar(rng: np.random.Generator, data: bytes, headers: list[int]) -> bytes:
    """Mostly one header field of one header block (checksum fixed half of the time); else raw bytes."""
    kind = rng.random()
    if kind < 0.15:
        return _mutate_bytes(rng, data)
    if kind < 0.25:  # whole blocks duplicated or dropped: members repeated or cut out
        out, block = bytearray(data), 512 * int(rng.integers(len(data) // 512))
        n = 512 * int(rng.integers(1, 8))
        if rng.random() < 0.5:
            out[block:block] = out[block:block + n]
        else:
            del out[block:block + n]
        return bytes(out)
    out = bytearray(data)
    pax = [h for h in headers if out[h + 156] == ord("x")]
    if kind < 0.35 and pax:  # a pax header: write a record into its data
        header = pax[rng.integers(len(pax))]
        record = PAX_RECORDS[rng.integers(len(PAX_RECORDS))]
        record = b"%d %s\n" % (len(record) + 4, record)  # length counts itself (2 digits), the space, the newline
        out[header + 512:header + 512 + len(record)] = record
    else:
        header = headers[rng.integers(len(headers))]
        field = list(HEADER_FIELDS)[rng.integers(len(HEADER_FIELDS))]
        start, n = HEADER_FIELDS[field]
        out[header + start:header + start + n] = _field_value(rng, field, n)
    if rng.random() < 0.5:
        _set_checksum(out, header)
    return bytes(out)


# --- checks -------------------------------------------------------------------------------------


def _encode(*texts: str) -> None:
    """Raises UnicodeEncodeError unless every text is valid UTF-8 (as Parquet and JSON need)."""
    for text in texts:
        text.encode("utf-8")


def _check_prepared(sample: Sample, outcomes: Counter) -> None:
    p = prepare(sample, MAX_PIXELS)
    if p.error is None:
        assert p.error_code is None and p.image is not None
        assert p.image.dtype == np.uint8 and p.image.shape == (p.height, p.width, 3)
        outcomes["ok"] += 1
    else:
        assert p.image is None and p.error_code in reasons.CODES, (p.error_code, p.error)
        _encode(p.error)
        outcomes[p.error_code] += 1


def _read_checked(data: bytes, outcomes: Counter) -> None:
    try:
        reader = ShardReader(io.BytesIO(data))
        samples = list(reader)
    except UnreadableShardError as exc:
        assert "\n" not in str(exc)
        outcomes["unreadable shard"] += 1
        return
    accounted = sum(len(s.files) + len(s.bad_members) for s in samples) + reader.skipped_count
    assert reader.members == accounted
    assert [s.index for s in samples] == list(range(len(samples)))
    assert all(m["reason"] == "directory" for m in reader.skipped_members)
    _encode(*(m["name"] for m in reader.skipped_members), reader.error or "")
    outcomes["shard error"] += reader.error is not None
    for s in samples:
        _encode(s.key, *s.files, *s.bad_members, *s.bad_members.values())
        assert (s.error is None) == (s.error_code is None)
        _check_prepared(s, outcomes)


# --- tests --------------------------------------------------------------------------------------


def test_mutated_images_never_make_prepare_raise():
    rng = np.random.default_rng(1)
    seeds = _seed_images()
    outcomes: Counter = Counter()
    for ext in seeds:  # the seeds themselves are good, and rotated by their EXIF
        p = prepare(Sample("seed", 0, {ext: seeds[ext]}), MAX_PIXELS)
        assert p.error is None and (p.width, p.height) == (12, 16), (ext, p.error)
    exts = list(seeds)
    for case in range(IMAGE_CASES):
        ext = exts[case % len(exts)]
        _check_prepared(Sample("k", case, {ext: _mutate_image(rng, ext, seeds[ext])}), outcomes)
    log.info("%d mutated images: %s", IMAGE_CASES, dict(outcomes.most_common()))
    assert outcomes["corrupt_image"] and outcomes["ok"]  # the mutations reach both sides


def test_mutated_tars_never_make_the_reader_raise():
    rng = np.random.default_rng(2)
    seeds = _seed_tars()
    headers = [_header_blocks(seed) for seed in seeds]
    outcomes: Counter = Counter()
    for seed in seeds:
        _read_checked(seed, outcomes)
    assert outcomes["shard error"] == 0 and outcomes["not_a_file"] == 2 * 3
    for case in range(TAR_CASES):
        which = case % len(seeds)
        data = _mutate_tar(rng, seeds[which], headers[which])
        if case % 20 == 0:  # some compressed shards, some with damaged compression
            data = gzip.compress(data, mtime=0)
            data = _mutate_bytes(rng, data) if case % 40 == 0 else data
        _read_checked(data, outcomes)
    log.info("%d mutated tars: %s", TAR_CASES, dict(outcomes.most_common()))
    assert outcomes["unreadable shard"] and outcomes["shard error"] and outcomes["ok"]


NAME_BYTES = [b"a", b"b", b"0", b".", b"/", b"\xc3\xa9", b"\xe2\x82\xac", b"\xc3", b"\xe2\x82", b"\xff", b"\x80",
              b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\\x", b" "]


def test_keys_are_always_valid_utf8():
    rng = np.random.default_rng(3)
    for _ in range(NAME_CASES):
        names = [b"".join(NAME_BYTES[i] for i in rng.integers(len(NAME_BYTES), size=rng.integers(1, 60)))
                 for _ in range(rng.integers(1, 4))]
        names = [name + b"a" if name.endswith(b"/") else name for name in names]  # pax drops a trailing slash
        buf = io.BytesIO()
        fmt = [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT][rng.integers(2)]
        with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
            for name in names:
                info, data = _member(name.decode("utf-8", "surrogateescape"), b"x")
                tar.addfile(info, io.BytesIO(data))
        samples = list(ShardReader(io.BytesIO(buf.getvalue())))
        for s in samples:
            _encode(s.key, *s.files, *s.bad_members)
        # the rule, stated independently of the reader: undecodable bytes read as \xNN; a name that
        # WebDataset cannot split is a sample of its own, named by the whole name, in error
        expected = {split_name(name.decode("utf-8", "backslashreplace")) for name in names}
        got = {(s.key, ext) for s in samples for ext in s.files}
        got |= {(s.key, None) for s in samples if split_name(s.key)[1] is None and "" in s.bad_members}
        assert got == expected
