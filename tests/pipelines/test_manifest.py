"""Resuming: committed units are kept, leftovers removed, another config refused."""

from __future__ import annotations

import pytest

from pipelines import storage
from pipelines.archive import ShardStats
from pipelines.manifest import JobConfigMismatch, JobOutput, Layout


def _output(tmp_path, config):
    fs, root = storage.filesystem(str(tmp_path / "out"), storage.StorageOptions())
    return JobOutput(fs, root, "compress", config, Layout("part-", ".parquet"))


def test_resume_keeps_committed_and_removes_leftovers(tmp_path):
    out = _output(tmp_path, {"model_id": "m@1"})
    assert out.prepare(overwrite=False) == {}
    root = tmp_path / "out"
    (root / "part-a.parquet").write_bytes(b"committed")
    (root / "_commits").mkdir()
    (root / "_commits" / "part-a.stats.json").write_text(ShardStats("a", "src", "part-a.parquet", ok=3).to_json())
    (root / "part-b.parquet").write_bytes(b"no marker: leftover")
    (root / ".part-c.parquet.tmp-1234").write_bytes(b"half written")
    (root / "notes.txt").write_text("not ours")
    committed = _output(tmp_path, {"model_id": "m@1"}).prepare(overwrite=False)
    assert list(committed) == ["a"] and committed["a"].ok == 3 and committed["a"].skipped
    assert sorted(p.name for p in root.iterdir()) == ["_commits", "_manifest.json", "notes.txt", "part-a.parquet"]


def test_other_config_refused_unless_overwrite(tmp_path):
    _output(tmp_path, {"model_id": "m@1"}).prepare(overwrite=False)
    (tmp_path / "out" / "part-a.parquet").write_bytes(b"x")
    (tmp_path / "out" / "_commits").mkdir()
    (tmp_path / "out" / "_commits" / "part-a.stats.json").write_text(ShardStats("a", "s", "o").to_json())
    with pytest.raises(JobConfigMismatch, match="--overwrite"):
        _output(tmp_path, {"model_id": "m@2"}).prepare(overwrite=False)
    assert _output(tmp_path, {"model_id": "m@2"}).prepare(overwrite=True) == {}
    assert not (tmp_path / "out" / "part-a.parquet").exists() and not (tmp_path / "out" / "_commits").exists()
