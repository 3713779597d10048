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

from . import archive, storage
from .archive import ShardStats
from .samples import PreparedSample, prepare
from .shards import ShardReader

log = logging.getLogger(__name__)

CODEC_VERSION = "rdeic-archive/0.1 bitstream/1"


@dataclass(frozen=True)
class CrashSpec:
    """Fault injection for tests: the worker process exits abruptly inside a shard."""

    shard_id: str
    after_samples: int = 1
    attempts: int = 1  # crash on this many attempts, then let the shard through
    stall: bool = False  # hang instead of exiting, so that a test can kill the driver mid-shard


@dataclass(frozen=True)
class CompressSpec:
    output: str
    model: str
    storage: storage.StorageOptions = field(default_factory=storage.StorageOptions)
    batch_size: int = 8
    max_pixels: int = 4096 * 4096
    read_threads: int = 2
    crash: CrashSpec | None = None


@dataclass(frozen=True)
class ShardTask:
    url: str
    shard_id: str
    attempt: int = 0


def maybe_crash(crash: CrashSpec | None, task: ShardTask, n: int) -> None:
    """Exit (or hang in) the worker process if ``crash`` targets this task (tests only)."""
    if crash and crash.shard_id == task.shard_id and task.attempt < crash.attempts and n > crash.after_samples:
        if crash.stall:
            log.warning("injected stall in shard %s after %d samples", task.shard_id, crash.after_samples)
            time.sleep(24 * 3600)
        log.warning("injected crash in shard %s after %d samples", task.shard_id, crash.after_samples)
        os._exit(17)


def _padded(n: int) -> int:
    return -(-n // 64) * 64


def _prefetch(task: ShardTask, spec: CompressSpec, reader_out: list) -> Iterator[Future]:
    """Futures of prepared samples, in shard order, read and decoded on threads ahead of use."""
    fs, path = storage.filesystem(task.url, spec.storage)
    pending: queue.Queue = queue.Queue(maxsize=4 * spec.batch_size)
    done = object()
    pool = ThreadPoolExecutor(max_workers=spec.read_threads, thread_name_prefix="decode")

    def produce() -> None:
        try:
            with fs.open(path, "rb", block_size=8 << 20) as f:
                reader = ShardReader(f)
                reader_out.append(reader)
                for sample in reader:
                    pending.put(pool.submit(prepare, sample, spec.max_pixels))
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
        self.fs, self.root = storage.filesystem(spec.output, spec.storage)

    def __call__(self, task: ShardTask) -> ShardStats:
        previous = archive.read_marker(self.fs, self.root, task.shard_id)
        if previous is not None:  # committed by an earlier attempt: never write it twice
            previous.skipped = True
            return previous
        t0 = time.perf_counter()
        stats = ShardStats(task.shard_id, task.url, archive.part_name(task.shard_id), worker=self.worker_info, attempt=task.attempt)
        rows: list[dict] = []
        groups: dict[tuple[int, int], list[PreparedSample]] = defaultdict(list)
        buffered = 0
        readers: list[ShardReader] = []
        for n, future in enumerate(_prefetch(task, self.spec, readers), start=1):
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
        if readers and readers[0].error:
            stats.shard_error = readers[0].error
        rows.sort(key=lambda r: r["source_index"])
        stats.seconds = time.perf_counter() - t0
        archive.write_part(self.fs, self.root, task.shard_id, rows, stats)
        return stats

    def _base_row(self, task: ShardTask, p: PreparedSample) -> dict:
        return {
            "key": p.key, "source_shard": task.url, "source_index": p.index, "width": p.width, "height": p.height,
            "mode": p.mode, "bitstream": None, "num_bytes": None, "bpp": None, "model_id": self.model_id,
            "codec_version": CODEC_VERSION, "original_sha256": p.original_sha256, "original_bytes": p.original_bytes,
            "original_format": p.original_format, "meta_json": p.meta_json, "status": "error", "error": p.error,
            "encode_ms": None, "encoded_at": datetime.now(timezone.utc),
        }

    def _error_row(self, task: ShardTask, p: PreparedSample, stats: ShardStats) -> dict:
        stats.count_error(p.error or "unknown error")
        return self._base_row(task, p)

    def _encode(self, task: ShardTask, batch: list[PreparedSample], stats: ShardStats) -> list[dict]:
        t0 = time.perf_counter()
        try:
            streams = self.codec.compress([p.image for p in batch])
        except (RuntimeError, ValueError, MemoryError) as exc:
            if len(batch) == 1:
                p = batch[0]
                p.error, p.image = f"{p.key}: encoding failed: {type(exc).__name__}: {str(exc)[:200]}", None
                return [self._error_row(task, p, stats)]
            log.warning("batch of %d failed (%s); encoding its images one by one", len(batch), exc)
            return [row for p in batch for row in self._encode(task, [p], stats)]
        elapsed = time.perf_counter() - t0
        stats.model_seconds += elapsed
        per_image_ms = elapsed * 1000 / len(batch)
        now = datetime.now(timezone.utc)
        rows = []
        for p, data in zip(batch, streams):
            row = self._base_row(task, p)
            row.update(bitstream=data, num_bytes=len(data), bpp=len(data) * 8 / (p.width * p.height),
                       status="ok", error=None, encode_ms=per_image_ms, encoded_at=now)
            rows.append(row)
            stats.ok += 1
            stats.bytes_in += p.original_bytes
            stats.bytes_out += len(data)
            stats.bitstream_bytes += len(data)
            stats.pixels += p.width * p.height
            p.image = None  # free the pixels once coded
        return rows
