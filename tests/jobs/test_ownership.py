"""Jobs never delete what they did not write, and two runs on one output cannot corrupt it.

Local folders, local Ray with two logical GPUs. A second job is started while the first one is
stalled at the dangerous moment (its part written, its commit marker not yet) by the
fault-injection hook ``--inject-crash UNIT:0:stall``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from tests.helpers import make_shards

pytestmark = pytest.mark.slow


def _compress(shards, out, model, *extra) -> int:
    return main(["compress", "--input", str(shards / "*.tar"), "--output", str(out), "--model", str(model), "-q", *extra])


def _decode(archive, out, model, *extra) -> int:
    return main(["decode", "--archive", str(archive), "--output", str(out), "--model", str(model), "--format", "folder",
                 "-q", *extra])


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_foreign_folder_is_refused_and_nothing_in_it_is_deleted(ray_cluster, tiny_model_dir, tmp_path, capsys):
    make_shards(tmp_path / "in", 1, 2)
    out = tmp_path / "out"
    (out / "part-2023-holidays").mkdir(parents=True)
    (out / "part-2023-holidays" / "IMG_0001.png").write_bytes(b"holiday photo")
    (out / "part-00000-5f1c.snappy.parquet").write_bytes(b"spark output")
    (out / "part-users.tar").write_bytes(b"a user's tar")
    before = _tree(out)
    assert _compress(tmp_path / "in", out, tiny_model_dir) == 2
    err = capsys.readouterr().err
    assert "not an rdeic-archive output" in err and "part-2023-holidays/" in err and err.count("\n") == 1
    assert _tree(out) == before


def test_files_in_our_output_that_we_did_not_write_are_never_touched(ray_cluster, tiny_model_dir, tmp_path):
    make_shards(tmp_path / "in", 2, 2)
    out = tmp_path / "out"
    assert _compress(tmp_path / "in", out, tiny_model_dir) == 0
    (out / "part-extra.parquet").write_bytes(b"someone else's part")
    (out / "part-2023-holidays").mkdir()
    (out / "part-2023-holidays" / "IMG_0001.png").write_bytes(b"holiday photo")
    (out / ".part-x.parquet.tmp-1234abcd").write_bytes(b"looks like ours, is not")
    (out / "_commits" / "part-extra.stats.json.bak").write_bytes(b"a user's backup")
    make_shards(tmp_path / "in2", 1, 2, seed=5)
    (tmp_path / "in2" / "shard-000000.tar").rename(tmp_path / "in" / "shard-000009.tar")  # a new shard
    assert _compress(tmp_path / "in", out, tiny_model_dir) == 0
    assert (out / "part-extra.parquet").read_bytes() == b"someone else's part"
    assert (out / "part-2023-holidays" / "IMG_0001.png").read_bytes() == b"holiday photo"
    assert (out / ".part-x.parquet.tmp-1234abcd").exists() and (out / "_commits" / "part-extra.stats.json.bak").exists()
    summary = json.loads((out / "_summary.json").read_text())
    assert "part-extra.parquet" in summary["run"]["untracked_files"]


def _start_stalled(args: list[str], ray_address: str) -> subprocess.Popen:
    import signal

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # As from a terminal: a suite started in the background (`cmd &`, nohup) passes SIGINT on ignored, and
    # Python then never raises KeyboardInterrupt.
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", *args, "--ray-address", ray_address, "-q"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.1)
    assert path.exists(), f"{path} never appeared"


def _unit(path: Path):
    return _tree(path) if path.is_dir() else path.read_bytes()


def _consistent(out: Path, layout_suffix: str) -> None:
    """Every committed unit's data holds exactly what its marker counts."""
    for marker in (out / "_commits").glob("part-*.stats.json"):
        stats = json.loads(marker.read_text())
        data = out / stats["output"]
        if layout_suffix == ".parquet":
            assert pq.read_table(data).num_rows == stats["ok"] + stats["errors"], marker.name
        else:
            assert len(list(data.glob("*.png"))) == stats["ok"], marker.name


@pytest.mark.parametrize("kind", ["compress", "decode"])
def test_a_second_run_is_refused_while_the_first_is_mid_unit_then_takes_over(kind, ray_cluster, tiny_model_dir, tmp_path,
                                                                             capsys):
    make_shards(tmp_path / "in", 2, 3)
    archive = tmp_path / "archive"
    if kind == "compress":
        # stalled after its part is written, before its marker: the window that used to lose images
        out, suffix, stall = archive, ".parquet", ["--inject-crash", "shard-000001:0:stall"]
        args, run, source = ["compress", "--input", str(tmp_path / "in" / "*.tar"), "--output", str(out)], _compress, tmp_path / "in"
    else:
        assert _compress(tmp_path / "in", archive, tiny_model_dir) == 0
        # stalled with two of three images of a part written
        out, suffix, stall = tmp_path / "decoded", "", ["--inject-crash", "shard-000001:2:stall", "--batch-size", "1"]
        args, run, source = ["decode", "--archive", str(archive), "--output", str(out), "--format", "folder"], _decode, archive
    first = _start_stalled(args + ["--model", str(tiny_model_dir), "--actors", "1", "--lease-ttl", "4", *stall], ray_cluster)
    try:
        _wait_for(out / "_commits" / "part-shard-000000.stats.json", first)
        _wait_for(out / f"part-shard-000001{suffix}", first)
        time.sleep(0.5)  # let the first run reach its stall
        before = _unit(out / f"part-shard-000001{suffix}")
        assert run(source, out, tiny_model_dir) == 75
        assert "is in use by run" in capsys.readouterr().err
        assert not (out / "_commits" / "part-shard-000001.stats.json").exists()
        assert _unit(out / f"part-shard-000001{suffix}") == before  # the second run deleted nothing of the first's
    finally:
        first.kill()
        first.wait()
    # the first run is dead (same machine, pid gone): its lease is taken over, its leftovers cleaned by its record
    assert run(source, out, tiny_model_dir) == 0
    assert sorted(p.name for p in (out / "_commits").iterdir()) == ["part-shard-000000.stats.json", "part-shard-000001.stats.json"]
    _consistent(out, suffix)
    assert not any((out / "_inprogress").iterdir())
    assert not [p for p in out.rglob(".*tmp-*")]


def test_an_expired_lease_is_taken_over_with_a_message_and_a_live_one_only_with_break_lease(ray_cluster, tiny_model_dir,
                                                                                         tmp_path, caplog):
    from pipelines import lease, storage

    make_shards(tmp_path / "in", 1, 2)
    out = tmp_path / "out"
    assert _compress(tmp_path / "in", out, tiny_model_dir) == 0
    fs, root = storage.filesystem(str(out), storage.StorageOptions())
    live = lease.Lease(fs, root, "live-run", ttl=4.0)  # renewed every second by this (live) process
    live.acquire()
    live.start_heartbeat()
    try:
        assert _compress(tmp_path / "in", out, tiny_model_dir) == 75
        assert _compress(tmp_path / "in", out, tiny_model_dir, "--break-lease") == 0
    finally:
        live.stop_heartbeat()
    lease.Lease(fs, root, "stale-run", ttl=1.0).acquire(break_lease=True)  # never renewed
    with caplog.at_level("WARNING"):
        assert _compress(tmp_path / "in", out, tiny_model_dir) == 0
    assert "stale-run" in caplog.text and "stopped renewing it" in caplog.text


def test_ctrl_c_stops_cleanly_releases_the_lease_and_says_how_to_resume(ray_cluster, tiny_model_dir, tmp_path):
    import signal

    make_shards(tmp_path / "in", 2, 2)
    out = tmp_path / "out"
    run = _start_stalled(["compress", "--input", str(tmp_path / "in" / "*.tar"), "--output", str(out), "--model",
                          str(tiny_model_dir), "--actors", "1", "--inject-crash", "shard-000001:1:stall"], ray_cluster)
    _wait_for(out / "_commits" / "part-shard-000000.stats.json", run)
    run.send_signal(signal.SIGINT)
    assert run.wait(timeout=60) == 130
    err = run.stderr.read()
    assert "interrupted" in err and "rerun the same command to resume" in err and "Traceback" not in err
    assert json.loads((out / "_lease.json").read_text())["released"] is True
    assert _compress(tmp_path / "in", out, tiny_model_dir) == 0  # resumes at once, the lease being free
