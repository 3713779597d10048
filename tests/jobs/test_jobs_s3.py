"""The compress and decode jobs end to end: local S3 (moto), local Ray with two logical GPUs."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from tests.helpers import make_shards

pytestmark = pytest.mark.slow


def _upload_shards(fs, bucket, tmp_path, n_shards=3, per_shard=4):
    keys = make_shards(tmp_path / "shards", n_shards, per_shard)
    for path in sorted((tmp_path / "shards").iterdir()):
        fs.put(str(path), f"{bucket}/in/{path.name}")
    return keys


def _archive_rows(fs, bucket, prefix="archive"):
    fs.invalidate_cache()
    rows = []
    for path in sorted(fs.glob(f"{bucket}/{prefix}/part-*.parquet")):
        with fs.open(path, "rb") as f:
            rows += pq.read_table(f).to_pylist()
    return rows


def test_compress_then_decode_s3_to_s3(s3, ray_cluster, tiny_model_dir, tmp_path):
    fs, bucket, endpoint = s3
    keys = _upload_shards(fs, bucket, tmp_path)
    assert main(["compress", "--input", f"s3://{bucket}/in/shard-{{000000..000002}}.tar", "--output",
                 f"s3://{bucket}/archive", "--model", str(tiny_model_dir), "--actors", "2", "--batch-size", "2", "-q"]) == 0
    rows = _archive_rows(fs, bucket)
    assert sorted(r["key"] for r in rows) == sorted(keys) and all(r["status"] == "ok" for r in rows)
    assert json.loads(rows[0]["meta_json"])["json"].startswith('{"caption"')
    markers = [json.loads(fs.cat(p)) for p in fs.glob(f"{bucket}/archive/_commits/part-*.stats.json")]
    gpu_ids = {tuple(m["worker"]["gpu_ids"]) for m in markers}
    assert gpu_ids <= {("0",), ("1",)}
    summary = json.loads(fs.cat(f"{bucket}/archive/_summary.json"))
    assert sorted(tuple(w["gpu_ids"]) for w in summary["run"]["workers"]) == [("0",), ("1",)]  # each actor its own GPU
    manifest = json.loads(fs.cat(f"{bucket}/archive/_manifest.json"))
    assert manifest["units_committed"] == 3 and manifest["settings"]["model_id"].startswith("UNTRAINED-")

    assert main(["decode", "--archive", f"s3://{bucket}/archive", "--output", f"s3://{bucket}/decoded",
                 "--model", str(tiny_model_dir), "--actors", "2", "-q"]) == 0
    import io
    import tarfile

    fs.invalidate_cache()
    members = {}
    for path in fs.glob(f"{bucket}/decoded/part-*.tar"):
        with tarfile.open(fileobj=io.BytesIO(fs.cat(path))) as tar:
            for m in tar.getmembers():
                members[m.name] = tar.extractfile(m).read()
    assert sorted(k for k in members if k.endswith(".png")) == sorted(f"{k}.png" for k in keys)
    original = {r["key"]: json.loads(r["meta_json"])["json"] for r in rows}
    assert all(members[f"{k}.json"].decode() == original[k] for k in keys)  # sidecars byte for byte


def test_exactly_once_when_an_actor_crashes_mid_shard(s3, ray_cluster, tiny_model_dir, tmp_path):
    fs, bucket, _ = s3
    keys = _upload_shards(fs, bucket, tmp_path)
    rc = main(["compress", "--input", f"s3://{bucket}/in/*.tar", "--output", f"s3://{bucket}/archive",
               "--model", str(tiny_model_dir), "--actors", "2", "--inject-crash", "shard-000001:2", "-q"])
    assert rc == 0
    rows = _archive_rows(fs, bucket)
    assert sorted(r["key"] for r in rows) == sorted(keys)  # nothing lost, nothing twice
    marker = json.loads(fs.cat(f"{bucket}/archive/_commits/part-shard-000001.stats.json"))
    assert marker["attempt"] == 1  # redone after the crash


def test_exactly_once_when_the_driver_is_interrupted_and_resumed(s3, ray_cluster, tiny_model_dir, tmp_path):
    fs, bucket, endpoint = s3
    keys = _upload_shards(fs, bucket, tmp_path, n_shards=4, per_shard=3)
    args = [sys.executable, "-m", "jobs.cli", "compress", "--input", f"s3://{bucket}/in/*.tar", "--output",
            f"s3://{bucket}/archive", "--model", str(tiny_model_dir), "--actors", "1", "--ray-address", ray_cluster, "-q"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # The one worker hangs inside the second shard, so the kill lands mid-job whatever this machine's speed.
    driver = subprocess.Popen(args + ["--inject-crash", "shard-000001:1:stall"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        fs.invalidate_cache()
        if fs.glob(f"{bucket}/archive/_commits/part-*.stats.json"):
            break
        time.sleep(0.2)
    driver.kill()
    driver.wait()
    fs.invalidate_cache()
    committed_before = len(fs.glob(f"{bucket}/archive/_commits/part-*.stats.json"))
    assert committed_before == 1, "the driver should have been stopped part way"
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{committed_before} already committed" in done.stdout
    rows = _archive_rows(fs, bucket)
    assert sorted(r["key"] for r in rows) == sorted(keys)
    # the bookkeeping is true on S3 after the resumed run (no stale listing cache), and adds up over both runs
    fs.invalidate_cache()
    manifest = json.loads(fs.cat(f"{bucket}/archive/_manifest.json"))
    summary = json.loads(fs.cat(f"{bucket}/archive/_summary.json"))
    assert manifest["units_committed"] == 4 and summary["archive"]["samples_ok"] == len(keys)
    index = [json.loads(line) for line in gzip.decompress(fs.cat(f"{bucket}/archive/_index.jsonl.gz")).splitlines()]
    assert sorted(s["shard_id"] for s in index) == [f"shard-00000{i}" for i in range(4)]
    assert not fs.glob(f"{bucket}/archive/_inprogress/*")  # every writer's record is gone
