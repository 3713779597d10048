"""A 6000x4000 photo through ``rdeic-job compress`` (tiny preset, CPU worker): a tiled row in bounded
memory, and an image over the worker's limit as its own error row."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from rdeic import bitstream as bs
from tests.helpers import encode, random_image, write_shard
from tests.large_image import PeakRSS, camera_photo

pytestmark = pytest.mark.slow

MEMORY_BOUND = 7 << 29  # 3.5 GiB: the CLI's bound (tests/rdeic/test_large_images.py) and a Ray worker's own ~0.5 GiB


def test_a_camera_photo_is_archived_tiled_and_an_oversized_one_is_its_own_error_row(ray_cluster, tiny_model_dir, tmp_path, rng):
    big = camera_photo(tmp_path / "camera.jpg").read_bytes()
    samples = [{"__key__": "camera", "jpg": big}, {"__key__": "small", "png": encode(random_image(rng, 64, 96))}]
    (tmp_path / "in").mkdir()
    write_shard(tmp_path / "in" / "s-000000.tar", samples)
    out = tmp_path / "out"
    with PeakRSS() as memory:
        assert main(["compress", "--input", str(tmp_path / "in" / "*.tar"), "--output", str(out), "--model",
                     str(tiny_model_dir), "--device", "cpu", "-q"]) == 0
    rows = {r["key"]: r for r in pq.read_table(next(out.glob("part-*.parquet"))).to_pylist()}
    assert rows["camera"]["status"] == "ok" and rows["small"]["status"] == "ok"
    header = bs.read(rows["camera"]["bitstream"]).header
    assert (header.width, header.height, header.tiles) == (6000, 4000, (64, 16))
    assert bs.read(rows["small"]["bitstream"]).header.tiles is None
    assert 0 < memory.peak < MEMORY_BOUND, f"peak RSS {memory.peak / 2**30:.2f} GiB"
    summary = json.loads((out / "_summary.json").read_text())
    workers = summary["run"]["workers"]
    assert all(w["max_pixels"] == bs.DEFAULT_MAX_PIXELS for w in workers)  # what the tiled path supports here

    # an explicit limit below the photo: its own error row, the rest of the shard archived
    out2 = tmp_path / "out2"
    assert main(["compress", "--input", str(tmp_path / "in" / "*.tar"), "--output", str(out2), "--model",
                 str(tiny_model_dir), "--device", "cpu", "--max-pixels", "20000000", "-q"]) == 0
    rows = {r["key"]: r for r in pq.read_table(next(out2.glob("part-*.parquet"))).to_pylist()}
    assert rows["small"]["status"] == "ok" and rows["camera"]["status"] == "error"
    assert rows["camera"]["error_code"] == "too_large" and "over the limit of 20000000" in rows["camera"]["error"]
