from __future__ import annotations

import pytest

from pipelines import storage


def test_shard_ids_are_stems_in_one_folder_and_paths_across_folders():
    ids = storage.shard_ids(["s3://b/x/shard-000.tar", "s3://b/x/shard-001.tar"])
    assert list(ids.values()) == ["shard-000", "shard-001"]
    ids = storage.shard_ids(["/d/train/000.tar", "/d/val/000.tar"])
    assert list(ids.values()) == ["train__000", "val__000"]


def test_storage_options_from_env_keep_secrets_out_of_repr(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-secret-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    opts = storage.StorageOptions.from_env()
    assert opts.endpoint_url == "http://127.0.0.1:9" and opts.key == "AKIA-secret-id"
    assert "secret" not in repr(opts)
    kw = opts.fsspec_kwargs("s3")
    assert kw["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9" and kw["secret"] == "very-secret"
    assert opts.fsspec_kwargs("file") == {}


def test_open_atomic_leaves_nothing_on_error(tmp_path):
    fs, root = storage.filesystem(str(tmp_path), storage.StorageOptions())
    target = storage.join(root, "out.bin")
    with pytest.raises(RuntimeError):
        with storage.open_atomic(fs, target) as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    storage.write_bytes_atomic(fs, target, b"whole")
    assert (tmp_path / "out.bin").read_bytes() == b"whole"


def test_open_atomic_on_s3_never_shows_a_partial_object(s3):
    fs, bucket, endpoint = s3
    opts = storage.StorageOptions(endpoint_url=endpoint, key="testing", secret="testing", region="us-east-1")
    sfs, path = storage.filesystem(f"s3://{bucket}/x.bin", opts)
    with pytest.raises(RuntimeError):
        with storage.open_atomic(sfs, path) as f:
            f.write(b"x" * (6 << 20))  # past one multipart chunk
            raise RuntimeError("boom")
    sfs.invalidate_cache()
    assert not sfs.exists(path)


def test_canonical_urls_spell_one_file_one_way(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    absolute = str(tmp_path / "x" / "s.tar")
    assert storage.canonical_url("x/s.tar") == storage.canonical_url("./x/s.tar") == storage.canonical_url(f"file://{absolute}") == absolute
    assert storage.canonical_url("s3://bucket//a/b.tar") == "s3://bucket/a/b.tar"
