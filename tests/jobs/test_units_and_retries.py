"""What ends as a row, what fails a unit, how retries are charged, and archives that grow.

Local folders, local Ray with two logical GPUs (conftest.ray_cluster), the tiny random model.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipelines.reasons import CODES
from tests.helpers import make_shards

pytestmark = pytest.mark.slow


def _compress(inputs, out, model, *extra) -> int:
    inputs = inputs if isinstance(inputs, list) else [str(inputs)]
    return main(["compress", "--input", *inputs, "--output", str(out), "--model", str(model), "-q", *extra])


def _summary(out: Path) -> dict:
    return json.loads((out / "_summary.json").read_text())


def _markers(out: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((out / "_commits").glob("*.stats.json"))}


def test_empty_or_unreadable_shards_fail_and_a_valid_empty_tar_commits_with_a_warning(ray_cluster, tiny_model_dir, tmp_path):
    make_shards(tmp_path / "in", 1, 2)
    (tmp_path / "in" / "zero.tar").write_bytes(b"")  # still being written
    (tmp_path / "in" / "error-page.tar").write_bytes(b"<!DOCTYPE html><html><body>503 Service Unavailable</body></html>")
    buf = io.BytesIO()
    tarfile.open(fileobj=buf, mode="w").close()
    (tmp_path / "in" / "empty.tar").write_bytes(buf.getvalue())
    out = tmp_path / "out"
    assert _compress(str(tmp_path / "in" / "*.tar"), out, tiny_model_dir, "--max-retries", "1") == 1
    markers = _markers(out)
    assert sorted(markers) == ["part-empty.stats.json", "part-shard-000000.stats.json"]
    assert "without any member" in markers["part-empty.stats.json"]["warning"]
    failed = {f["shard_id"]: f for f in _summary(out)["run"]["units_failed"]}
    assert sorted(failed) == ["error-page", "zero"] and all(f["attempts"] == 2 for f in failed.values())
    assert "empty" in failed["zero"]["error"] and "not a tar" in failed["error-page"]["error"]


def test_a_sick_worker_fails_the_attempt_and_is_replaced(ray_cluster, tiny_model_dir, tmp_path):
    make_shards(tmp_path / "in", 1, 2)
    out = tmp_path / "out"
    # one worker; shard 0 hits a device error on its first two attempts: the worker is replaced after the second
    assert _compress(str(tmp_path / "in" / "*.tar"), out, tiny_model_dir, "--actors", "1",
                     "--inject-crash", "shard-000000:1:fail:2") == 0
    marker = _markers(out)["part-shard-000000.stats.json"]
    assert marker["attempt"] == 2 and marker["errors"] == 0 and marker["ok"] == 2
    assert len({w["pid"] for w in _summary(out)["run"]["workers"]}) == 2


def test_a_unit_that_keeps_failing_is_never_committed_and_the_job_fails(ray_cluster, tiny_model_dir, tmp_path, capsys):
    make_shards(tmp_path / "in", 2, 2)
    out = tmp_path / "out"
    assert _compress(str(tmp_path / "in" / "*.tar"), out, tiny_model_dir, "--max-retries", "1",
                     "--inject-crash", "shard-000000:1:fail:9") == 1
    assert sorted(_markers(out)) == ["part-shard-000001.stats.json"] and not (out / "part-shard-000000.parquet").exists()
    assert "injected device failure" in _summary(out)["run"]["units_failed"][0]["error"]
    assert "rerun the same command" in capsys.readouterr().err
    assert _compress(str(tmp_path / "in" / "*.tar"), out, tiny_model_dir) == 0  # the re-run retries it


def test_decoding_with_another_model_is_a_job_failure_not_an_empty_success(ray_cluster, tiny_model_dir, tmp_path):
    from rdeic.weights import init_model, save_model

    other = tmp_path / "other-model"
    save_model(init_model("tiny", seed=7), other)  # same name, other weights
    make_shards(tmp_path / "in", 1, 2)
    # an archive with no manifest model to compare with up front: the workers must catch it
    assert _compress(str(tmp_path / "in" / "*.tar"), tmp_path / "a", tiny_model_dir) == 0
    (tmp_path / "a" / "_manifest.json").unlink()
    rc = main(["decode", "--archive", str(tmp_path / "a"), "--output", str(tmp_path / "d"), "--model", str(other),
               "--max-retries", "0", "-q"])
    assert rc == 1
    assert not list((tmp_path / "d" / "_commits").glob("*.json"))
    assert "was written with model" in _summary(tmp_path / "d")["run"]["units_failed"][0]["error"]


def test_decoding_with_another_model_is_refused_at_once_when_the_manifest_says_so(ray_cluster, tiny_model_dir, tmp_path, capsys):
    from rdeic.weights import init_model, save_model

    other = tmp_path / "other-model"
    save_model(init_model("tiny", seed=7), other)
    make_shards(tmp_path / "in", 1, 1)
    assert _compress(str(tmp_path / "in" / "*.tar"), tmp_path / "a", tiny_model_dir) == 0
    rc = main(["decode", "--archive", str(tmp_path / "a"), "--output", str(tmp_path / "d"), "--model", str(other), "-q"])
    assert rc == 2 and "the archive was written with model" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_archives_grow_whatever_the_spelling_of_the_inputs(ray_cluster, tiny_model_dir, tmp_path, monkeypatch):
    make_shards(tmp_path / "in", 2, 2)
    monkeypatch.chdir(tmp_path)
    assert _compress("in/*.tar", "archive", tiny_model_dir) == 0
    make_shards(tmp_path / "more", 1, 2, seed=9)
    (tmp_path / "more" / "shard-000000.tar").rename(tmp_path / "in" / "shard-000002.tar")
    # another spelling of the same shards, plus one new shard named explicitly
    assert _compress(["./in/shard-{000000..000001}.tar", str(tmp_path / "in" / "shard-000002.tar")], "archive", tiny_model_dir) == 0
    run = _summary(tmp_path / "archive")["run"]
    assert (run["units_done"], run["units_already_committed"]) == (1, 2)
    assert _summary(tmp_path / "archive")["archive"]["samples_ok"] == 6
    rows = pq.read_table(tmp_path / "archive", columns=["source_shard", "key"]).to_pylist()
    assert len({(r["source_shard"], r["key"]) for r in rows}) == len(rows) == 6  # nothing twice
    assert {r["source_shard"] for r in rows} == {str(tmp_path / "in" / f"shard-00000{i}.tar") for i in range(3)}


def test_settings_are_checked_per_part_and_overwrite_rewrites_only_this_runs_parts(ray_cluster, tiny_model_dir, tmp_path,
                                                                                 capsys, caplog):
    make_shards(tmp_path / "in", 2, 2)
    out = tmp_path / "out"
    assert _compress(str(tmp_path / "in" / "*.tar"), out, tiny_model_dir) == 0
    (out / "part-user-notes.txt").write_text("mine")
    assert _compress(str(tmp_path / "in" / "*.tar"), out, tiny_model_dir, "--max-pixels", "100000") == 2
    err = capsys.readouterr().err
    assert "max_pixels=auto" in err and "max_pixels=100000" in err and "--overwrite" in err
    # --overwrite with only one of the two shards cannot make the archive whole: refused, nothing deleted
    assert _compress(str(tmp_path / "in" / "shard-000000.tar"), out, tiny_model_dir, "--max-pixels", "100000",
                     "--overwrite") == 2
    assert "not among this run's inputs" in capsys.readouterr().err
    assert len(_markers(out)) == 2
    with caplog.at_level("WARNING"):
        assert _compress(str(tmp_path / "in" / "*.tar"), out, tiny_model_dir, "--max-pixels", "100000", "--overwrite") == 0
    assert caplog.text.count("rewriting part-shard-") == 2
    assert all(m["settings"]["max_pixels"] == 100000 for m in _markers(out).values())
    assert (out / "part-user-notes.txt").read_text() == "mine"
    assert sorted(_summary(out)["run"]["units_rewritten"]) == ["shard-000000", "shard-000001"]


def test_resume_reads_no_marker_that_the_index_holds_and_summaries_accumulate(ray_cluster, tiny_model_dir, tmp_path,
                                                                            monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    make_shards(tmp_path / "in", 3, 2)
    out = tmp_path / "out"
    assert _compress(str(tmp_path / "in" / "*.tar"), out, tiny_model_dir) == 0
    reads = []
    for name in ("open", "cat_file"):
        original = getattr(LocalFileSystem, name)

        def counting(self, path, *a, _original=original, **kw):
            if "_commits" in str(path):
                reads.append(path)
            return _original(self, path, *a, **kw)

        monkeypatch.setattr(LocalFileSystem, name, counting)
    assert _compress(str(tmp_path / "in" / "*.tar"), out, tiny_model_dir) == 0
    assert reads == []  # the driver read the index, not 3 markers (twice)
    whole = _summary(out)["archive"]
    assert whole["samples_ok"] == 6 and whole["units_committed"] == 3  # a no-op re-run does not zero the summary
    assert _summary(out)["run"]["samples_ok"] == 0


def test_a_damaged_marker_is_named_not_a_traceback(ray_cluster, tiny_model_dir, tmp_path, capsys):
    make_shards(tmp_path / "in", 2, 2)
    out = tmp_path / "out"
    assert _compress(str(tmp_path / "in" / "*.tar"), out, tiny_model_dir) == 0
    (out / "_index.jsonl.gz").unlink(missing_ok=True)  # so that the markers are read again
    (out / "_commits" / "part-shard-000001.stats.json").write_text('{"shard_id": "shard-000001", "surprise": 1')
    assert _compress(str(tmp_path / "in" / "*.tar"), out, tiny_model_dir) == 2
    err = capsys.readouterr().err
    assert "part-shard-000001.stats.json" in err and "not valid JSON" in err and "Traceback" not in err


def test_error_reasons_are_stable_codes(ray_cluster, tiny_model_dir, tmp_path):
    from tests.helpers import write_shard

    (tmp_path / "in").mkdir()
    write_shard(tmp_path / "in" / "s.tar", [{"__key__": "a", "jpg": b"not a jpeg"}, {"__key__": "b", "txt": b"no image"},
                                           {"__key__": "c", "jpg": b"also not a jpeg, other bytes"}])
    assert _compress(str(tmp_path / "in" / "s.tar"), tmp_path / "out", tiny_model_dir) == 0
    reasons = _summary(tmp_path / "out")["archive"]["error_reasons"]
    assert reasons == {"unrecognised_image": 2, "no_image": 1} and set(reasons) <= set(CODES)
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert sorted(r["error_code"] for r in rows) == ["no_image", "unrecognised_image", "unrecognised_image"]


def test_device_cpu_and_more_actors_than_gpus(ray_cluster, tiny_model_dir, tmp_path):
    make_shards(tmp_path / "in", 3, 1)
    assert _compress(str(tmp_path / "in" / "*.tar"), tmp_path / "cpu", tiny_model_dir, "--device", "cpu", "--actors", "2") == 0
    workers = _summary(tmp_path / "cpu")["run"]["workers"]  # those that started before the work was done
    assert workers and all(w["gpu_ids"] == [] and w["device"] == "cpu" for w in workers)
    # three GPU workers on two GPUs: work starts with the two that fit; the third never holds it up
    assert _compress(str(tmp_path / "in" / "*.tar"), tmp_path / "gpu", tiny_model_dir, "--actors", "3",
                     "--start-timeout", "120") == 0
    gpus = [w["gpu_ids"][0] for w in _summary(tmp_path / "gpu")["run"]["workers"]]
    assert gpus and len(gpus) == len(set(gpus)) and set(gpus) <= {"0", "1"}


def test_device_cuda_without_cuda_is_one_line(ray_cluster, tiny_model_dir, tmp_path, capsys):
    make_shards(tmp_path / "in", 1, 1)
    assert _compress(str(tmp_path / "in" / "*.tar"), tmp_path / "out", tiny_model_dir, "--device", "cuda") == 1
    err = capsys.readouterr().err
    assert "no CUDA device is visible" in err and err.count("\n") == 1


def test_coder_processes_beside_the_model_write_the_same_archive(ray_cluster, tiny_model_dir, tmp_path):
    """A worker with a coder process (one more CPU) writes the bitstreams a worker coding inline writes,
    and decodes them to the same pixels."""
    make_shards(tmp_path / "in", 2, 3)
    shards = str(tmp_path / "in" / "*.tar")
    assert _compress(shards, tmp_path / "inline", tiny_model_dir, "--actors", "1") == 0
    assert _compress(shards, tmp_path / "pooled", tiny_model_dir, "--actors", "1", "--coder-processes", "1") == 0
    assert [w["coder_processes"] for w in _summary(tmp_path / "inline")["run"]["workers"]] == [0]
    assert [w["coder_processes"] for w in _summary(tmp_path / "pooled")["run"]["workers"]] == [1]

    def streams(out: Path) -> dict:
        rows = [r for p in sorted(out.glob("**/*.parquet")) for r in pq.read_table(p).to_pylist()]
        return {r["key"]: r["bitstream"] for r in rows}

    assert streams(tmp_path / "pooled") == streams(tmp_path / "inline") != {}
    for name, extra in (("dec-inline", ()), ("dec-pooled", ("--coder-processes", "1"))):
        assert main(["decode", "--archive", str(tmp_path / "pooled"), "--output", str(tmp_path / name), "--format", "folder",
                     "--model", str(tiny_model_dir), "--actors", "1", "--steps", "1", "-q", *extra]) == 0
    decoded = {p.name: p.read_bytes() for p in sorted((tmp_path / "dec-inline").glob("**/*.png"))}
    assert decoded and decoded == {p.name: p.read_bytes() for p in sorted((tmp_path / "dec-pooled").glob("**/*.png"))}


def test_coder_processes_below_zero_is_one_line(tiny_model_dir, tmp_path, capsys):
    assert _compress(str(tmp_path / "in"), tmp_path / "out", tiny_model_dir, "--coder-processes", "-1") == 2
    err = capsys.readouterr().err
    assert "--coder-processes must be at least 0" in err and err.count("\n") == 1
