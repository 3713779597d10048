"""JobOutput: ownership, cleanup by in-progress records only, the index, per-unit settings."""

from __future__ import annotations

import gzip
import json

import pytest

from pipelines import storage
from pipelines.archive import ARCHIVE, ShardStats
from pipelines.lease import LeaseBusy
from pipelines.manifest import INDEX, JobConfigMismatch, JobOutput, OutputRefused
from pipelines.ownership import Attempt

SETTINGS = {"model_id": "m@1", "codec_version": "c1", "max_pixels": 100}


def _output(root, settings=SETTINGS, run_id="run-a", kind="compress") -> JobOutput:
    fs, path = storage.filesystem(str(root), storage.StorageOptions())
    return JobOutput(fs, path, kind, settings, ARCHIVE, run_id, lease_ttl=1.0)


def _commit(root, unit: str, settings=SETTINGS, ok: int = 3) -> None:
    """A unit committed the way a worker does it: record, data, marker."""
    fs, path = storage.filesystem(str(root), storage.StorageOptions())
    attempt = Attempt(fs, path, unit, "", marker=ARCHIVE.marker(unit))
    attempt.begin([ARCHIVE.data(unit)])
    (root / ARCHIVE.data(unit)).write_bytes(b"parquet bytes")
    attempt.commit(ShardStats(unit, f"/src/{unit}.tar", ARCHIVE.data(unit), ok=ok, settings=settings,
                              files=[ARCHIVE.data(unit)]).to_json().encode())


def _finish(out: JobOutput) -> dict:
    from pipelines.report import summarize, totals

    return out.finish([], summarize("compress", out.run_id, "now", 0, [], [], 0, 0, []), totals)


def test_a_new_output_is_ours_from_the_start(tmp_path):
    out = _output(tmp_path / "out")
    assert out.open() == {}
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["format"] == "rdeic-archive-output" and manifest["settings"] == SETTINGS
    _finish(out)
    assert _output(tmp_path / "out", run_id="run-b").open() == {}  # its own folder is not "foreign"


def test_only_what_a_record_names_is_cleaned(tmp_path):
    root = tmp_path / "out"
    out = _output(root)
    out.open()
    _commit(root, "a")
    fs, path = storage.filesystem(str(root), storage.StorageOptions())
    dead = Attempt(fs, path, "b", "run-a", marker=ARCHIVE.marker("b"))  # died after writing its part
    dead.begin([ARCHIVE.data("b")])
    (root / "part-b.parquet").write_bytes(b"half a unit")
    (root / f".part-b.parquet.tmp-{dead.token}").write_bytes(b"its temporary file")
    (root / "part-c.parquet").write_bytes(b"no record: not ours")
    (root / ".part-d.parquet.tmp-1234").write_bytes(b"not ours either")
    _finish(out)
    again = _output(root, run_id="run-b")
    committed = again.open()
    assert list(committed) == ["a"] and committed["a"].ok == 3 and committed["a"].skipped
    names = sorted(p.name for p in root.iterdir())
    assert "part-b.parquet" not in names and f".part-b.parquet.tmp-{dead.token}" not in names
    assert {"part-a.parquet", "part-c.parquet", ".part-d.parquet.tmp-1234"} <= set(names)
    assert again.untracked == [".part-d.parquet.tmp-1234", "part-c.parquet"]
    assert list((root / "_inprogress").iterdir()) == [(root / "_inprogress" / again.control.record.name)]


def test_the_index_replaces_reading_markers_and_is_rebuilt_when_damaged(tmp_path, monkeypatch):
    root = tmp_path / "out"
    out = _output(root)
    out.open()
    for unit in ("a", "b", "c"):
        _commit(root, unit)
    _finish(out)  # writes the index
    lines = gzip.decompress((root / INDEX).read_bytes()).decode().splitlines()
    assert [json.loads(line)["shard_id"] for line in lines] == ["a", "b", "c"]
    reads = []
    real = JobOutput._read_markers
    monkeypatch.setattr(JobOutput, "_read_markers", lambda self, units: reads.extend(units) or real(self, units))
    again = _output(root, run_id="run-b")
    assert sorted(again.open()) == ["a", "b", "c"] and reads == []
    _finish(again)
    _commit(root, "d")  # committed after the last finish: its marker is read, once
    (root / INDEX).write_bytes(b"\x1f\x8b damaged")
    third = _output(root, run_id="run-c")
    assert sorted(third.open()) == ["a", "b", "c", "d"] and sorted(reads) == ["a", "b", "c", "d"]


def test_a_bad_marker_is_named(tmp_path):
    root = tmp_path / "out"
    out = _output(root)
    out.open()
    _commit(root, "a")
    _finish(out)
    (root / INDEX).unlink()
    (root / "_commits" / "part-a.stats.json").write_text('{"shard_id": "a", "unknown_field": 1, "source": "s", "output": "o"}')
    with pytest.raises(OutputRefused, match=r"part-a\.stats\.json: not a commit marker of this version \(unknown fields"):
        _output(root, run_id="run-b").open()


def test_outputs_of_other_versions_and_kinds_are_refused(tmp_path):
    root = tmp_path / "old"
    root.mkdir()
    (root / "_manifest.json").write_text(json.dumps({"kind": "compress", "fingerprint": "abc", "config": {}}))
    with pytest.raises(OutputRefused, match="written by rdeic-archive 0.1"):
        _output(root).open()
    _output(tmp_path / "dec", kind="decode").open()
    with pytest.raises(OutputRefused, match="output of a decode job, not of compress"):
        _output(tmp_path / "dec", run_id="x").open()


def test_settings_are_compared_per_unit(tmp_path):
    root = tmp_path / "out"
    out = _output(root)
    out.open()
    _commit(root, "a")
    _commit(root, "b", settings={**SETTINGS, "model_id": "m@0"})
    _finish(out)
    other = _output(root, run_id="run-b")
    other.open()
    with pytest.raises(JobConfigMismatch, match=r"part-b\.parquet .* model_id=m@0, this run has model_id=m@1"):
        other.check_settings({"a", "b"}, overwrite=False)
    with pytest.raises(JobConfigMismatch, match="not among this run's inputs"):
        other.check_settings({"a"}, overwrite=True)
    assert other.check_settings({"a", "b"}, overwrite=True) == ["b"]
    other.uncommit(["b"])
    assert not (root / "part-b.parquet").exists() and not (root / "_commits" / "part-b.stats.json").exists()
    assert (root / "part-a.parquet").exists() and sorted(other.committed) == ["a"]


def test_one_writer_at_a_time(tmp_path):
    first = _output(tmp_path / "out")
    first.open()
    with pytest.raises(LeaseBusy, match="is in use by run run-a"):
        _output(tmp_path / "out", run_id="run-b").open()
    first.close()
    _output(tmp_path / "out", run_id="run-b").open()


def test_uncommitting_a_folder_unit_leaves_no_folder_behind(tmp_path):
    from pipelines.archive import Layout

    folders = Layout("part-", "")
    root = tmp_path / "out"
    fs, path = storage.filesystem(str(root), storage.StorageOptions())
    out = JobOutput(fs, path, "decode", SETTINGS, folders, "run-a", lease_ttl=1.0)
    out.open()
    attempt = Attempt(fs, path, "a", "", marker=folders.marker("a"))
    files = ["part-a/x.png", "part-a/sub/y.png"]
    attempt.begin(files, ["part-a", "part-a/sub"])
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_bytes(b"png")
    (root / "part-a" / "user-notes.txt").write_text("not ours")
    attempt.commit(ShardStats("a", "src", "part-a", ok=2, settings={**SETTINGS, "model_id": "old"}, files=files).to_json().encode())
    _finish(out)
    again = JobOutput(fs, path, "decode", SETTINGS, folders, "run-b", lease_ttl=1.0)
    again.open()
    again.uncommit(again.check_settings({"a"}, overwrite=True))
    assert sorted(str(p.relative_to(root)) for p in (root / "part-a").rglob("*")) == ["part-a/user-notes.txt"]


def test_records_and_markers_read_back_never_name_files_outside_their_unit(tmp_path):
    root = tmp_path / "out"
    (tmp_path / "precious.txt").write_text("outside the output")
    out = _output(root)
    out.open()
    _commit(root, "a", settings={**SETTINGS, "model_id": "old"})
    _finish(out)
    # a forged record naming a file outside the output
    (root / "_inprogress" / "b~forged.json").write_text(json.dumps(
        {"unit": "b", "run_id": "x", "attempt": 0, "token": "forged", "paths": ["../precious.txt"], "temps": [], "dirs": []}))
    with pytest.raises(ValueError, match="is not a path inside the output"):
        _output(root, run_id="run-b").open()
    assert (tmp_path / "precious.txt").exists()
    (root / "_inprogress" / "b~forged.json").unlink()
    # a marker whose file list names another unit's data: --overwrite must not delete it
    (root / "part-c.parquet").write_bytes(b"someone else's")
    marker = json.loads((root / "_commits" / "part-a.stats.json").read_text())
    (root / "_commits" / "part-a.stats.json").write_text(json.dumps({**marker, "files": ["part-c.parquet"]}))
    again = _output(root, run_id="run-c")
    again.open()
    with pytest.raises(OutputRefused, match="which is not a's to delete"):
        again.uncommit(again.check_settings({"a"}, overwrite=True))
    assert (root / "part-c.parquet").read_bytes() == b"someone else's"


def test_a_writer_whose_run_lost_the_lease_leaves_its_files_to_the_new_holder(tmp_path):
    """A worker of a dead driver that aborts late (Ray stops it with SystemExit) must not delete what the
    run now holding the output may already be rewriting: it leaves its files and its record alone."""
    root = tmp_path / "out"
    old = _output(root, run_id="run-old")
    old.open()
    fs, path = storage.filesystem(str(root), storage.StorageOptions())
    stale = Attempt(fs, path, "b", "run-old", marker=ARCHIVE.marker("b"))
    stale.begin([ARCHIVE.data("b")])
    (root / "part-b.parquet").write_bytes(b"the old attempt's part")
    old.lease.stop_heartbeat()
    new = _output(root, run_id="run-new")
    new.open(break_lease=True)  # the new run takes over and cleans by the old record
    assert not (root / "part-b.parquet").exists()
    (root / "part-b.parquet").write_bytes(b"the new attempt's part")  # as if the new run were rewriting it
    stale.abort()
    assert (root / "part-b.parquet").read_bytes() == b"the new attempt's part"
    new.close()


def test_cleaning_a_record_that_another_cleaner_removes_meanwhile_is_not_an_error(tmp_path, monkeypatch):
    from pipelines import ownership

    root = tmp_path / "out"
    fs, path = storage.filesystem(str(root), storage.StorageOptions())
    attempt = Attempt(fs, path, "b", "", marker=ARCHIVE.marker("b"))
    attempt.begin([ARCHIVE.data("b")])
    (root / "part-b.parquet").write_bytes(b"half a unit")
    real_rm = fs.rm

    def racing_rm(target, *a, **k):  # the other cleaner got there first, every time
        real_rm(target, *a, **k)
        raise FileNotFoundError(target)

    monkeypatch.setattr(fs, "rm", racing_rm)
    assert ownership.clean(fs, path, attempt.record.name, committed=False) is not None
    assert not (root / "part-b.parquet").exists()


def test_units_written_with_the_previous_bitstream_container_still_match(tmp_path):
    """The container version is not a setting: every decoder reads every version, so an archive written
    with bitstream/1 grows with bitstream/2 parts; the numerics part of the version still must match."""
    root = tmp_path / "out"
    old = {**SETTINGS, "codec_version": "rdeic-archive/0.2 bitstream/1"}
    out = _output(root, settings=old)
    out.open()
    _commit(root, "a", settings=old)
    _finish(out)
    newer = _output(root, settings={**SETTINGS, "codec_version": "rdeic-archive/0.2 bitstream/2"}, run_id="run-b")
    newer.open()
    assert newer.check_settings({"b"}, overwrite=False) == []
    newer.close()
    other = _output(root, settings={**SETTINGS, "codec_version": "rdeic-archive/0.3 bitstream/2"}, run_id="run-c")
    other.open()
    with pytest.raises(JobConfigMismatch, match="codec_version"):
        other.check_settings({"b"}, overwrite=False)
    other.close()
