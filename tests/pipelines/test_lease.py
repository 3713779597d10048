"""The output lease: conditional create and compare-and-swap, on a local folder and on S3 (moto)."""

from __future__ import annotations

import json
import time

import pytest

from pipelines import lease, storage


def _fs(kind, tmp_path, s3):
    if kind == "local":
        return storage.filesystem(str(tmp_path / "out"), storage.StorageOptions())
    fs, bucket, endpoint = s3
    opts = storage.StorageOptions(endpoint_url=endpoint, key="testing", secret="testing", region="us-east-1")
    return storage.filesystem(f"s3://{bucket}/out", opts)


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    s3 = request.getfixturevalue("s3") if request.param == "s3" else None
    return _fs(request.param, tmp_path, s3)


def test_conditional_writes(where):
    fs, root = where
    path = storage.join(root, "f.json")
    storage.write_if(fs, path, b"one", None)
    with pytest.raises(storage.PreconditionFailed):
        storage.write_if(fs, path, b"two", None)
    data, version = storage.read_versioned(fs, path)
    assert data == b"one"
    storage.write_if(fs, path, b"three", version)
    with pytest.raises(storage.PreconditionFailed):
        storage.write_if(fs, path, b"four", version)  # someone wrote in between
    assert storage.read_bytes(fs, path) == b"three"


def test_one_holder_renewal_release_and_takeover(where, caplog):
    fs, root = where
    a = lease.Lease(fs, root, "run-a", ttl=60)
    a.acquire()
    lease.check_held(fs, root, "run-a")
    with pytest.raises(lease.LeaseBusy, match="in use by run run-a"):
        lease.Lease(fs, root, "run-b", ttl=60).acquire(max_wait=0)
    with pytest.raises(lease.LeaseLost):
        lease.check_held(fs, root, "run-b")
    a.renew()
    a.release()
    b = lease.Lease(fs, root, "run-b", ttl=0.5)
    b.acquire()  # released: free
    time.sleep(0.7)
    c = lease.Lease(fs, root, "run-c", ttl=60)
    with caplog.at_level("WARNING"):
        c.acquire()  # b stopped renewing: taken over, with a message naming b
    assert "run run-b" in caplog.text and "stopped renewing" in caplog.text
    with pytest.raises(lease.LeaseLost, match="taken over by run run-c"):
        b.renew()
    assert b.lost.is_set()
    b.release()  # lost: must not touch c's lease
    lease.check_held(fs, root, "run-c")


def test_a_dead_holder_on_this_machine_is_taken_over_at_once(tmp_path):
    fs, root = storage.filesystem(str(tmp_path / "out"), storage.StorageOptions())
    a = lease.Lease(fs, root, "run-a", ttl=3600)
    a.acquire()
    body = json.loads((tmp_path / "out" / "_lease.json").read_text())
    body["pid"] = 2 ** 22 + 12345  # no such process
    (tmp_path / "out" / "_lease.json").write_text(json.dumps(body))
    lease.Lease(fs, root, "run-b").acquire()
    lease.check_held(fs, root, "run-b")


def test_a_lease_in_force_is_watched_until_it_is_renewed_or_lapses(tmp_path):
    fs, root = storage.filesystem(str(tmp_path / "out"), storage.StorageOptions())
    live = lease.Lease(fs, root, "live", ttl=0.8)
    live.acquire()
    live.start_heartbeat()  # renews every 0.2 s
    t0 = time.monotonic()
    with pytest.raises(lease.LeaseBusy, match="keeps renewing"):
        lease.Lease(fs, root, "second").acquire()
    assert time.monotonic() - t0 < 2
    live.stop_heartbeat()  # its driver died elsewhere: the lease lapses and is taken
    lease.Lease(fs, root, "retry").acquire()
    lease.check_held(fs, root, "retry")


def test_break_lease_takes_a_live_one(tmp_path):
    fs, root = storage.filesystem(str(tmp_path / "out"), storage.StorageOptions())
    lease.Lease(fs, root, "run-a").acquire()
    lease.Lease(fs, root, "run-b").acquire(break_lease=True)
    lease.check_held(fs, root, "run-b")


@pytest.mark.parametrize("body", ['{"run_id": "x"}', "not json", '{"run_id": "x", "host": "h", "pid": "1", "boot_id": "b", '
                                  '"command": "c", "acquired_at": 0, "expires_at": 1e30, "released": false}',
                                  '{"run_id": "x", "host": "h", "pid": -1, "boot_id": "b", "command": "c", '
                                  '"acquired_at": 0, "expires_at": 1e30, "released": false}'])
def test_a_malformed_lease_file_is_taken_over_not_trusted(tmp_path, body, caplog):
    fs, root = storage.filesystem(str(tmp_path / "out"), storage.StorageOptions())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_lease.json").write_text(body)
    with caplog.at_level("WARNING"):
        lease.Lease(fs, root, "run-b").acquire(max_wait=0)
    lease.check_held(fs, root, "run-b")
    assert "unreadable" in caplog.text
