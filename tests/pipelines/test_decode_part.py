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
