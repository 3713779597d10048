"""Model ids without downloading weights, and the URL-keyed model cache, on a local S3 server."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipelines.modelcache import localize_model, remote_model_id
from pipelines.storage import StorageOptions, filesystem
from rdeic.errors import ModelFormatError
from rdeic.modeldir import model_id_of

ID_FILE = "model_id.json"


def upload(fs, local: Path, remote: str, skip: tuple[str, ...] = ()) -> None:
    for f in sorted(local.iterdir()):
        if f.is_file() and f.name not in skip:
            fs.put(str(f), f"{remote}/{f.name}")


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    from rdeic.weights import init_model, save_model

    out = tmp_path_factory.mktemp("models") / "other"
    save_model(init_model("tiny", seed=1), out)
    return out


def test_local_model_id_and_path(tiny_model_dir):
    opts = StorageOptions()
    assert remote_model_id(str(tiny_model_dir), opts) == str(model_id_of(tiny_model_dir))
    assert localize_model(f"file://{tiny_model_dir}", opts) == str(tiny_model_dir)


def test_remote_model_id_reads_only_the_id_file_and_config(s3, tiny_model_dir, tmp_path):
    fs, bucket, _ = s3
    upload(fs, tiny_model_dir, f"{bucket}/m", skip=("model.safetensors", "entropy_tables.safetensors"))
    model_id = remote_model_id(f"s3://{bucket}/m", StorageOptions.from_env())
    assert model_id == str(model_id_of(tiny_model_dir))


def test_cache_is_reused_while_the_remote_id_is_unchanged(s3, tiny_model_dir, tmp_path):
    fs, bucket, _ = s3
    upload(fs, tiny_model_dir, f"{bucket}/m")
    url, opts = f"s3://{bucket}/m", StorageOptions.from_env()
    first = Path(localize_model(url, opts, cache_root=str(tmp_path)))
    assert model_id_of(first) == model_id_of(tiny_model_dir)
    (first / "marker").touch()
    assert localize_model(url, opts, cache_root=str(tmp_path)) == str(first) and (first / "marker").exists()


def test_cache_is_refreshed_when_the_model_at_the_url_is_replaced(s3, tiny_model_dir, other_model_dir, tmp_path):
    from rdeic.weights import load_model

    fs, bucket, _ = s3
    url, opts = f"s3://{bucket}/m", StorageOptions.from_env()
    upload(fs, tiny_model_dir, f"{bucket}/m")
    first = localize_model(url, opts, cache_root=str(tmp_path))
    upload(fs, other_model_dir, f"{bucket}/m")
    assert remote_model_id(url, opts) == str(model_id_of(other_model_dir))
    again = localize_model(url, opts, cache_root=str(tmp_path))
    assert again == first and load_model(again)[1] == model_id_of(other_model_dir)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [Path(first).name]  # no leftovers


def test_missing_remote_file_leaves_nothing_in_the_cache(s3, tiny_model_dir, tmp_path):
    fs, bucket, _ = s3
    upload(fs, tiny_model_dir, f"{bucket}/m", skip=("entropy_tables.safetensors",))
    url = f"s3://{bucket}/m"
    with pytest.raises(ModelFormatError, match=rf"{url}.*entropy_tables.safetensors") as info:
        localize_model(url, StorageOptions.from_env(), cache_root=str(tmp_path))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").iterdir())


def test_remote_model_without_id_file_is_downloaded_once_to_compute_it(s3, tiny_model_dir, tmp_path, caplog, monkeypatch):
    fs, bucket, _ = s3
    upload(fs, tiny_model_dir, f"{bucket}/old", skip=(ID_FILE,))
    url, opts = f"s3://{bucket}/old", StorageOptions.from_env()
    monkeypatch.setenv("RDEIC_CACHE", str(tmp_path))
    caplog.set_level(logging.WARNING)
    assert remote_model_id(url, opts) == str(model_id_of(tiny_model_dir))
    assert any(ID_FILE in r.getMessage() and url in r.getMessage() for r in caplog.records)
    cached = Path(localize_model(url, opts))
    (cached / "marker").touch()
    assert localize_model(url, opts) == str(cached) and (cached / "marker").exists()


def _cache_is_empty(root: Path) -> bool:
    return not (root / "models").exists() or not list((root / "models").iterdir())


@pytest.mark.parametrize("present", [(), ("config.json",), ("config.json", ID_FILE),
                                     ("config.json", ID_FILE, "model.safetensors")])
def test_missing_remote_model_names_the_url_and_file_and_caches_nothing(s3, tiny_model_dir, tmp_path, monkeypatch, present):
    fs, bucket, _ = s3
    for name in present:
        fs.put(str(tiny_model_dir / name), f"{bucket}/m/{name}")
    url, opts = f"s3://{bucket}/m", StorageOptions.from_env()
    monkeypatch.setenv("RDEIC_CACHE", str(tmp_path))
    calls = [localize_model] if ID_FILE in present else [remote_model_id, localize_model]  # an id needs no weights
    for call in calls:
        with pytest.raises(ModelFormatError) as info:
            call(url, opts)
        message = str(info.value)
        assert "\n" not in message and url in message and "is missing" in message, message
    assert _cache_is_empty(tmp_path)


def test_missing_bucket_names_the_url(s3, tmp_path):
    _, bucket, _ = s3
    url = f"s3://{bucket}-absent/m"
    for call in (remote_model_id, localize_model):
        with pytest.raises(ModelFormatError) as info:
            call(url, StorageOptions.from_env(), **({"cache_root": str(tmp_path)} if call is localize_model else {}))
        assert url in str(info.value) and "\n" not in str(info.value)
    assert _cache_is_empty(tmp_path)


def test_a_download_failing_midway_leaves_nothing_in_the_cache(s3, tiny_model_dir, tmp_path, monkeypatch):
    fs, bucket, _ = s3
    upload(fs, tiny_model_dir, f"{bucket}/m")
    url, opts = f"s3://{bucket}/m", StorageOptions.from_env()
    remote, _ = filesystem(url, opts)  # the instance localize_model gets (fsspec caches them)
    real = remote.get_file
    calls = []

    def flaky(rpath, lpath, **kwargs):
        calls.append(rpath)
        if len(calls) == 2:
            Path(lpath).write_bytes(b"partial")
            raise OSError("connection reset")
        return real(rpath, lpath, **kwargs)

    monkeypatch.setattr(remote, "get_file", flaky)
    with pytest.raises(OSError, match=rf"{url}/\S+ failed: connection reset"):
        localize_model(url, opts, cache_root=str(tmp_path))
    assert _cache_is_empty(tmp_path)
