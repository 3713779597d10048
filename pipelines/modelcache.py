"""The model a job runs: its id without downloading weights, and a per-machine cache of remote models.

A remote model directory is downloaded into ``$RDEIC_CACHE/models/<hash of the URL>`` (default
``~/.cache/rdeic``). Every start reads the URL's model_id.json (one small GET) and uses the cached
copy only if it was downloaded under the same id; otherwise the model is downloaded again into a
fresh temporary folder, which is renamed into place when complete and removed on any error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import fsspec

from rdeic.config import ModelConfig
from rdeic.errors import ModelFormatError
from rdeic.modeldir import CONFIG_FILE, ID_FILE, TABLES_FILE, WEIGHTS_FILE, model_id_of, stored_model_id

from .storage import StorageOptions, filesystem, protocol_of, read_bytes

log = logging.getLogger(__name__)

MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, TABLES_FILE)
SOURCE_FILE = ".source.json"  # in a cached copy: what identified the remote model when it was downloaded


def remote_model_id(url: str, storage: StorageOptions) -> str:
    """The id of the model at ``url``, from its model_id.json and config.json only (no weights)."""
    if protocol_of(url) == "file":
        return str(model_id_of(url.split("://", 1)[-1]))
    fs, path = filesystem(url, storage)
    path = path.rstrip("/")
    id_bytes = read_bytes(fs, f"{path}/{ID_FILE}")
    if id_bytes is None:
        log.warning("%s has no %s, so the model is downloaded to compute its id; run `rdeic model-id DIR --write` "
                    "on a copy and upload its %s", url, ID_FILE, ID_FILE)
        return str(model_id_of(localize_model(url, storage)))
    config_bytes = read_bytes(fs, f"{path}/{CONFIG_FILE}")
    if config_bytes is None:
        raise ModelFormatError(f"{url} is not a model directory: {CONFIG_FILE} is missing")
    return str(stored_model_id(id_bytes.decode(), ModelConfig.from_json(config_bytes.decode()), url))


def localize_model(url: str, storage: StorageOptions, cache_root: str | None = None) -> str:
    """A local directory holding the model at ``url``: the path itself, or an up-to-date cached copy."""
    if protocol_of(url) == "file":
        return url.split("://", 1)[-1]
    fs, path = filesystem(url, storage)
    path = path.rstrip("/")
    root = Path(cache_root or os.environ.get("RDEIC_CACHE", Path.home() / ".cache" / "rdeic")) / "models"
    target = root / hashlib.sha256(url.encode()).hexdigest()[:16]
    stamp, has_id = _source_stamp(fs, path, url)
    if (target / SOURCE_FILE).is_file() and (target / SOURCE_FILE).read_text() == stamp:
        return str(target)
    log.info("downloading the model at %s into %s", url, target)
    _download(fs, path, url, target, MODEL_FILES + ((ID_FILE,) if has_id else ()), stamp)
    return str(target)


def _source_stamp(fs: fsspec.AbstractFileSystem, path: str, url: str) -> tuple[str, bool]:
    """(what identifies the model at the URL, whether that is its model_id.json).

    Directories written before model_id.json existed are identified by their files' sizes and ETags.
    """
    id_bytes = read_bytes(fs, f"{path}/{ID_FILE}")
    if id_bytes is not None:
        return id_bytes.decode(), True
    stamp = {}
    for name in MODEL_FILES:
        try:
            info = fs.info(f"{path}/{name}")
        except FileNotFoundError:
            raise _missing(url, name) from None
        stamp[name] = [info.get("size"), info.get("ETag") or info.get("LastModified") or info.get("mtime")]
    return json.dumps(stamp, sort_keys=True, default=str), False


def _missing(url: str, name: str) -> ModelFormatError:
    return ModelFormatError(f"{url} is not a complete model directory: {name} is missing")


def _download(fs: fsspec.AbstractFileSystem, path: str, url: str, target: Path, names: tuple[str, ...], stamp: str) -> None:
    tmp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        for name in names:
            try:
                fs.get_file(f"{path}/{name}", str(tmp / name))
            except FileNotFoundError:
                raise _missing(url, name) from None
            except OSError as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise OSError(f"downloading {url}/{name} failed: {reason}") from exc
        if ID_FILE in names and (tmp / ID_FILE).read_text() != stamp:
            raise OSError(f"the model at {url} was replaced during the download; run again")
        (tmp / SOURCE_FILE).write_text(stamp)
        _install(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once installed


def _install(tmp: Path, target: Path) -> None:
    """Rename a complete download into place, replacing an outdated copy."""
    old = target.with_name(f"{target.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(target, old)
    except FileNotFoundError:
        pass
    try:
        os.rename(tmp, target)
    except OSError:  # another worker on this machine installed its download first
        pass
    shutil.rmtree(old, ignore_errors=True)
