"""Decoding one archive part, without Ray: formats, key filter, failures reported."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import archive
from pipelines.compress import CompressSpec, ShardCompressor, ShardTask
from pipelines.decode import DecodeSpec, PartDecoder
from tests.helpers import encode, random_image, write_shard


@pytest.fixture
def archived(tiny_codec, tmp_path, rng):
    samples = [{"__key__": f"k{i}", "png": encode(random_image(rng, 48, 80)), "txt": f"caption {i}".encode()} for i in range(5)]
    samples.insert(2, {"__key__": "bad", "jpg": b"garbage"})
    write_shard(tmp_path / "s.tar", samples)
    ShardCompressor(CompressSpec(output=str(tmp_path / "archive"), model="unused"), tiny_codec)(ShardTask(str(tmp_path / "s.tar"), "s"))
    return tmp_path / "archive"


def _decoder(codec, archive_dir, out, **kw):
    return PartDecoder(DecodeSpec(archive=str(archive_dir), output=str(out), model="unused", batch_size=2, **kw), codec)


def test_webdataset_output_with_sidecars_and_reported_source_errors(tiny_codec, archived, tmp_path):
    stats = _decoder(tiny_codec, archived, tmp_path / "out")(ShardTask(str(archived / "part-s.parquet"), "s"))
    with tarfile.open(tmp_path / "out" / "part-s.tar") as tar:
        names = tar.getnames()
        img = Image.open(io.BytesIO(tar.extractfile("k3.png").read()))
        assert tar.extractfile("k3.txt").read() == b"caption 3"
    assert sorted(n for n in names if n.endswith(".png")) == [f"k{i}.png" for i in range(5)]
    assert img.size == (80, 48)
    assert stats.ok == 5 and stats.errors == 1
    assert stats.failed_keys[0]["key"] == "bad" and "archive row is an error" in stats.failed_keys[0]["reason"]
    marker = json.loads((tmp_path / "out" / "_commits" / "part-s.stats.json").read_text())
    assert marker["failed_keys"] == stats.failed_keys


def test_folder_output_and_key_filter(tiny_codec, archived, tmp_path):
    stats = _decoder(tiny_codec, archived, tmp_path / "out", format="folder", keys=frozenset({"k1", "k4"}))(
        ShardTask(str(archived / "part-s.parquet"), "s"))
    assert sorted(p.name for p in (tmp_path / "out" / "part-s").iterdir()) == ["k1.png", "k1.txt", "k4.png", "k4.txt"]
    assert stats.ok == 2 and stats.errors == 0


def test_a_corrupt_bitstream_is_reported_not_skipped(tiny_codec, archived, tmp_path):
    part = archived / "part-s.parquet"
    table = pq.read_table(part)
    rows = table.to_pylist()
    data = bytearray(rows[0]["bitstream"])
    data[-6] ^= 0xFF
    rows[0]["bitstream"] = bytes(data)
    part.write_bytes(archive.table_bytes(rows))
    stats = _decoder(tiny_codec, archived, tmp_path / "out")(ShardTask(str(part), "s"))
    reasons = {f["key"]: f["reason"] for f in stats.failed_keys}
    assert "ChecksumError" in reasons["k0"] and stats.ok == 4


def test_decoded_pixels_match_the_codec(tiny_codec, archived, tmp_path):
    _decoder(tiny_codec, archived, tmp_path / "out", steps=5, detail=0.5)(ShardTask(str(archived / "part-s.parquet"), "s"))
    row = [r for r in pq.read_table(archived / "part-s.parquet").to_pylist() if r["key"] == "k0"][0]
    expected = tiny_codec.decompress([row["bitstream"]], steps=5, detail=0.5)[0]
    with tarfile.open(tmp_path / "out" / "part-s.tar") as tar:
        got = np.asarray(Image.open(io.BytesIO(tar.extractfile("k0.png").read())))
    assert np.array_equal(got, expected)


def _rewrite(part, edit) -> None:
    rows = pq.read_table(part).to_pylist()
    edit(rows)
    part.write_bytes(archive.table_bytes(rows))


def test_a_forged_row_is_that_rows_outcome_and_the_others_are_decoded(tiny_codec, archived, tmp_path):
    from dataclasses import replace

    from rdeic import bitstream as bs

    def forge(rows):
        stream = bs.read(rows[1]["bitstream"])
        big = replace(stream.header, width=100000, height=100000, pad_width=100032, pad_height=100032,
                      y_shape=(6252, 6252), z_shape=(1563, 1563))
        hyper = bytes(-(-1563 * 1563 * big.index_bits // 8))
        rows[1]["bitstream"] = bs.write(big, hyper, stream.y)  # 100000², CRC recomputed: consistent, 2.4 MB
        # the same, its hyper-latent section too short (a version 1 stream: version 2 has no such field)
        rows[3]["bitstream"] = bs.write(replace(big, version=1, model_name="m", model_hash=bytes(8)), stream.hyper, stream.y)

    _rewrite(archived / "part-s.parquet", forge)
    stats = _decoder(tiny_codec, archived, tmp_path / "out")(ShardTask(str(archived / "part-s.parquet"), "s"))
    codes = {f["key"]: f["code"] for f in stats.failed_keys}
    assert stats.ok == 3 and codes == {"k1": "too_large", "bad": "error_row", "k2": "bitstream_refused"}
    reasons = {f["key"]: f["reason"] for f in stats.failed_keys}
    assert "over the decode limit" in reasons["k1"] and "hyper-latent section" in reasons["k2"]


@pytest.mark.parametrize("fmt", ["folder", "webdataset"])
def test_hostile_keys_never_leave_the_output_and_collisions_cannot_happen(tiny_codec, archived, tmp_path, fmt):
    from pipelines import names

    hostile = ["../escape", "/etc/passwd", "a/../../b", "nul\x00byte", "new\nline", "x" * 300, "CON", "dot.in.key",
               "caf\\xc3 (was not UTF-8)", "both"]

    def edit(rows):
        ok = [r for r in rows if r["status"] == "ok"]
        for row, key in zip(ok * 2, hostile):
            row["key"] = key
        rows[:] = [dict(ok[i % len(ok)], key=key) for i, key in enumerate(hostile)]
        rows[-1]["meta_json"] = json.dumps({"png": "original sidecar named like the decoded image", "PNG": "and its capital twin",
                                            "orig.png": "and one that looks like the renamed one", "": "no extension"})

    _rewrite(archived / "part-s.parquet", edit)
    out = tmp_path / "out"
    stats = _decoder(tiny_codec, archived, out, format=fmt)(ShardTask(str(archived / "part-s.parquet"), "s"))
    assert stats.ok == len(hostile) and not stats.failed_keys
    if fmt == "webdataset":
        with tarfile.open(out / "part-s.tar") as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    else:
        files = {str(p.relative_to(out / "part-s")): p.read_bytes() for p in (out / "part-s").rglob("*") if p.is_file()}
    # a PNG and a caption per key, but "both", whose four sidecars compete for names: nothing overwritten
    assert len(files) == 2 * (len(hostile) - 1) + 1 + 4
    for name in files:
        assert not name.startswith("/") and ".." not in name.split("/") and "\n" not in name and "\x00" not in name
        assert all(len(part.encode()) <= 200 for part in name.split("/"))
    assert files["both.orig.png"] == b"original sidecar named like the decoded image"
    assert files["both.orig.PNG"] == b"and its capital twin" and files["both.orig"] == b"no extension"
    assert files["both.orig.orig.png"] == b"and one that looks like the renamed one"
    assert Image.open(io.BytesIO(files["both.png"])).format == "PNG"
    for key in hostile:  # every key is recovered from its file name, or from the marker for cut names
        stem = names.stem(key)
        assert (names.key_of(stem) if "~" not in stem else stats.renamed_keys[stem]) == key


def test_a_sick_device_fails_the_attempt_and_commits_nothing(tiny_codec, archived, tmp_path, monkeypatch):
    from pipelines.reasons import InfraError

    def sick(*a, **kw):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(tiny_codec, "decompress_results", sick)
    with pytest.raises(InfraError, match="illegal memory access"):
        _decoder(tiny_codec, archived, tmp_path / "out")(ShardTask(str(archived / "part-s.parquet"), "s"))
    assert not (tmp_path / "out" / "_commits").exists() and not (tmp_path / "out" / "part-s.tar").exists()
    assert not list((tmp_path / "out" / "_inprogress").iterdir())


def test_out_of_memory_batches_are_split_then_a_single_image_is_the_workers_failure(tiny_codec, archived, tmp_path,
                                                                                   monkeypatch):
    from pipelines.reasons import InfraError

    real = tiny_codec.decompress_results
    sizes = []

    def small_memory(streams, **kw):
        sizes.append(len(streams))
        if len(streams) > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(streams, **kw)

    monkeypatch.setattr(tiny_codec, "decompress_results", small_memory)
    stats = _decoder(tiny_codec, archived, tmp_path / "out")(ShardTask(str(archived / "part-s.parquet"), "s"))
    assert stats.ok == 5 and max(sizes) == 2 and sizes.count(1) == 5

    monkeypatch.setattr(tiny_codec, "decompress_results", lambda s, **kw: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(InfraError, match="MemoryError"):
        _decoder(tiny_codec, archived, tmp_path / "out2")(ShardTask(str(archived / "part-s.parquet"), "s"))
