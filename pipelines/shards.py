"""Reading WebDataset tar shards as a stream of samples.

WebDataset convention: consecutive tar members whose names share the part before the
first dot of the file name form one sample (``a/b/000123.jpg`` and ``a/b/000123.json`` →
key ``a/b/000123``, extensions ``jpg`` and ``json``). Nothing is unpickled.

A shard that cannot be read to its end (truncated, corrupt) keeps every sample read before
the damage; the damage is reported as the shard's error.
"""

from __future__ import annotations

import gzip
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import IO, Iterator


@dataclass
class Sample:
    key: str
    index: int  # position of the sample in its shard, from 0
    files: dict[str, bytes] = field(default_factory=dict)  # extension -> content
    error: str | None = None  # set when the sample itself is unusable (e.g. a duplicate key)


def split_name(name: str) -> tuple[str, str]:
    """``dir/000123.seg.png`` → (``dir/000123``, ``seg.png``)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, (ext if dot else "")


class _Tracking:
    """Read-only wrapper remembering the recent bytes, to check the tar's end-of-archive block."""

    KEEP = 64 * 1024

    def __init__(self, fileobj: IO[bytes]) -> None:
        self.fileobj = fileobj
        self.position = 0
        self.recent = bytearray()

    def read(self, size: int = -1) -> bytes:
        data = self.fileobj.read(size)
        self.position += len(data)
        self.recent += data
        del self.recent[: max(0, len(self.recent) - self.KEEP)]
        return data

    def block_at(self, offset: int) -> bytes | None:
        """The 512 bytes at ``offset`` if still remembered and whole, else None."""
        start = offset - (self.position - len(self.recent))
        if start < 0 or start + 512 > len(self.recent):
            return None
        return bytes(self.recent[start:start + 512])


class ShardReader:
    """Iterate the samples of one tar stream; afterwards ``error`` holds the shard's error, if any."""

    def __init__(self, fileobj: IO[bytes]) -> None:
        self.fileobj = fileobj
        self.error: str | None = None
        self.members = 0
        self.skipped_members: list[str] = []  # directories, links and other non-files

    def __iter__(self) -> Iterator[Sample]:
        seen: dict[str, int] = {}
        current: Sample | None = None
        reading: str | None = None  # name of the member being read, for the error report
        index = 0
        stream = _Tracking(self.fileobj)
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                compressed = tar.fileobj.comptype != "tar"
                for member in tar:
                    self.members += 1
                    if not member.isfile():
                        self.skipped_members.append(member.name)
                        continue
                    reading = member.name
                    key, ext = split_name(member.name)
                    data = tar.extractfile(member).read()
                    reading = None
                    if current is not None and key == current.key and ext not in current.files:
                        current.files[ext] = data
                        continue
                    if current is not None:
                        yield current
                    current = Sample(key=key, index=index, files={ext: data})
                    if key in seen:
                        current.error = f"duplicate key {key!r} in shard (first seen as sample {seen[key]})"
                    else:
                        seen[key] = index
                    index += 1
                if not compressed and stream.block_at(tar.offset) != bytes(512):
                    # tarfile ends quietly when data stops at a member boundary: only the missing
                    # end-of-archive block tells a truncated shard from a complete one
                    self.error = f"tar stream ends without its end-of-archive block after {self.members} members (truncated?)"
        # Damaged data ends the shard with what was read; other I/O errors propagate, so that
        # a transient storage failure retries the shard instead of committing part of it.
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
            self.error = f"tar stream unreadable after {self.members} members: {exc or type(exc).__name__}"
            if reading is not None:
                key, _ = split_name(reading)
                if current is not None and current.key == key:
                    current.error = current.error or f"member {reading!r} is truncated or corrupt"
                else:
                    if current is not None:
                        yield current
                    current = Sample(key=key, index=index, error=f"member {reading!r} is truncated or corrupt")
        if current is not None:
            yield current
