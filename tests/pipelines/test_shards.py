from __future__ import annotations

import gzip
import io
import re
import tarfile

import pytest

from pipelines import reasons, storage
from rdeic.shards import CODES, ShardReader, UnreadableShardError, expand, expand_braces, split_name
from tests.helpers import write_shard


def test_brace_expansion():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/x{1..2}") == ["a/x1", "a/x2", "b/x1", "b/x2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_expand_globs_and_braces(tmp_path):
    for name in ("a-0.tar", "a-1.tar", "b-0.tar", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    opts = storage.StorageOptions().fsspec_kwargs
    assert [p.rsplit("/", 1)[-1] for p in expand([str(tmp_path / "*.tar")], opts)] == ["a-0.tar", "a-1.tar", "b-0.tar"]
    got = expand([str(tmp_path / "a-{0..1}.tar"), str(tmp_path / "a-1.tar")])
    assert [p.rsplit("/", 1)[-1] for p in got] == ["a-0.tar", "a-1.tar"]  # sorted, no duplicates


def test_the_readers_error_codes_are_the_jobs_reason_codes():
    assert set(CODES) <= set(reasons.CODES)


def test_split_name():
    assert split_name("a/b/000123.seg.png") == ("a/b/000123", "seg.png")
    assert split_name("x.jpg") == ("x", "jpg")
    assert split_name("noext") == ("noext", None)  # WebDataset cannot name these: a sample of its own, in error
    assert split_name("dir/.hidden.jpg") == ("dir/.hidden.jpg", None)
    assert split_name("a.b/c.d.jpg") == ("a.b/c", "d.jpg")


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_reads_webdataset_library_shards(tmp_path):
    write_shard(tmp_path / "s.tar", [{"__key__": f"k{i}", "jpg": b"J%d" % i, "json": b"{}"} for i in range(3)])
    with open(tmp_path / "s.tar", "rb") as f:
        reader = ShardReader(f)
        samples = list(reader)
    assert [(s.key, s.index, sorted(s.files)) for s in samples] == [(f"k{i}", i, ["jpg", "json"]) for i in range(3)]
    assert reader.error is None


def test_duplicate_keys_are_reported():
    data = _tar([("a.jpg", b"1"), ("b.jpg", b"2"), ("a.jpg", b"3")])
    samples = list(ShardReader(io.BytesIO(data)))
    assert [s.key for s in samples] == ["a", "b", "a"]
    assert samples[2].error and "duplicate key 'a'" in samples[2].error and samples[0].error is None


def test_truncated_tar_keeps_what_was_read():
    data = _tar([(f"k{i}.jpg", bytes(2000)) for i in range(5)])
    reader = ShardReader(io.BytesIO(data[: 512 * 24]))  # cut inside the 5th member's data
    samples = list(reader)
    assert reader.error and "unreadable" in reader.error
    assert [s.key for s in samples if s.error is None] == ["k0", "k1", "k2", "k3"]
    assert samples[-1].key == "k4" and "truncated or corrupt" in samples[-1].error


def test_garbage_is_an_unreadable_shard():
    reader = ShardReader(io.BytesIO(b"this is not a tar file at all" * 40))
    with pytest.raises(UnreadableShardError, match="^not a tar archive: starts with b'this is not"):
        list(reader)


def _accounted(reader: ShardReader, samples) -> int:
    return sum(len(s.files) + len(s.bad_members) for s in samples) + reader.skipped_count


def _special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def _tar_of(infos: list[tuple[tarfile.TarInfo, bytes]], **open_kw) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", **open_kw) as tar:
        for info, data in infos:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_invalid_utf8_member_names_become_escaped_keys(fmt):
    # "caf\xe9" in Latin-1, and an extension with a stray byte: as a stranger's tar may hold them
    names = ["caf\udce9.jpg", "caf\udce9.json", "ok.j\udcffg"]
    data = _tar_of([(tarfile.TarInfo(n), b"x") for n in names], format=fmt, encoding="utf-8", errors="surrogateescape")
    samples = list(ShardReader(io.BytesIO(data)))
    for s in samples:
        s.key.encode("utf-8") and [ext.encode("utf-8") for ext in s.files]
    assert [(s.key, sorted(s.files), s.error) for s in samples] == [("caf\\xe9", ["jpg", "json"], None),
                                                                    ("ok", ["j\\xffg"], None)]


def test_links_fifos_and_devices_are_not_a_file_errors():
    data = _tar_of([
        (tarfile.TarInfo("a.jpg"), b"img"),
        (_special("a.json", tarfile.SYMTYPE, "../../etc/passwd"), b""),
        (_special("b.jpg", tarfile.LNKTYPE, "a.jpg"), b""),
        (_special("c.jpg", tarfile.FIFOTYPE), b""),
        (_special("d.jpg", tarfile.CHRTYPE), b""),
        (_special("e.jpg", tarfile.BLKTYPE), b""),
        (_special("dir", tarfile.DIRTYPE), b""),
        (tarfile.TarInfo("dir/f.jpg"), b"img"),
    ])
    reader = ShardReader(io.BytesIO(data))
    samples = list(reader)
    assert [s.key for s in samples] == ["a", "b", "c", "d", "e", "dir/f"]
    assert [(s.key, s.index, sorted(s.files), s.bad_members, s.error_code) for s in samples] == [
        ("a", 0, ["jpg"], {"json": "a.json"}, "not_a_file"),
        ("b", 1, [], {"jpg": "b.jpg"}, "not_a_file"),
        ("c", 2, [], {"jpg": "c.jpg"}, "not_a_file"),
        ("d", 3, [], {"jpg": "d.jpg"}, "not_a_file"),
        ("e", 4, [], {"jpg": "e.jpg"}, "not_a_file"),
        ("dir/f", 5, ["jpg"], {}, None),
    ]
    assert samples[0].error == "member 'a.json' is a symlink to '../../etc/passwd', not a file"
    assert samples[1].error == "member 'b.jpg' is a hardlink to 'a.jpg', not a file"
    assert [s.error for s in samples[2:5]] == [f"member '{k}.jpg' is a {t}, not a file" for k, t in
                                               [("c", "fifo"), ("d", "device"), ("e", "device")]]
    assert reader.skipped_members == [{"name": "dir", "reason": "directory"}] and reader.skipped_count == 1
    assert reader.members == 8 == _accounted(reader, samples) and reader.error is None


def test_a_link_with_an_extension_already_in_the_sample_starts_a_new_one():
    data = _tar_of([(tarfile.TarInfo("a.jpg"), b"img"), (_special("a.jpg", tarfile.SYMTYPE, "x"), b"")])
    samples = list(ShardReader(io.BytesIO(data)))
    assert [(s.key, s.error_code) for s in samples] == [("a", None), ("a", "duplicate_key")]
    assert samples[1].bad_members == {"jpg": "a.jpg"}


def test_skipped_directories_are_capped_but_counted():
    reader = ShardReader(io.BytesIO(_tar_of([(_special(f"d{i}", tarfile.DIRTYPE), b"") for i in range(1005)])))
    assert list(reader) == []
    assert len(reader.skipped_members) == 1000 and reader.skipped_count == reader.members == 1005


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty file (0 bytes)"),
        (b"<!DOCTYPE html>\n<html><body>503 Service Unavailable</body></html>\n" * 20,
         "not a tar archive: starts with b'<!DOCTYPE html>"),
        (b"short", "not a tar archive: starts with b'short'"),
        (b"\x1f\x8b\x08\x00" + bytes(range(200)) * 5, "not a tar archive"),
        (gzip.compress(b"a gzip of something that is not a tar" * 30), "not a tar archive"),
        (b"\x1f\x8b\x08", "not a tar archive: starts with b'\\x1f\\x8b\\x08'"),  # tarfile raises TypeError here
    ],
    ids=["empty", "html", "short", "bad-gzip", "gzip-not-tar", "gzip-header-cut"],
)
def test_unreadable_shards_raise(data, message):
    with pytest.raises(UnreadableShardError, match="^" + re.escape(message)) as info:
        list(ShardReader(io.BytesIO(data)))
    assert "\n" not in str(info.value)


def test_a_tar_with_no_members_is_empty_not_an_error():
    reader = ShardReader(io.BytesIO(_tar([])))
    assert list(reader) == [] and reader.error is None and reader.members == 0


def test_shard_errors_have_codes():
    data = _tar([(f"k{i}.jpg", bytes(2000)) for i in range(3)] + [("k0.jpg", b"again")])
    samples = list(ShardReader(io.BytesIO(data[: 512 * 12])))  # cut inside k2's data
    assert [(s.key, s.error_code) for s in samples] == [("k0", None), ("k1", None), ("k2", "bad_member")]
    assert samples[2].bad_members == {"jpg": "k2.jpg"} and samples[2].files == {}
    samples = list(ShardReader(io.BytesIO(data)))
    assert [(s.key, s.error_code) for s in samples] == [("k0", None), ("k1", None), ("k2", None), ("k0", "duplicate_key")]


def test_a_malformed_pax_header_after_a_member_is_a_shard_error():
    bad = tarfile.TarInfo("b.jpg")
    bad.pax_headers = {"GNU.sparse.size": "abc"}  # tarfile raises ValueError on it
    data = _tar_of([(tarfile.TarInfo("a.jpg"), b"img"), (bad, b"img")], format=tarfile.PAX_FORMAT)
    reader = ShardReader(io.BytesIO(data))
    assert [(s.key, s.error) for s in reader] == [("a", None)]
    assert reader.error == "tar stream unreadable after 1 members: invalid literal for int() with base 10: 'abc'"


def test_storage_errors_propagate_to_retry_the_shard():
    class Failing(io.BytesIO):
        def read(self, size=-1):
            if self.tell() >= 4096:
                raise ValueError("I/O operation on closed file")  # what a storage client may raise
            return super().read(size)

    data = _tar([(f"k{i}.jpg", bytes(2000)) for i in range(5)])
    with pytest.raises(ValueError, match="closed file"):
        list(ShardReader(Failing(data)))


def test_names_webdataset_cannot_split_are_samples_of_their_own_in_error():
    data = _tar([(".hidden.jpg", b"1"), ("noext", b"2"), ("dot.in.name.jpg", b"3"), ("dir/.x.png", b"4")])
    samples = list(ShardReader(io.BytesIO(data)))
    got = [(s.key, s.error_code, sorted(s.files), sorted(s.bad_members)) for s in samples]
    assert got == [(".hidden.jpg", "bad_name", [], [""]), ("noext", "bad_name", [], [""]),
                   ("dot", None, ["in.name.jpg"], []), ("dir/.x.png", "bad_name", [], [""])]
    assert "is not named <key>.<extension>" in samples[0].error


def _claim_size(data: bytes, size: int) -> bytes:
    """The first member's header with another size (base-256, as GNU tar writes huge ones) and its checksum."""
    header = bytearray(data[:512])
    header[124:136] = bytes([0x80]) + size.to_bytes(11, "big")
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % sum(header)
    return bytes(header) + data[512:]


def test_a_header_claiming_an_endless_member_ends_the_shard_at_once(tmp_path):
    import subprocess
    import sys

    shard = tmp_path / "s.tar"
    shard.write_bytes(_claim_size(_tar([("a.jpg", b"0123456789"), ("b.jpg", b"x")]), 1 << 62))
    script = ("import sys; from rdeic.shards import ShardReader\n"
              "r = ShardReader(open(sys.argv[1], 'rb')); s = list(r)\n"
              "print([(x.key, x.error_code) for x in s], r.error is not None)")
    done = subprocess.run([sys.executable, "-c", script, str(shard)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[('a', 'too_large')] True"  # refused by its size, then the stream ends: damage
