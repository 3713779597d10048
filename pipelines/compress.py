"""Compress one WebDataset shard into one Parquet part (the worker's job, without Ray).

Reading and image decoding run on CPU threads ahead of the model (bounded prefetch);
images are batched by padded size; every input sample becomes a row, ok or error.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterator

from rdeic.errors import ModelFormatError
from rdeic.shards import MAX_MEMBER_BYTES, MAX_SIDECAR_BYTES, ShardReader

from . import archive, reasons, storage
from .archive import ARCHIVE, ShardStats
from .ownership import Attempt
from .samples import PreparedSample, prepare

log = logging.getLogger(__name__)

CODEC_VERSION = "rdeic-archive/0.2 bitstream/2"  # per row; parts of one archive may differ in the container version
DEVICES = ("auto", "cuda", "cpu")  # where workers run (pipelines/distributor.py)


@dataclass(frozen=True)
class CrashSpec:
    """Fault injection for tests: the worker process exits (or hangs) inside a unit.

    ``after_samples`` > 0: after that many samples of the unit; 0: after the unit's data is
    written and before its commit marker (the moment two runs on one output could collide).
    """

    shard_id: str
    after_samples: int = 1
    attempts: int = 1  # crash on this many attempts, then let the shard through
    stall: bool = False  # hang instead of exiting, so that a test can kill the driver mid-shard
    fail: bool = False  # raise an InfraError instead of exiting: a sick device that keeps its process


@dataclass(frozen=True)
class CompressSpec:
    output: str
    model: str
    storage: storage.StorageOptions = field(default_factory=storage.StorageOptions)
    batch_size: int = 8
    max_pixels: int | None = None  # padded to multiples of 64, as the codec computes; None: Codec.supported_pixels()
    max_member_bytes: int = MAX_MEMBER_BYTES  # one tar member (checked from its header, before reading)
    max_sidecar_bytes: int = MAX_SIDECAR_BYTES  # all files of a sample but its image
    read_threads: int = 2
    crash: CrashSpec | None = None
    run_id: str = ""  # the run holding the output's lease; workers commit only while it does
    settings: dict = field(default_factory=dict)  # recorded in every marker (what later runs must match)
    device: str = "auto"


@dataclass(frozen=True)
class ShardTask:
    url: str
    shard_id: str
    attempt: int = 0
    avoid: int | None = None  # index of the worker this task last failed on


def maybe_crash(crash: CrashSpec | None, task: ShardTask, n: int) -> None:
    """Exit (or hang in) the worker process if ``crash`` targets this task at this point (tests only)."""
    if crash and crash.shard_id == task.shard_id and task.attempt < crash.attempts and (
            n > crash.after_samples if crash.after_samples else n == 0):
        where = f"after {crash.after_samples} samples" if crash.after_samples else "before its commit"
        if crash.stall:
            log.warning("injected stall in %s %s", task.shard_id, where)
            time.sleep(24 * 3600)
        if crash.fail:
            raise reasons.InfraError(f"injected device failure in {task.shard_id} {where}")
        log.warning("injected crash in %s %s", task.shard_id, where)
        os._exit(17)


def _padded(n: int) -> int:
    return -(-n // 64) * 64


def _prefetch(task: ShardTask, spec: CompressSpec, max_pixels: int, reader_out: list) -> Iterator[Future]:
    """Futures of prepared samples, in shard order, read and decoded on threads ahead of use."""
    fs, path = storage.filesystem(task.url, spec.storage)
    pending: queue.Queue = queue.Queue(maxsize=4 * spec.batch_size)
    done = object()
    pool = ThreadPoolExecutor(max_workers=spec.read_threads, thread_name_prefix="decode")

    def produce() -> None:
        try:
            with fs.open(path, "rb", block_size=8 << 20) as f:
                reader = ShardReader(f, spec.max_member_bytes, spec.max_member_bytes + spec.max_sidecar_bytes)
                reader_out.append(reader)
                for sample in reader:
                    pending.put(pool.submit(prepare, sample, max_pixels, spec.max_sidecar_bytes))
        except Exception as exc:  # recorded as the shard's error by the consumer
            pending.put(exc)
        finally:
            pending.put(done)

    thread = threading.Thread(target=produce, name=f"read-{task.shard_id}", daemon=True)
    thread.start()
    try:
        while (item := pending.get()) is not done:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class ShardCompressor:
    """Callable taking a ShardTask; holds one loaded codec for the life of its worker."""

    def __init__(self, spec: CompressSpec, codec, worker_info: dict | None = None) -> None:
        self.spec = spec
        self.codec = codec
        self.model_id = str(codec.model_id)
        self.worker_info = worker_info or {}
        self.max_pixels = spec.max_pixels or codec.supported_pixels()
        self.worker_info["max_pixels"] = self.max_pixels
        self.fs, self.root = storage.filesystem(spec.output, spec.storage)

    def __call__(self, task: ShardTask) -> ShardStats:
        previous = archive.read_marker(self.fs, self.root, ARCHIVE, task.shard_id)
        if previous is not None:  # committed by an earlier attempt: never write it twice
            previous.skipped = True
            return previous
        name = ARCHIVE.data(task.shard_id)
        attempt = Attempt(self.fs, self.root, task.shard_id, self.spec.run_id, task.attempt, marker=ARCHIVE.marker(task.shard_id))
        attempt.begin([name])
        try:
            stats, rows = self._compress(task)
            storage.write_bytes_atomic(self.fs, storage.join(self.root, name), archive.table_bytes(rows), token=attempt.token)
            maybe_crash(self.spec.crash, task, 0)
            stats.files, stats.settings, stats.run_id = [name], self.spec.settings, self.spec.run_id
        except BaseException:
            attempt.abort()
            raise
        attempt.commit(stats.to_json().encode())
        return stats

    def _compress(self, task: ShardTask) -> tuple[ShardStats, list[dict]]:
        """Every sample of the shard as a row, ok or error; raises only for the unit as a whole."""
        t0 = time.perf_counter()
        stats = ShardStats(task.shard_id, task.url, ARCHIVE.data(task.shard_id), worker=self.worker_info, attempt=task.attempt)
        rows: list[dict] = []
        groups: dict[tuple[int, int], list[PreparedSample]] = defaultdict(list)
        buffered = 0
        readers: list[ShardReader] = []
        for n, future in enumerate(_prefetch(task, self.spec, self.max_pixels, readers), start=1):
            maybe_crash(self.spec.crash, task, n)
            prepared = future.result()
            if prepared.error:
                rows.append(self._error_row(task, prepared, stats))
                continue
            group = groups[(_padded(prepared.height), _padded(prepared.width))]
            group.append(prepared)
            buffered += 1
            if len(group) < self.spec.batch_size and buffered < 4 * self.spec.batch_size:
                continue
            # a full batch, or too many images waiting in partial batches of mixed sizes
            fullest = max(groups.values(), key=len)
            rows += self._encode(task, fullest, stats)
            buffered -= len(fullest)
            fullest.clear()
        for group in groups.values():
            if group:
                rows += self._encode(task, group, stats)
        self._reader_stats(readers[0] if readers else None, stats)
        rows.sort(key=lambda r: r["source_index"])
        stats.seconds = time.perf_counter() - t0
        return stats, rows

    @staticmethod
    def _reader_stats(reader: ShardReader | None, stats: ShardStats) -> None:
        if reader is None:
            return
        stats.shard_error = reader.error
        stats.skipped_members, stats.skipped_count = reader.skipped_members, reader.skipped_count
        if reader.members == 0:
            stats.warning = "the shard is a valid tar without any member"
            log.warning("%s: %s", stats.source, stats.warning)

    def _base_row(self, task: ShardTask, p: PreparedSample) -> dict:
        return {
            "key": p.key, "source_shard": task.url, "source_index": p.index, "width": p.width, "height": p.height,
            "mode": p.mode, "frames": p.frames, "bitstream": None, "num_bytes": None, "bpp": None, "model_id": self.model_id,
            "codec_version": CODEC_VERSION, "original_sha256": p.original_sha256, "original_bytes": p.original_bytes,
            "original_format": p.original_format, "meta_json": p.meta_json, "status": "error", "error": p.error,
            "error_code": p.error_code, "encode_ms": None, "encoded_at": datetime.now(timezone.utc),
        }

    def _error_row(self, task: ShardTask, p: PreparedSample, stats: ShardStats) -> dict:
        stats.count_error(p.error_code, p.error)
        return self._base_row(task, p)

    def _encode(self, task: ShardTask, batch: list[PreparedSample], stats: ShardStats) -> list[dict]:
        """Rows of a batch. The codec refusing an image is that image's row; a device or memory failure
        is retried on smaller batches and, for a single image, fails the attempt (InfraError)."""
        t0 = time.perf_counter()
        try:
            streams = self.codec.compress([p.image for p in batch])
        except ModelFormatError as exc:  # the model itself is broken (e.g. its latents overflow): every row would fail
            raise reasons.InfraError(f"the model failed on this worker: {exc}") from exc
        except ValueError as exc:  # the codec's verdict on an input (rdeic errors are ValueErrors)
            if len(batch) > 1:
                return [row for p in batch for row in self._encode(task, [p], stats)]
            p = batch[0].fail("encode_failed", f"{batch[0].key}: the codec refused the image: {type(exc).__name__}: {str(exc)[:200]}")
            return [self._error_row(task, p, stats)]
        except Exception as exc:
            if reasons.is_out_of_memory(exc) and len(batch) > 1:
                half = len(batch) // 2
                log.warning("out of memory on a batch of %d; retrying in halves", len(batch))
                return self._encode(task, batch[:half], stats) + self._encode(task, batch[half:], stats)
            raise reasons.InfraError(f"encoding failed on {self.worker_info.get('device', 'the device')} "
                                     f"({len(batch)} image(s)): {type(exc).__name__}: {str(exc)[:300]}") from exc
        elapsed = time.perf_counter() - t0
        stats.model_seconds += elapsed
        per_image_ms = elapsed * 1000 / len(batch)
        now = datetime.now(timezone.utc)
        rows = []
        for p, data in zip(batch, streams):
            row = self._base_row(task, p)
            row.update(bitstream=data, num_bytes=len(data), bpp=len(data) * 8 / (p.width * p.height),
                       status="ok", error=None, error_code=None, encode_ms=per_image_ms, encoded_at=now)
            rows.append(row)
            stats.ok += 1
            stats.bytes_in += p.original_bytes
            stats.bytes_out += len(data)
            stats.bitstream_bytes += len(data)
            stats.pixels += p.width * p.height
            p.image = None  # free the pixels once coded
        return rows
