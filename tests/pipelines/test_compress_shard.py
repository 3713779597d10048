"""One shard → one Parquet part, without Ray: rows for every sample, the schema, readers."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest

from pipelines import archive
from pipelines.compress import CompressSpec, ShardCompressor, ShardTask
from tests.helpers import encode, random_image, write_shard


@pytest.fixture
def compressor(tiny_codec, tmp_path):
    return ShardCompressor(CompressSpec(output=str(tmp_path / "archive"), model="unused", batch_size=3), tiny_codec)


def _mixed_shard(path, rng):
    good = [{"__key__": f"ok{i}", "png": encode(random_image(rng, 40 + 30 * (i % 2), 64)), "json": b'{"i": %d}' % i}
            for i in range(7)]
    bad = [
        {"__key__": "broken", "jpg": b"not an image"},
        {"__key__": "empty", "png": b""},
        {"__key__": "textonly", "txt": b"just a caption"},
    ]
    write_shard(path, good[:3] + bad + good[3:])
    return [s["__key__"] for s in good[:3] + bad + good[3:]]


def test_every_sample_becomes_a_row(compressor, tmp_path, rng):
    keys = _mixed_shard(tmp_path / "s.tar", rng)
    stats = compressor(ShardTask(str(tmp_path / "s.tar"), "s"))
    table = pq.read_table(tmp_path / "archive" / "part-s.parquet")
    assert table.schema.equals(archive.SCHEMA)
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == keys
    assert [r["source_index"] for r in rows] == list(range(len(keys)))
    by_key = {r["key"]: r for r in rows}
    assert by_key["broken"]["status"] == "error" and "not a recognised image format" in by_key["broken"]["error"]
    assert "empty image file" in by_key["empty"]["error"]
    assert "no image file in sample" in by_key["textonly"]["error"]
    assert json.loads(by_key["textonly"]["meta_json"]) == {"txt": "just a caption"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 7 == stats.ok and stats.errors == 3
    for r in ok:
        assert r["bitstream"] and r["num_bytes"] == len(r["bitstream"])
        assert abs(r["bpp"] - 8 * r["num_bytes"] / (r["width"] * r["height"])) < 1e-12
        assert r["model_id"] == str(compressor.codec.model_id) and r["mode"] == "RGB" and r["original_format"] == "PNG"
    marker = json.loads((tmp_path / "archive" / "_commits" / "part-s.stats.json").read_text())
    assert marker["ok"] == 7 and marker["errors"] == 3 and marker["shard_error"] is None


def test_bitstreams_decode_to_the_archived_size(compressor, tiny_codec, tmp_path, rng):
    _mixed_shard(tmp_path / "s.tar", rng)
    compressor(ShardTask(str(tmp_path / "s.tar"), "s"))
    rows = [r for r in pq.read_table(tmp_path / "archive" / "part-s.parquet").to_pylist() if r["status"] == "ok"]
    images = tiny_codec.decompress([r["bitstream"] for r in rows])
    assert [im.shape[:2] for im in images] == [(r["height"], r["width"]) for r in rows]


def test_truncated_shard_commits_what_was_read_with_the_shard_error(compressor, tmp_path, rng):
    write_shard(tmp_path / "s.tar", [{"__key__": f"k{i}", "png": encode(random_image(rng, 32, 32))} for i in range(6)])
    data = (tmp_path / "s.tar").read_bytes()
    with tarfile.open(tmp_path / "s.tar") as tar:
        fourth = tar.getmembers()[3].offset_data
    (tmp_path / "cut.tar").write_bytes(data[: fourth + 100])  # inside the 4th image
    stats = compressor(ShardTask(str(tmp_path / "cut.tar"), "cut"))
    assert stats.shard_error and "unreadable" in stats.shard_error
    rows = pq.read_table(tmp_path / "archive" / "part-cut.parquet").to_pylist()
    assert [r["key"] for r in rows] == ["k0", "k1", "k2", "k3"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "error"]  # the image cut in half is recorded
    # cut exactly between two members: tarfile sees no error, the missing end-of-archive block does
    with tarfile.open(tmp_path / "s.tar") as tar:
        boundary = tar.getmembers()[3].offset
    (tmp_path / "cut2.tar").write_bytes(data[:boundary])
    stats = compressor(ShardTask(str(tmp_path / "cut2.tar"), "cut2"))
    assert stats.ok == 3 and "end-of-archive" in stats.shard_error


def test_committed_shard_is_not_written_twice(compressor, tmp_path, rng):
    _mixed_shard(tmp_path / "s.tar", rng)
    compressor(ShardTask(str(tmp_path / "s.tar"), "s"))
    part = tmp_path / "archive" / "part-s.parquet"
    before = part.stat().st_mtime_ns
    again = compressor(ShardTask(str(tmp_path / "s.tar"), "s", attempt=1))
    assert again.skipped and part.stat().st_mtime_ns == before


def test_archive_is_readable_by_pandas_and_duckdb(compressor, tmp_path, rng):
    import duckdb

    _mixed_shard(tmp_path / "s.tar", rng)
    compressor(ShardTask(str(tmp_path / "s.tar"), "s"))
    glob = str(tmp_path / "archive" / "part-*.parquet")
    con = duckdb.connect()
    counts = dict(con.execute(f"SELECT status, count(*) FROM read_parquet('{glob}') GROUP BY status").fetchall())
    assert counts == {"ok": 7, "error": 3}
    types = dict(con.execute(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM read_parquet('{glob}'))").fetchall())
    assert types["bitstream"] == "BLOB" and types["bpp"] == "DOUBLE" and types["encoded_at"].startswith("TIMESTAMP")
    df = pq.read_table(tmp_path / "archive").to_pandas()  # the folder reads as one dataset: markers are skipped
    assert len(df) == 10 and df["bitstream"].dropna().map(len).gt(0).all()


def test_non_image_member_in_a_plain_tar(compressor, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in [("a.cls", b"3"), ("dir", None)]:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (tmp_path / "t.tar").write_bytes(buf.getvalue())
    stats = compressor(ShardTask(str(tmp_path / "t.tar"), "t"))
    assert stats.errors == 1 and stats.ok == 0


def test_a_sick_device_fails_the_attempt_and_commits_nothing(compressor, tmp_path, rng, monkeypatch):
    from pipelines.reasons import InfraError

    _mixed_shard(tmp_path / "s.tar", rng)

    def sick(images, **kw):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(compressor.codec, "compress", sick)
    with pytest.raises(InfraError, match="illegal memory access"):
        compressor(ShardTask(str(tmp_path / "s.tar"), "s"))
    archive_dir = tmp_path / "archive"
    assert not (archive_dir / "part-s.parquet").exists() and not (archive_dir / "_commits").exists()
    assert not list((archive_dir / "_inprogress").iterdir())


def test_out_of_memory_batches_are_split_and_a_refused_image_is_its_row(compressor, tmp_path, rng, monkeypatch):
    _mixed_shard(tmp_path / "s.tar", rng)
    real = compressor.codec.compress
    sizes = []

    def picky(images, **kw):
        sizes.append(len(images))
        if len(images) > 1:
            raise MemoryError()
        if images[0].shape[0] == 70:
            raise ValueError("images[0] is not what the codec takes")
        return real(images, **kw)

    monkeypatch.setattr(compressor.codec, "compress", picky)
    stats = compressor(ShardTask(str(tmp_path / "s.tar"), "s"))
    rows = pq.read_table(tmp_path / "archive" / "part-s.parquet").to_pylist()
    refused = [r for r in rows if r["error_code"] == "encode_failed"]
    assert len(refused) == 3 and all(r["height"] == 70 for r in refused)  # the three 70-pixel-high images
    assert stats.ok == 4 and stats.error_reasons == {"no_image": 1, "unrecognised_image": 1, "empty_image": 1, "encode_failed": 3}
    assert max(sizes) > 1 and sizes.count(1) == 7


def test_a_file_we_did_not_write_is_never_overwritten(compressor, tmp_path, rng):
    from pipelines.ownership import ForeignFileError

    _mixed_shard(tmp_path / "s.tar", rng)
    (tmp_path / "archive").mkdir()
    (tmp_path / "archive" / "part-s.parquet").write_bytes(b"not ours")
    with pytest.raises(ForeignFileError, match="no record shows this job wrote it"):
        compressor(ShardTask(str(tmp_path / "s.tar"), "s"))
    assert (tmp_path / "archive" / "part-s.parquet").read_bytes() == b"not ours"


def test_a_broken_model_fails_the_attempt_instead_of_committing_error_rows(compressor, tmp_path, rng, monkeypatch):
    from pipelines.reasons import InfraError
    from rdeic.errors import ModelFormatError

    _mixed_shard(tmp_path / "s.tar", rng)

    def overflowing(images, **kw):
        raise ModelFormatError("the model's latents are NaN or beyond the coder's range")

    monkeypatch.setattr(compressor.codec, "compress", overflowing)
    with pytest.raises(InfraError, match="the model failed on this worker"):
        compressor(ShardTask(str(tmp_path / "s.tar"), "s"))
    assert not (tmp_path / "archive" / "_commits").exists()
