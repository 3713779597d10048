"""Decode one archive part into a WebDataset shard or a folder (the worker's job, without Ray).

Each ok row becomes ``<key>.png`` plus its original sidecar files. Rows that were errors at
compress time, and rows whose bitstream fails its checks, are listed in the output's commit
marker (``failed_keys``) with the reason; nothing is silently dropped.
"""

from __future__ import annotations

import io
import logging
import tarfile
import time
from dataclasses import dataclass, field
from typing import Callable

from rdeic.images import encode_png

from . import archive, storage
from .archive import ShardStats
from .compress import CrashSpec, ShardTask, maybe_crash
from .manifest import Layout
from .samples import sidecars_from_json

log = logging.getLogger(__name__)

FORMATS = ("webdataset", "folder")


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
    keys: frozenset[str] | None = None  # decode only these keys
    crash: CrashSpec | None = None


class _TarSink:
    def __init__(self, fileobj) -> None:
        self.tar = tarfile.open(fileobj=fileobj, mode="w|")

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()


class _FolderSink:
    def __init__(self, fs, folder: str) -> None:
        self.fs, self.folder = fs, folder

    def add(self, name: str, data: bytes) -> None:
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"refusing to write outside the output folder: {name!r}")
        storage.write_bytes_atomic(self.fs, storage.join(self.folder, name), data)

    def close(self) -> None:
        pass


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

    def _marker_path(self, part_id: str) -> str:
        return storage.join(self.root, self.layout.marker(part_id))

    def __call__(self, task: ShardTask) -> ShardStats:
        marker = self._marker_path(task.shard_id)
        if self.fs.exists(marker):
            with self.fs.open(marker, "rb") as f:
                stats = ShardStats.from_json(f.read().decode())
            stats.skipped = True
            return stats
        t0 = time.perf_counter()
        out_name = self.layout.data(task.shard_id)
        stats = ShardStats(task.shard_id, task.url, out_name, worker=self.worker_info, attempt=task.attempt)
        table = archive.read_part(self.archive_fs, self.archive_root, task.shard_id,
                                  columns=["key", "status", "error", "bitstream", "meta_json", "width", "height"])
        rows = table.to_pylist()
        if self.spec.keys is not None:
            rows = [r for r in rows if r["key"] in self.spec.keys]
        out_path = storage.join(self.root, out_name)
        if self.spec.format == "webdataset":
            with storage.open_atomic(self.fs, out_path) as f:
                sink = _TarSink(f)
                self._decode_rows(task, rows, sink.add, stats)
                sink.close()
        else:
            self._decode_rows(task, rows, _FolderSink(self.fs, out_path).add, stats)
        stats.seconds = time.perf_counter() - t0
        storage.write_bytes_atomic(self.fs, marker, stats.to_json().encode())
        return stats

    def _decode_rows(self, task: ShardTask, rows: list[dict], add: Callable[[str, bytes], None], stats: ShardStats) -> None:
        pending: list[dict] = []
        for n, row in enumerate(rows, start=1):
            maybe_crash(self.spec.crash, task, n)
            if row["status"] != "ok" or row["bitstream"] is None:
                self._fail(stats, row["key"], f"not decodable: the archive row is an error ({row['error']})")
                continue
            pending.append(row)
            if len(pending) >= self.spec.batch_size:
                self._flush(pending, add, stats)
                pending = []
        if pending:
            self._flush(pending, add, stats)

    def _flush(self, rows: list[dict], add: Callable[[str, bytes], None], stats: ShardStats) -> None:
        results = self.codec.decompress_results([r["bitstream"] for r in rows], steps=self.spec.steps, detail=self.spec.detail)
        for row, result in zip(rows, results):
            if not hasattr(result, "shape"):
                self._fail(stats, row["key"], f"bitstream refused: {type(result).__name__}: {result}")
                continue
            png = encode_png(result)
            add(f"{row['key']}.png", png)
            for ext, data in sidecars_from_json(row["meta_json"]).items():
                add(f"{row['key']}.{ext}", data)
            stats.ok += 1
            stats.bytes_in += len(row["bitstream"])
            stats.bitstream_bytes += len(row["bitstream"])
            stats.bytes_out += len(png)
            stats.pixels += int(result.shape[0]) * int(result.shape[1])

    @staticmethod
    def _fail(stats: ShardStats, key: str, reason: str) -> None:
        stats.count_error(reason)
        stats.failed_keys.append({"key": key, "reason": reason})
