r"""WebDataset tar shards, for the jobs and for training alike: which files a list of patterns
names (:func:`expand`), the samples of one shard (:class:`ShardReader`), and which of a sample's
files is its image (:func:`pick_image`).

WebDataset convention: consecutive tar members whose names share the part before the
first dot of the file name form one sample (``a/b/000123.jpg`` and ``a/b/000123.json`` →
key ``a/b/000123``, extensions ``jpg`` and ``json``); a member whose extension the sample
already has starts a new sample. Nothing is unpickled.

Names are read as UTF-8. A byte of a name that is not valid UTF-8 is written as the four
characters ``\xNN`` (its value in hex, as Python's ``backslashreplace``), so keys and
extensions are always valid UTF-8 and the same bytes always give the same key. A name that
really contains such text reads the same; two such samples in one shard are duplicate keys.

Every member tarfile yields is accounted for, so that ``reader.members ==
sum(len(s.files) + len(s.bad_members) for s in samples) + reader.skipped_count``:

* a regular file is in its sample's ``files``;
* a symlink, hardlink, FIFO, device (or a type tarfile does not know) joins its sample by the
  same key rule, is named in the sample's ``bad_members`` and makes the sample an error
  (``not_a_file``); links are never followed;
* a directory is no sample: it is counted in ``reader.skipped_count`` and the first
  :data:`SKIPPED_LIMIT` are listed in ``reader.skipped_members``.

A stream that is not a tar at all (empty, an HTML error page, bad compression: tarfile fails
before the first member) raises :class:`UnreadableShardError`; a tar with no members is an empty
shard. A shard that cannot be read to its end (truncated, corrupt) keeps every sample read
before the damage; the damage is the reader's ``error``, and a member cut by it is a
``bad_members`` entry of its sample (``bad_member``).
"""

from __future__ import annotations

import glob as _glob
import re
import tarfile
from dataclasses import dataclass, field
from typing import IO, Callable, Iterator

import fsspec

SKIPPED_LIMIT = 1000  # skipped members listed by name; all are counted
MAX_MEMBER_BYTES = 256 << 20  # one member: a 16-bit TIFF of 4096² is 96 MiB
MAX_SIDECAR_BYTES = 16 << 20  # all of a sample's files but its image
HEAD_BYTES = 32
CODES = ("bad_name", "not_a_file", "too_large", "duplicate_key", "bad_member")  # a sample's reader errors; see pipelines/reasons.py

# Extensions taken as a sample's image, in order of preference.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pbm", "pnm", "jp2", "jpx")

_NOT_A_FILE = {tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink", tarfile.FIFOTYPE: "fifo",
               tarfile.CHRTYPE: "device", tarfile.BLKTYPE: "device"}


class UnreadableShardError(Exception):
    """The stream is not a tar archive at all: nothing of it can be read as a shard."""


class _Damage(Exception):
    """tarfile failed on the shard's data: while reading ``member``'s content, or a header (None)."""

    def __init__(self, message: str, member: tarfile.TarInfo | None) -> None:
        super().__init__(message)
        self.member = member


@dataclass
class Sample:
    key: str
    index: int  # position of the sample in its shard, from 0
    files: dict[str, bytes] = field(default_factory=dict)  # extension -> content
    error: str | None = None  # set when the sample itself is unusable (e.g. a duplicate key)
    error_code: str | None = None  # one of CODES, set with error
    bad_members: dict[str, str] = field(default_factory=dict)  # extension -> name of a member not read

    def fail(self, code: str, message: str) -> None:
        """Record an error; a sample keeps the first one it gets."""
        if code not in CODES:
            raise ValueError(f"unknown reason code {code!r} for a sample; known: {list(CODES)}")
        if self.error is None:
            self.error, self.error_code = message, code


def split_name(name: str) -> tuple[str, str | None]:
    """``dir/000123.seg.png`` → (``dir/000123``, ``seg.png``); a name WebDataset cannot split
    (no dot in its last part, or a last part starting with a dot) → (the whole name, None)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot:
        return name, None
    return (f"{folder}/{stem}" if folder else stem), ext


def pick_image(files: dict[str, bytes]) -> str | None:
    """The image's extension: the first of IMAGE_EXTENSIONS among the sample's (any case), else the
    first (sorted) whose last part is one, as WebDataset's decoders read ``in.name.jpg`` as a JPEG."""
    lowered = {ext.lower(): ext for ext in files}
    for ext in IMAGE_EXTENSIONS:
        if ext in lowered:
            return lowered[ext]
    for ext in IMAGE_EXTENSIONS:
        for lower in sorted(lowered):
            if lower.rpartition(".")[2] == ext:
                return lowered[lower]
    return None


def utf8_name(name: str) -> str:
    """A name tarfile decoded with ``surrogateescape`` as valid UTF-8: undecodable bytes become ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _not_a_file(member: tarfile.TarInfo, name: str) -> str:
    kind = _NOT_A_FILE.get(member.type, f"tar entry of type {member.type!r}")
    target = f" to {utf8_name(member.linkname)!r}" if member.issym() or member.islnk() else ""
    return f"member {name!r} is a {kind}{target}, not a file"


def _unreadable(stream: _Tracking, exc: BaseException) -> str:
    if stream.position == 0:
        return "empty file (0 bytes)"
    more = "..." if stream.position > len(stream.head) else ""
    return f"not a tar archive: starts with {stream.head!r}{more} ({exc or type(exc).__name__})"


class _Samples:
    """The WebDataset grouping: which sample each member joins, and which keys come twice."""

    def __init__(self) -> None:
        self.current: Sample | None = None
        self.first_index: dict[str, int] = {}  # key -> index of its first sample

    def add_file(self, name: str, data: bytes) -> Sample | None:
        """Place member ``name`` and its content; return the sample this closes, if any."""
        done, ext = self._place(name)
        self.current.files[ext] = data
        return done

    def add_unread(self, name: str, code: str, message: str) -> Sample | None:
        """Place member ``name``, not read for the reason given; return the sample this closes, if any."""
        done, ext = self._place(name)
        self.current.bad_members[ext] = name
        self.current.fail(code, message)
        return done

    def size_with(self, name: str, size: int) -> int:
        """The bytes the sample that member ``name`` joins would hold with it."""
        key, ext = split_name(name)
        if self._joins(key, ext):
            return size + sum(len(d) for d in self.current.files.values())
        return size

    def _joins(self, key: str, ext: str | None) -> bool:
        done = self.current
        return ext is not None and done is not None and done.key == key and ext not in done.files and ext not in done.bad_members

    def _place(self, name: str) -> tuple[Sample | None, str]:
        key, ext = split_name(name)
        if self._joins(key, ext):
            return None, ext
        done = self.current
        self.current = self._new(key, 0 if done is None else done.index + 1)
        if ext is None:
            self.current.fail("bad_name", f"member {name!r} is not named <key>.<extension> as WebDataset names members")
        return done, ext or ""

    def _new(self, key: str, index: int) -> Sample:
        sample = Sample(key=key, index=index)
        if key in self.first_index:
            sample.fail("duplicate_key", f"duplicate key {key!r} in shard (first seen as sample {self.first_index[key]})")
        else:
            self.first_index[key] = index
        return sample


class _Tracking:
    """Read-only wrapper remembering the recent bytes, to check the tar's end-of-archive block."""

    KEEP = 64 * 1024

    def __init__(self, fileobj: IO[bytes]) -> None:
        self.fileobj = fileobj
        self.position = 0
        self.recent = bytearray()
        self.head = b""  # the first bytes, to say what a stream that is not a tar holds
        self.failure: BaseException | None = None
        self.empty_reads = 0

    EMPTY_READS = 16

    def read(self, size: int = -1) -> bytes:
        if self.empty_reads > self.EMPTY_READS:
            # tarfile skips a member it is not asked to read by reading up to its header's size; a header
            # claiming 2**62 bytes would keep it reading an ended stream for ever
            raise EOFError("the stream ended, and tarfile keeps reading (a member claiming more bytes than there are?)")
        try:
            data = self.fileobj.read(size)
        except BaseException as exc:
            self.failure = exc  # the storage failed, not the data
            raise
        self.empty_reads += not data and size != 0
        if len(self.head) < HEAD_BYTES:
            self.head += data[: HEAD_BYTES - len(self.head)]
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

    def __init__(self, fileobj: IO[bytes], max_member_bytes: int | None = MAX_MEMBER_BYTES,
                 max_sample_bytes: int | None = MAX_MEMBER_BYTES + MAX_SIDECAR_BYTES) -> None:
        self.fileobj = fileobj
        self.max_member_bytes, self.max_sample_bytes = max_member_bytes, max_sample_bytes
        self.error: str | None = None
        self.members = 0  # every member tarfile yielded
        self.skipped_members: list[dict[str, str]] = []  # {"name", "reason"} of the first SKIPPED_LIMIT skipped
        self.skipped_count = 0

    def __iter__(self) -> Iterator[Sample]:
        samples = _Samples()
        try:
            for member, data in self._members(lambda m: self._refusal(m, samples) is None):
                name = utf8_name(member.name)
                if member.isdir():
                    self._skip(name, "directory")
                    continue
                if data is None:
                    code, message = self._refusal(member, samples) if member.isfile() else ("not_a_file", _not_a_file(member, name))
                    done = samples.add_unread(name, code, message)
                else:
                    done = samples.add_file(name, data)
                if done is not None:
                    yield done
        except _Damage as damage:
            self.error = str(damage)
            if damage.member is not None:  # the member cut by the damage still joins its sample
                name = utf8_name(damage.member.name)
                if (done := samples.add_unread(name, "bad_member", f"member {name!r} is truncated or corrupt")) is not None:
                    yield done
        if samples.current is not None:
            yield samples.current

    def _refusal(self, member: tarfile.TarInfo, samples: _Samples) -> tuple[str, str] | None:
        """Why a regular file's content is not read: a name that is no sample's, or a size over a limit
        (taken from the tar header, before anything is read: a sparse member can claim gigabytes)."""
        name = utf8_name(member.name)
        if split_name(name)[1] is None:
            return "bad_name", f"member {name!r} is not named <key>.<extension> as WebDataset names members"
        if self.max_member_bytes is not None and member.size > self.max_member_bytes:
            return "too_large", f"member {name!r} holds {member.size} bytes, over the limit of {self.max_member_bytes}"
        if self.max_sample_bytes is not None and samples.size_with(name, member.size) > self.max_sample_bytes:
            return "too_large", (f"member {name!r} brings its sample to {samples.size_with(name, member.size)} bytes, "
                                 f"over the limit of {self.max_sample_bytes}")
        return None

    def _members(self, wanted=lambda member: True) -> Iterator[tuple[tarfile.TarInfo, bytes | None]]:
        """tarfile's members, with the content of the regular files ``wanted`` accepts; damaged data
        raises :class:`_Damage`."""
        stream = _Tracking(self.fileobj)
        reading = None
        try:
            with tarfile.open(fileobj=stream, mode="r|*", encoding="utf-8", errors="surrogateescape") as tar:
                for member in tar:
                    self.members += 1
                    reading = member
                    data = tar.extractfile(member).read() if member.isfile() and wanted(member) else None
                    reading = None
                    yield member, data
                self._check_end(tar, stream)
        # tarfile raises more than TarError on bad data (ValueError, TypeError, zlib.error, EOFError...),
        # so any failure is the data's, except a failed read of the stream or a lack of memory: those
        # propagate, so that the shard is retried instead of committed in part.
        except Exception as exc:
            if stream.failure is not None or isinstance(exc, MemoryError):
                raise
            if self.members == 0:
                raise UnreadableShardError(_unreadable(stream, exc)) from None
            raise _Damage(f"tar stream unreadable after {self.members} members: {exc or type(exc).__name__}",
                          reading) from exc

    def _skip(self, name: str, reason: str) -> None:
        self.skipped_count += 1
        if len(self.skipped_members) < SKIPPED_LIMIT:
            self.skipped_members.append({"name": name, "reason": reason})

    def _check_end(self, tar: tarfile.TarFile, stream: _Tracking) -> None:
        # tarfile ends quietly when data stops at a member boundary: only the missing
        # end-of-archive block tells a truncated shard from a complete one
        if tar.fileobj.comptype == "tar" and stream.block_at(tar.offset) != bytes(512):
            self.error = f"tar stream ends without its end-of-archive block after {self.members} members (truncated?)"


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


def expand(patterns: list[str], fsspec_kwargs: Callable[[str], dict] | None = None) -> list[str]:
    """Shard URLs from brace patterns and globs, local or any fsspec URL, sorted, without duplicates.

    Globs are listed; brace-expanded names are kept as given (a missing one fails where it is
    read, so it is reported instead of silently giving less). ``fsspec_kwargs(protocol)``: the
    filesystem's options for a protocol (``s3``, ``file``, ...) of the patterns.
    """
    urls: list[str] = []
    for pattern in patterns:
        for item in expand_braces(pattern):
            if _glob.has_magic(item):
                proto = item.split("://", 1)[0] if "://" in item else "file"
                fs, path = fsspec.core.url_to_fs(item, **(fsspec_kwargs(proto) if fsspec_kwargs else {}))
                urls += [p if proto == "file" else f"{proto}://{p}" for p in sorted(fs.glob(path))]
            else:
                urls.append(item)
    return sorted(dict.fromkeys(urls))
