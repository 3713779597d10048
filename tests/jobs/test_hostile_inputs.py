"""Hostile inputs at the job level: one-line refusals before any work, and bad parts as named unit failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from tests.helpers import make_shards


def _cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


@pytest.mark.parametrize("job, bad", [
    ("compress", ["--batch-size", "0"]), ("compress", ["--max-pixels", "0"]), ("compress", ["--read-threads", "0"]),
    ("compress", ["--actors", "0"]), ("compress", ["--max-member-bytes", "0"]),
    ("decode", ["--steps", "0"]), ("decode", ["--detail", "nan"]), ("decode", ["--detail", "-1"]),
    ("decode", ["--steps", "301"]), ("decode", ["--lease-ttl", "0"]),
])
def test_bad_arguments_are_one_line_before_ray_or_a_model(job, bad, tmp_path):
    make_shards(tmp_path / "in", 1, 1)
    where = (["--input", str(tmp_path / "in" / "*.tar"), "--output", str(tmp_path / "out")] if job == "compress"
             else ["--archive", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    done = _cli(job, *where, *bad)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert bad[0] in done.stderr and "Ray" not in done.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_object_store_problems_are_one_line(s3, tmp_path):
    fs, bucket, endpoint = s3
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {"HOME": str(tmp_path), "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "compress", "--input", f"s3://{bucket}/in/*.tar", "--output",
                           f"s3://{bucket}/out", "--endpoint-url", endpoint], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "rdeic-job: error: no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
        "or pass --anon for a public bucket"]
    done = _cli("compress", "--input", f"s3://{bucket}/in/*.tar", "--output", f"s3://{bucket}/out",
                "--endpoint-url", "http://127.0.0.1:9")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "cannot reach the S3 endpoint http://127.0.0.1:9" in done.stderr


@pytest.mark.slow
def test_a_part_of_another_schema_fails_its_unit_by_name_and_an_unmarked_part_is_reported(ray_cluster, tiny_model_dir,
                                                                                           tmp_path, caplog):
    make_shards(tmp_path / "in", 2, 2)
    archive = tmp_path / "archive"
    assert main(["compress", "--input", str(tmp_path / "in" / "*.tar"), "--output", str(archive),
                 "--model", str(tiny_model_dir), "-q"]) == 0
    pq.write_table(pa.table({"__filename": ["a.png"], "data": [b"x"]}), archive / "part-shard-000001.parquet")
    (archive / "part-stray.parquet").write_bytes((archive / "part-shard-000000.parquet").read_bytes())
    with caplog.at_level("WARNING"):
        rc = main(["decode", "--archive", str(archive), "--output", str(tmp_path / "d"), "--model", str(tiny_model_dir),
                   "--max-retries", "0", "-q"])
    assert rc == 1
    assert "1 part file(s) in the archive have no commit marker and are not decoded: part-stray.parquet" in caplog.text
    summary = json.loads((tmp_path / "d" / "_summary.json").read_text())["run"]
    [failed] = summary["units_failed"]
    assert failed["shard_id"] == "shard-000001" and "is not an archive part: it lacks the columns" in failed["error"]
    assert summary["units_done"] == 1


@pytest.mark.slow
def test_animations_keep_their_frame_count_in_the_archive(ray_cluster, tiny_model_dir, tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from tests.helpers import write_shard

    frames = [Image.fromarray(np.full((32, 48, 3), 40 * k, dtype=np.uint8)) for k in range(4)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    (tmp_path / "in").mkdir()
    write_shard(tmp_path / "in" / "s.tar", [{"__key__": "anim", "gif": buf.getvalue()}])
    assert main(["compress", "--input", str(tmp_path / "in" / "s.tar"), "--output", str(tmp_path / "a"),
                 "--model", str(tiny_model_dir), "-q"]) == 0
    [row] = pq.read_table(tmp_path / "a", columns=["key", "status", "frames"]).to_pylist()
    assert row == {"key": "anim", "status": "ok", "frames": 4}
