"""Object storage through fsspec: local paths, ``file://`` and ``s3://`` (any S3-compatible store).

Ray workers are other processes, possibly on other machines, so the storage settings
travel with every task as a small picklable :class:`StorageOptions` instead of being read
from the worker's environment.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

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


@contextmanager
def open_atomic(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[IO[bytes]]:
    """A file for writing that readers never see half-written.

    Local files are written to a hidden name beside their own and renamed into place. On an object store
    the upload (PUT or multipart) becomes visible only when completed; an error aborts it.
    """
    if is_local(fs):
        fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        folder, name = os.path.split(path)
        tmp = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:8]}")  # hidden: dataset readers skip it
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


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    with open_atomic(fs, path) as f:
        f.write(data)


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a{0..2}b`` → a0b a1b a2b (zero padding kept: ``{000..010}``); ``{x,y}`` → x y."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    out = []
    for opt in options:
        out += expand_braces(pattern[: m.start()] + opt + pattern[m.end():])
    return out


def expand_inputs(patterns: list[str], storage: StorageOptions) -> list[str]:
    """Shard URLs from brace patterns and globs, sorted, without duplicates.

    Globs are listed; brace-expanded names are kept as given (a missing one fails its shard,
    so the job reports it instead of silently archiving less).
    """
    urls: list[str] = []
    for pattern in patterns:
        for item in expand_braces(pattern):
            if _glob.has_magic(item):
                fs, path = filesystem(item, storage)
                proto = protocol_of(item)
                found = sorted(fs.glob(path))
                urls += [p if proto == "file" else f"{proto}://{p}" for p in found]
            else:
                urls.append(item)
    return sorted(dict.fromkeys(urls))


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


def localize_model(url: str, storage: StorageOptions, cache_root: str | None = None) -> str:
    """A local directory holding the model: the path itself, or a cached download of a remote one."""
    if protocol_of(url) == "file":
        return url.split("://", 1)[-1]
    root = Path(cache_root or os.environ.get("RDEIC_CACHE", Path.home() / ".cache" / "rdeic"))
    target = root / "models" / hashlib.sha256(url.encode()).hexdigest()[:16]
    if not (target / "config.json").is_file():
        fs, path = filesystem(url, storage)
        tmp = target.with_name(target.name + f".tmp-{uuid.uuid4().hex[:6]}")
        tmp.mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "entropy_tables.safetensors", "config.json"):
            fs.get(f"{path.rstrip('/')}/{name}", str(tmp / name))
        try:
            os.replace(tmp, target)
        except OSError:  # another worker on this machine finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
