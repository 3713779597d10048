"""Decode one archive part into a WebDataset shard or a folder (the worker's job, without Ray).

Each ok row becomes ``<stem>.png`` plus its original sidecar files, named by the one rule of
pipelines/names.py. Rows that were errors at compress time, and rows whose bitstream fails its
checks or its decode, are listed in the output's commit marker (``failed_keys``: key, code,
reason); nothing is silently dropped. A failure of the worker itself (device, memory on a sane
row, storage, a part written by another model) fails the attempt instead: it is retried on
another worker and never committed.
"""

from __future__ import annotations

import io
import logging
import posixpath
import tarfile
import time
from dataclasses import dataclass, field
from typing import Callable

from rdeic.errors import BitstreamError, EntropyDesyncError, ImageTooLargeError, ModelMismatchError
from rdeic.images import encode_png
from rdeic.bitstream import DEFAULT_MAX_PIXELS

from . import archive, names, reasons, storage
from .archive import Layout, ShardStats
from .compress import CrashSpec, ShardTask, maybe_crash
from .ownership import Attempt
from .samples import sidecars_from_json

log = logging.getLogger(__name__)

FORMATS = ("webdataset", "folder")
COLUMNS = ["key", "status", "error", "bitstream", "meta_json", "model_id"]


def layout_for(fmt: str) -> Layout:
    return Layout("part-", ".tar" if fmt == "webdataset" else "")


@dataclass(frozen=True)
class DecodeSpec:
    archive: str
    output: str
    model: str
    storage: storage.StorageOptions = field(default_factory=storage.StorageOptions)
    format: str = "webdataset"
    steps: int | None = None
    detail: float = 1.0
    batch_size: int = 8
    max_pixels: int = DEFAULT_MAX_PIXELS  # padded pixels of one image; a bitstream claiming more is that row's error
    keys: frozenset[str] | None = None  # decode only these keys
    crash: CrashSpec | None = None
    run_id: str = ""
    settings: dict = field(default_factory=dict)
    device: str = "auto"


def _code_of(exc: BitstreamError) -> str:
    for cls, code in ((ModelMismatchError, "model_mismatch"), (EntropyDesyncError, "entropy_desync"),
                      (ImageTooLargeError, "too_large")):
        if isinstance(exc, cls):
            return code
    return "bitstream_refused"


@dataclass
class _Plan:
    """The rows of a part, and for each decodable one (by position) its sidecars and file names."""

    rows: list[dict]
    sidecars: dict[int, dict[str, bytes]] = field(default_factory=dict)
    image_name: dict[int, str] = field(default_factory=dict)
    sidecar_names: dict[int, dict[str, str]] = field(default_factory=dict)
    failures: dict[int, tuple[str, str]] = field(default_factory=dict)  # position -> (code, reason)
    renamed: dict[str, str] = field(default_factory=dict)  # stem -> key, where the key is not the stem

    @classmethod
    def of(cls, rows: list[dict]) -> "_Plan":
        plan, seen = cls(rows), {}
        for i, row in enumerate(rows):
            key = row["key"]
            if row["status"] != "ok" or row["bitstream"] is None:
                plan.failures[i] = ("error_row", f"not decodable: the archive row is an error ({row['error']})")
            elif key in seen:
                plan.failures[i] = ("duplicate_key", f"a second ok row with key {key!r} (first at row {seen[key]})")
            else:
                try:
                    plan.sidecars[i] = sidecars_from_json(row["meta_json"])
                except (ValueError, TypeError, AttributeError, KeyError) as exc:
                    plan.failures[i] = ("bad_row", f"meta_json is malformed: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                seen[key] = i
                plan.image_name[i], plan.sidecar_names[i] = names.sample_files(key, sorted(plan.sidecars[i]))
                if names.stem(key) != key:
                    plan.renamed[names.stem(key)] = key
        return plan

    def files(self) -> list[str]:
        return [n for i in self.image_name for n in [self.image_name[i], *self.sidecar_names[i].values()]]


class PartDecoder:
    def __init__(self, spec: DecodeSpec, codec, worker_info: dict | None = None) -> None:
        if spec.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {spec.format!r}")
        self.spec = spec
        self.codec = codec
        self.worker_info = worker_info or {}
        self.layout = layout_for(spec.format)
        self.archive_fs, self.archive_root = storage.filesystem(spec.archive, spec.storage)
        self.fs, self.root = storage.filesystem(spec.output, spec.storage)

    def __call__(self, task: ShardTask) -> ShardStats:
        previous = archive.read_marker(self.fs, self.root, self.layout, task.shard_id)
        if previous is not None:
            previous.skipped = True
            return previous
        t0 = time.perf_counter()
        out_name = self.layout.data(task.shard_id)
        stats = ShardStats(task.shard_id, task.url, out_name, worker=self.worker_info, attempt=task.attempt)
        rows = archive.read_part(self.archive_fs, self.archive_root, task.shard_id, columns=COLUMNS).to_pylist()
        if self.spec.keys is not None:
            rows = [r for r in rows if r["key"] in self.spec.keys]
        self._check_model(task, rows)
        plan = _Plan.of(rows)
        attempt = Attempt(self.fs, self.root, task.shard_id, self.spec.run_id, task.attempt, marker=self.layout.marker(task.shard_id))
        try:
            stats.files = self._write(attempt, out_name, plan, task, stats)
            maybe_crash(self.spec.crash, task, 0)
        except BaseException:
            attempt.abort()
            raise
        stats.seconds = time.perf_counter() - t0
        stats.settings, stats.run_id, stats.renamed_keys = self.spec.settings, self.spec.run_id, plan.renamed
        attempt.commit(stats.to_json().encode())
        return stats

    def _write(self, attempt: Attempt, out_name: str, plan: _Plan, task: ShardTask, stats: ShardStats) -> list[str]:
        """Decode into the unit's output, which the attempt's record names before anything is written."""
        if self.spec.format == "webdataset":
            attempt.begin([out_name])
            with storage.open_atomic(self.fs, storage.join(self.root, out_name), token=attempt.token) as f:
                tar = tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT)
                self._decode_rows(task, plan, lambda name, data: _add_member(tar, name, data), stats)
                tar.close()
            return [out_name]
        files = [posixpath.join(out_name, n) for n in plan.files()]
        dirs = sorted({posixpath.dirname(f) for f in files} | {out_name})
        attempt.begin(files, dirs)
        written: list[str] = []

        def add(name: str, data: bytes) -> None:
            rel = posixpath.join(out_name, name)
            storage.write_bytes_atomic(self.fs, storage.join(self.root, rel), data, token=attempt.token)
            written.append(rel)

        self.fs.makedirs(storage.join(self.root, out_name), exist_ok=True)
        self._decode_rows(task, plan, add, stats)
        return written

    def _check_model(self, task: ShardTask, rows: list[dict]) -> None:
        """A part whose bitstreams are all another model's is this worker's problem, not the rows'."""
        ok = [r for r in rows if r["status"] == "ok" and r["bitstream"] is not None]
        if not ok or any(r["model_id"] == str(self.codec.model_id) for r in ok):
            return
        try:
            self.codec.parse(ok[0]["bitstream"])  # also accepts the same model's legacy id
        except ModelMismatchError:
            raise reasons.InfraError(f"{task.shard_id} was written with model {ok[0]['model_id']}; this decoder has "
                                     f"{self.codec.model_id}: pass that model with --model") from None
        except BitstreamError:
            pass  # a damaged first row says nothing about the model: the rows are judged one by one

    def _decode_rows(self, task: ShardTask, plan: _Plan, add: Callable[[str, bytes], None], stats: ShardStats) -> None:
        pending: list[int] = []
        for n, row in enumerate(plan.rows, start=1):
            maybe_crash(self.spec.crash, task, n)
            i = n - 1
            if i in plan.failures:
                self._fail(stats, row["key"], *plan.failures[i])
                continue
            pending.append(i)
            if len(pending) >= self.spec.batch_size:
                self._flush(pending, plan, add, stats)
                pending = []
        if pending:
            self._flush(pending, plan, add, stats)

    def _flush(self, batch: list[int], plan: _Plan, add: Callable[[str, bytes], None], stats: ShardStats) -> None:
        t0 = time.perf_counter()
        rows = [plan.rows[i] for i in batch]
        for i, row, result in zip(batch, rows, self._decode(rows)):
            if isinstance(result, BitstreamError):
                self._fail(stats, row["key"], _code_of(result), f"{type(result).__name__}: {result}")
                continue
            png = encode_png(result)
            add(plan.image_name[i], png)
            for ext, data in plan.sidecars[i].items():
                add(plan.sidecar_names[i][ext], data)
            stats.ok += 1
            stats.bytes_in += len(row["bitstream"])
            stats.bitstream_bytes += len(row["bitstream"])
            stats.bytes_out += len(png)
            stats.pixels += int(result.shape[0]) * int(result.shape[1])
        stats.model_seconds += time.perf_counter() - t0

    def _decode(self, rows: list[dict]) -> list:
        return decode_results(self.codec, [r["bitstream"] for r in rows], self.spec.steps, self.spec.detail,
                              self.spec.max_pixels, self.worker_info.get("device", "the device"), [r["key"] for r in rows])

    @staticmethod
    def _fail(stats: ShardStats, key: str, code: str, reason: str) -> None:
        stats.count_error(code, reason)
        stats.failed_keys.append({"key": key, "code": code, "reason": reason})


def decode_results(codec, bitstreams: list[bytes], steps: int | None, detail: float, max_pixels: int | None,
                   device: str = "the device", keys: list[str] | None = None) -> list:
    """Images, or a BitstreamError per refused stream, as a worker decodes them (decode and audit jobs).

    Anything else the decoder raises is the worker's failure, not the row's (InfraError): a batch is
    first split to find it, so one bad row cannot hide behind a batch, and a bug or a sick device
    never commits a unit of error rows; out of memory on a batch is retried in halves.
    """
    keys = keys or [str(i) for i in range(len(bitstreams))]
    try:
        return codec.decompress_results(bitstreams, steps=steps, detail=detail, max_pixels=max_pixels)
    except BitstreamError as exc:  # a check that only decoding can make: that row's outcome
        if len(bitstreams) == 1:
            return [exc]
        half = len(bitstreams) // 2
        return (decode_results(codec, bitstreams[:half], steps, detail, max_pixels, device, keys[:half])
                + decode_results(codec, bitstreams[half:], steps, detail, max_pixels, device, keys[half:]))
    except Exception as exc:
        if len(bitstreams) > 1 and (reasons.is_out_of_memory(exc) or not reasons.is_device_error(exc)):
            half = len(bitstreams) // 2
            log.warning("decoding a batch of %d failed (%s); retrying in halves", len(bitstreams), type(exc).__name__)
            return (decode_results(codec, bitstreams[:half], steps, detail, max_pixels, device, keys[:half])
                    + decode_results(codec, bitstreams[half:], steps, detail, max_pixels, device, keys[half:]))
        where = f" on row {keys[0]!r}" if len(bitstreams) == 1 else ""
        raise reasons.InfraError(f"decoding failed{where} on {device}: {type(exc).__name__}: {str(exc)[:300]}") from exc


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))
