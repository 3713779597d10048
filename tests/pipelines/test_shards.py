from __future__ import annotations

import io
import tarfile

from pipelines.shards import ShardReader, split_name
from tests.helpers import write_shard


def test_split_name():
    assert split_name("a/b/000123.seg.png") == ("a/b/000123", "seg.png")
    assert split_name("x.jpg") == ("x", "jpg")
    assert split_name("noext") == ("noext", "")


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


def test_garbage_is_a_shard_error():
    reader = ShardReader(io.BytesIO(b"this is not a tar file at all" * 40))
    assert list(reader) == []
    assert reader.error
