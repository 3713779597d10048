"""Object storage through fsspec: local paths, ``file://`` and ``s3://`` (any S3-compatible store).

Ray workers are other processes, possibly on other machines, so the storage settings
travel with every task as a small picklable :class:`StorageOptions` instead of being read
from the worker's environment.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Iterator
from urllib.parse import urlsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem


@dataclass(frozen=True)
class StorageOptions:
    """Settings for S3-compatible stores; empty fields fall back to boto's usual lookup."""

    endpoint_url: str | None = None
    region: str | None = None
    key: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    anon: bool = False

    @classmethod
    def from_env(cls, endpoint_url: str | None = None, region: str | None = None, anon: bool = False) -> "StorageOptions":
        """Explicit values first, then the standard AWS environment variables."""
        env = os.environ
        return cls(
            endpoint_url=endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            region=region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            key=env.get("AWS_ACCESS_KEY_ID"),
            secret=env.get("AWS_SECRET_ACCESS_KEY"),
            token=env.get("AWS_SESSION_TOKEN"),
            anon=anon,
        )

    def fsspec_kwargs(self, protocol: str) -> dict:
        if protocol not in ("s3", "s3a"):
            return {}
        kw: dict = {"anon": self.anon}
        if self.key:
            kw.update(key=self.key, secret=self.secret)
        if self.token:
            kw["token"] = self.token
        client = {}
        if self.endpoint_url:
            client["endpoint_url"] = self.endpoint_url
        if self.region:
            client["region_name"] = self.region
        if client:
            kw["client_kwargs"] = client
        return kw


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def filesystem(url: str, storage: StorageOptions) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URL or local path."""
    fs, path = fsspec.core.url_to_fs(url, **storage.fsspec_kwargs(protocol_of(url)))
    return fs, path


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/")] + [p.strip("/") for p in parts])


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def temp_name(path: str, token: str) -> str:
    """The hidden name beside ``path`` that :func:`open_atomic` writes under, for one writer's ``token``."""
    folder, _, name = path.rpartition("/")
    return f"{folder}/.{name}.tmp-{token}" if folder else f".{name}.tmp-{token}"


@contextmanager
def open_atomic(fs: fsspec.AbstractFileSystem, path: str, token: str | None = None) -> Iterator[IO[bytes]]:
    """A file for writing that readers never see half-written.

    Local files are written to :func:`temp_name` (hidden, so dataset readers skip it) and renamed
    into place; a writer that may die half-way passes its own ``token`` and records the temporary
    name first (pipelines/ownership.py), so that whoever cleans up can prove the file is a job's.
    On an object store the upload (PUT or multipart) becomes visible only when completed; an
    error aborts it.
    """
    if is_local(fs):
        fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = temp_name(path, token or uuid.uuid4().hex[:12])
        try:
            with open(tmp, "wb") as f:
                yield f
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    f = fs.open(path, "wb")
    try:
        yield f
    except BaseException:
        discard = getattr(f, "discard", None)
        if discard is not None:
            discard()
            f.closed = True  # closing now would try to commit the discarded upload
        raise
    f.close()


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes, token: str | None = None) -> None:
    with open_atomic(fs, path, token) as f:
        f.write(data)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes | None:
    """The file's bytes, or None if it does not exist (never a stale listing cache's answer)."""
    fs.invalidate_cache(path)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def list_names(fs: fsspec.AbstractFileSystem, folder: str) -> dict[str, bool]:
    """``{name: is_directory}`` of a folder's entries, fresh from the store; {} if it does not exist."""
    fs.invalidate_cache(folder)
    try:
        entries = fs.ls(folder, detail=True)
    except FileNotFoundError:
        return {}
    out = {}
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if e["name"].rstrip("/") != folder.rstrip("/"):
            out[name] = e["type"] == "directory"
    return out


def list_files(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    """Names of the files in a flat folder, fresh from the store; [] if there is none.

    Unlike ``ls``, a prefix listing (``find``): s3fs lists an empty or missing folder's *parent*
    to tell a file from nothing, which for ``_inprogress/`` beside 10⁵ parts would be 10⁵ names.
    """
    fs.invalidate_cache(folder)
    prefix = folder.rstrip("/") + "/"
    return sorted(p[len(prefix):] for p in fs.find(folder) if p.startswith(prefix) and "/" not in p[len(prefix):])


class PreconditionFailed(OSError):
    """A conditional write lost: the file was created or changed by someone else meanwhile."""


def read_versioned(fs: fsspec.AbstractFileSystem, path: str) -> tuple[bytes, str] | None:
    """(bytes, version) of a small file for a later :func:`write_if`, or None if it does not exist.

    The version is the object's ETag on S3 and a hash of the content elsewhere. On S3 the ETag
    is read before the body, so a version can only be older than the bytes: a write_if with it
    then fails rather than overwriting a change it has not seen.
    """
    if protocol_of_fs(fs) in ("s3", "s3a"):
        fs.invalidate_cache(path)
        try:
            etag = fs.info(path)["ETag"]
            return fs.cat_file(path), etag
        except FileNotFoundError:
            return None
    data = read_bytes(fs, path)
    return None if data is None else (data, hashlib.sha256(data).hexdigest())


def write_if(fs: fsspec.AbstractFileSystem, path: str, data: bytes, version: str | None) -> None:
    """Write ``data`` only if ``path`` is still at ``version`` (None: only if it does not exist).

    S3 uses conditional PUTs (If-None-Match / If-Match); a local folder serialises writers with
    an flock on the folder. Raises :class:`PreconditionFailed` when the condition does not hold.
    """
    if protocol_of_fs(fs) in ("s3", "s3a"):
        try:
            if version is None:
                fs.pipe_file(path, data, mode="create")
            else:
                fs.pipe_file(path, data, IfMatch=version)
        except FileExistsError:
            raise PreconditionFailed(f"{path} was created meanwhile") from None
        except OSError as exc:
            if exc.errno == errno.EINVAL and "condition" in str(exc).lower():
                raise PreconditionFailed(f"{path} was changed meanwhile") from None
            raise
        finally:
            fs.invalidate_cache(path)
        return
    if not is_local(fs):
        raise ValueError(f"conditional writes are not supported on {type(fs).__name__}; use a local folder or S3")
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        current = read_versioned(fs, path)
        if (current[1] if current else None) != version:
            raise PreconditionFailed(f"{path} was {'created' if version is None else 'changed'} meanwhile")
        write_bytes_atomic(fs, path, data, token="cas")  # one fixed temporary name: writers hold the flock
    finally:
        os.close(fd)


def explain(exc: BaseException) -> str | None:
    """One line for an object-store failure a user can fix (credentials, endpoint, access), else None."""
    try:
        from botocore import exceptions as boto
    except ImportError:  # no S3 support installed: nothing of ours raised it
        return None
    if isinstance(exc, boto.NoCredentialsError):
        return ("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
                "or pass --anon for a public bucket")
    if isinstance(exc, boto.EndpointConnectionError):
        url = urlsplit(str(exc.kwargs.get("endpoint_url", "")))
        return f"cannot reach the S3 endpoint {url.scheme}://{url.netloc}: check --endpoint-url or AWS_ENDPOINT_URL"
    if isinstance(exc, (boto.ClientError, boto.BotoCoreError)):
        return f"S3 refused the request: {str(exc).splitlines()[0][:300]}"
    return None


def protocol_of_fs(fs: fsspec.AbstractFileSystem) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def canonical_url(url: str) -> str:
    """One spelling per file: absolute local paths (``./x``, ``x``, ``file://x`` alike), ``s3://bucket/key``."""
    proto = protocol_of(url)
    path = url.split("://", 1)[-1]
    if proto == "file":
        return os.path.abspath(os.path.expanduser(path))
    return f"{proto}://{re.sub('/+', '/', path)}"


def shard_ids(urls: list[str]) -> dict[str, str]:
    """A file-name-safe id per shard: its path relative to the shards' common folder, without
    the .tar suffix, '/' → '__'. One folder of shards gives the plain stems."""
    paths = [u.split("://", 1)[-1] for u in urls]
    common = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
    ids = {}
    for url, path in zip(urls, paths):
        rel = os.path.relpath(path, common) if common else path
        rel = re.sub(r"\.tar(\.gz)?$", "", rel)
        ids[url] = re.sub(r"[^A-Za-z0-9._-]", "_", rel.replace("/", "__"))
    if len(set(ids.values())) != len(ids):
        raise ValueError("input shards map to the same id; give shards distinct names")
    return ids
