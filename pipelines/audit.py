"""Audit one archive part (the worker's job, without Ray): every row's integrity, then its sampled rows' quality.

Integrity (no diffusion): the part is present and readable, its row count is its commit
marker's, its ok rows have distinct keys, and each ok row's bitstream parses (magic, version,
CRC32), names this archive's model, and entropy-decodes to the encoder's symbol CRC, with
``num_bytes`` and ``bpp`` agreeing with the bytes. Every fault is a *changed* finding (key,
check, expected, actual) or, for an absent part, a *missing* one.

Quality: the part's quota of sound rows, drawn by pipelines/sampling.py, is decoded and
compared with its original, read back from the source shard the row names (checked against
``original_sha256``; a source gone or changed is that image's outcome), with the metrics of
rdeic/metrics.py and, at a matched rate, the classical codecs of rdeic/baselines.py.

The unit's output is a folder in the report's run folder, committed once::

    unit-<part>/findings.json      integrity counts and findings
    unit-<part>/samples.parquet    one row per sampled image; PNG crops for the part's worst images
    unit-<part>/features.npz       Inception features of the patches, originals and decodings (FID/KID)
"""

from __future__ import annotations

import io
import json
import logging
import math
import posixpath
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rdeic.bitstream import DEFAULT_MAX_PIXELS
from rdeic.errors import (BitstreamError, ChecksumError, EntropyDesyncError, ImageTooLargeError,
                          ModelMismatchError)
from rdeic.images import encode_png
from rdeic.metrics import PAIR_METRICS
from rdeic.shards import ShardReader

from . import archive, storage
from .archive import ARCHIVE, Layout, ShardStats
from .compress import CrashSpec, ShardTask, maybe_crash
from .decode import decode_results
from .ownership import Attempt
from .sampling import draw
from .samples import prepare

log = logging.getLogger(__name__)

LAYOUT = Layout("unit-", "")
FINDINGS, SAMPLES, FEATURES = "findings.json", "samples.parquet", "features.npz"
OUTCOMES = ("ok", "source_missing", "source_changed", "source_unreadable", "decode_failed")
VERIFY_CHUNK = 256  # rows entropy-decoded per call
CROP = 192  # side of the crops shown for the worst images


def sample_schema(baselines: tuple[str, ...]) -> pa.Schema:
    """Columns of ``samples.parquet`` (and, without the crops, of the report's ``rows.parquet``)."""
    f64 = pa.float64()
    cols = [("key", pa.string()), ("part", pa.string()), ("source_shard", pa.string()), ("source_index", pa.int64()),
            ("width", pa.int32()), ("height", pa.int32()), ("outcome", pa.string()), ("reason", pa.string()),
            ("bpp", f64), ("num_bytes", pa.int64()), ("mse", f64), *((m, f64) for m in PAIR_METRICS),
            ("decode_seconds", f64), ("metric_seconds", f64), ("baseline_seconds", f64)]
    for b in baselines:
        cols += [(f"{b}_quality", pa.int32()), (f"{b}_bpp", f64), (f"{b}_at_floor", pa.bool_()), (f"{b}_mse", f64),
                 *((f"{b}_{m}", f64) for m in PAIR_METRICS if m != "niqe")]
    cols += [("crop_original", pa.binary()), ("crop_rdeic", pa.binary()), ("crop_baseline", pa.binary()),
             ("crop_baseline_name", pa.string()), ("crop_why", pa.string())]
    return pa.schema([pa.field(n, t) for n, t in cols])


CROP_COLUMNS = ("crop_original", "crop_rdeic", "crop_baseline", "crop_baseline_name", "crop_why")


@dataclass(frozen=True)
class AuditSpec:
    archive: str
    report: str  # this run's folder
    model: str
    storage: storage.StorageOptions = field(default_factory=storage.StorageOptions)
    quotas: dict = field(default_factory=dict)  # part id -> rows to draw
    seed: str = "0"
    metrics: tuple[str, ...] = ("psnr", "ssim", "ms_ssim", "delta_e", "lpips", "dists", "niqe", "fid", "kid")
    baselines: tuple[str, ...] = ("jpeg", "webp", "avif")
    steps: int | None = None
    detail: float = 1.0
    batch_size: int = 8
    max_pixels: int = DEFAULT_MAX_PIXELS
    source_root: str | None = None  # where the source shards are now, if they moved
    backbones: str | None = None  # folder of the metrics' backbone weights
    worst_k: int = 6  # crops kept per part (the report shows the worst of all parts)
    crash: CrashSpec | None = None
    run_id: str = ""
    settings: dict = field(default_factory=dict)
    device: str = "auto"


@dataclass
class Findings:
    rows: int = 0
    ok_rows: int = 0
    error_rows: int = 0
    rows_checked: int = 0  # ok rows whose bitstream was checked
    changed: list[dict] = field(default_factory=list)
    missing: list[dict] = field(default_factory=list)
    scan_seconds: float = 0.0
    unavailable: dict = field(default_factory=dict)  # metric -> why it was not measured on this worker

    def change(self, part: str, key: str | None, check: str, expected: object, actual: object) -> None:
        self.changed.append({"key": key, "part": part, "check": check, "expected": str(expected)[:300],
                             "actual": str(actual)[:300]})


def _check_of(exc: BitstreamError) -> str:
    for cls, check in ((ChecksumError, "crc"), (ModelMismatchError, "model"), (EntropyDesyncError, "entropy"),
                       (ImageTooLargeError, "size")):
        if isinstance(exc, cls):
            return check
    return "bitstream"


class PartAuditor:
    def __init__(self, spec: AuditSpec, codec, worker_info: dict | None = None, suite=None) -> None:
        from rdeic.metrics import MetricSuite

        self.spec, self.codec, self.worker_info = spec, codec, worker_info or {}
        self.archive_fs, self.archive_root = storage.filesystem(spec.archive, spec.storage)
        self.fs, self.root = storage.filesystem(spec.report, spec.storage)
        self.unavailable: dict[str, str] = {}  # baselines this worker's Pillow cannot encode
        self.suite = suite or MetricSuite(spec.metrics, backbones=spec.backbones, device=str(getattr(codec, "device", "cpu")))

    def __call__(self, task: ShardTask) -> ShardStats:
        previous = archive.read_marker(self.fs, self.root, LAYOUT, task.shard_id)
        if previous is not None:
            previous.skipped = True
            return previous
        t0 = time.perf_counter()
        part = task.shard_id
        stats = ShardStats(part, task.url, LAYOUT.data(part), worker=self.worker_info, attempt=task.attempt)
        findings = Findings()
        rows = self._read(part, findings)
        sound = self._check(part, rows, findings)
        findings.scan_seconds = time.perf_counter() - t0
        picked = [sound[i] for i in draw([rows[j]["key"] for j in sound], self.spec.quotas.get(part, 0), self.spec.seed)]
        samples, features = self._audit(part, rows, picked, stats)
        findings.unavailable = {**self.suite.unavailable, **self.unavailable}
        attempt = Attempt(self.fs, self.root, part, self.spec.run_id, task.attempt, marker=LAYOUT.marker(part))
        try:
            stats.files = self._write(attempt, part, findings, samples, features)
            maybe_crash(self.spec.crash, task, 0)
        except BaseException:
            attempt.abort()
            raise
        stats.seconds = time.perf_counter() - t0
        stats.settings, stats.run_id = self.spec.settings, self.spec.run_id
        attempt.commit(stats.to_json().encode())
        return stats

    # ------------------------------------------------------------ integrity
    def _read(self, part: str, findings: Findings) -> list[dict]:
        path = archive.part_name(part)
        try:
            marker = archive.read_marker(self.archive_fs, self.archive_root, ARCHIVE, part)
        except archive.MarkerError as exc:
            findings.change(part, None, "marker", "a commit marker of this archive", exc)
            marker = None
        expected = None if marker is None else marker.ok + marker.errors
        try:
            rows = archive.read_part(self.archive_fs, self.archive_root, part).to_pylist()
        except FileNotFoundError:
            findings.missing.append({"part": part, "path": path, "expected": f"a part of {expected} rows"})
            return []
        except Exception as exc:  # whatever a damaged file makes the Parquet reader raise
            findings.change(part, None, "readable", f"a Parquet part of {expected} rows",
                            f"{type(exc).__name__}: {str(exc)[:200]}")
            return []
        findings.rows = len(rows)
        if expected is not None and len(rows) != expected:
            findings.change(part, None, "row_count", expected, len(rows))
        return rows

    def _check(self, part: str, rows: list[dict], findings: Findings) -> list[int]:
        """Positions of the ok rows that pass every check (the only ones the sample draws from)."""
        model_id, seen, candidates, failed, unreadable = self.spec.settings.get("model_id"), {}, [], set(), set()
        for i, row in enumerate(rows):
            if row["status"] != "ok":
                findings.error_rows += 1
                continue
            findings.ok_rows += 1
            key, data = row["key"], row["bitstream"]
            if key in seen:
                findings.change(part, key, "duplicate_key", "one ok row per key", f"ok rows {seen[key]} and {i}")
                continue
            seen[key] = i
            if data is None:
                findings.change(part, key, "bitstream", "a bitstream", "none")
                continue
            candidates.append(i)
            crc = _crc_problem(data)
            if crc:  # the bytes changed since they were written: nothing in them is worth checking further
                findings.change(part, key, "crc", *crc)
                failed.add(i)
                unreadable.add(i)
                continue
            if row["num_bytes"] != len(data):
                findings.change(part, key, "num_bytes", len(data), row["num_bytes"])
                failed.add(i)
            w, h = row["width"] or 0, row["height"] or 0
            bpp = len(data) * 8 / (w * h) if w > 0 and h > 0 else None
            if bpp is None or row["bpp"] is None or not math.isclose(row["bpp"], bpp, rel_tol=1e-9):
                findings.change(part, key, "bpp", f"{bpp} (from {len(data)} bytes, {w}x{h})", row["bpp"])
                failed.add(i)
            if model_id and row["model_id"] != model_id:
                findings.change(part, key, "model", model_id, row["model_id"])
                failed.add(i)
        checkable = [i for i in candidates if i not in unreadable]
        for start in range(0, len(checkable), VERIFY_CHUNK):
            chunk = checkable[start:start + VERIFY_CHUNK]
            for i, error in zip(chunk, self.codec.verify([rows[i]["bitstream"] for i in chunk], max_pixels=self.spec.max_pixels)):
                row = rows[i]
                if error is None:
                    header = self.codec.parse(row["bitstream"]).header
                    if (header.width, header.height) != (row["width"], row["height"]):
                        error_check = ("size", f"{row['width']}x{row['height']} (the row)", f"{header.width}x{header.height}")
                        findings.change(part, row["key"], *error_check)
                        failed.add(i)
                    continue
                findings.change(part, row["key"], _check_of(error), "a sound bitstream of this archive's model",
                                f"{type(error).__name__}: {error}")
                failed.add(i)
        findings.rows_checked = len(candidates)
        return [i for i in candidates if i not in failed]

    # -------------------------------------------------------------- quality
    def _audit(self, part: str, rows: list[dict], picked: list[int], stats: ShardStats) -> tuple[list[dict], dict]:
        out = [self._sample_row(part, rows[i]) for i in picked]
        originals = self._originals([rows[i] for i in picked], out)
        decoded = self._decode([rows[i] for i in picked], out)
        real, fake = [], []
        windows: dict[int, tuple[slice, slice]] = {}  # where each image's crops are cut
        baseline_cuts: dict[int, dict[str, np.ndarray]] = {}  # only the crops of the baselines' decodings are kept
        for j, row in enumerate(out):
            if row["outcome"] != "ok":
                stats.errors += 1  # the sample's outcome, not an archive error: no reason code of compress
                stats.error_reasons[row["outcome"]] = stats.error_reasons.get(row["outcome"], 0) + 1
                stats.error_examples.setdefault(row["outcome"], f"{row['key']}: {row['reason']}"[:300])
                continue
            original, image = originals[j], decoded[j]
            t0 = time.perf_counter()
            row.update(self.suite.pair(original, image))
            if self.suite.distribution:
                real.append(self.suite.features([original]))
                fake.append(self.suite.features([image]))
            row["metric_seconds"] = time.perf_counter() - t0
            top, left = _worst_window(original, image, CROP)
            windows[j] = (slice(top, top + CROP), slice(left, left + CROP))
            baseline_cuts[j] = self._baselines(row, original, windows[j])
            stats.ok += 1
            stats.pixels += row["width"] * row["height"]
            stats.bitstream_bytes += row["num_bytes"]
        self._crops(out, originals, decoded, windows, baseline_cuts)
        features = {}
        if real:
            features = {"real": np.concatenate(real).astype(np.float32), "fake": np.concatenate(fake).astype(np.float32)}
        return out, features

    def _sample_row(self, part: str, row: dict) -> dict:
        out = {name: None for name in sample_schema(self.spec.baselines).names}
        out.update(key=row["key"], part=part, source_shard=row["source_shard"], source_index=row["source_index"],
                   width=row["width"], height=row["height"], outcome="ok", bpp=row["bpp"], num_bytes=row["num_bytes"])
        return out

    def _source(self, url: str) -> str | None:
        """Where the row's source shard is now (None: the row names no shard file); under --source-root,
        only the file name is kept from the row, so no row can point above that folder."""
        if not self.spec.source_root:
            return url
        name = posixpath.basename(url.rstrip("/"))
        return None if name in ("", ".", "..") else storage.join(self.spec.source_root, name)

    def _originals(self, rows: list[dict], out: list[dict]) -> dict[int, np.ndarray]:
        """Each sampled row's original as RGB, read back from its source shard; else its outcome says why."""
        by_source: dict[str, dict[str, int]] = {}
        for j, row in enumerate(rows):
            url = self._source(row["source_shard"])
            if url is None:
                out[j]["outcome"], out[j]["reason"] = "source_missing", f"the row's source {row['source_shard']!r} names no shard file"
                continue
            by_source.setdefault(url, {})[row["key"]] = j
        images: dict[int, np.ndarray] = {}
        for url, wanted in by_source.items():
            error = self._read_source(url, wanted, rows, out, images)
            for j in wanted.values():
                if j not in images and out[j]["outcome"] == "ok":
                    out[j]["outcome"], out[j]["reason"] = error or ("source_changed", f"{url} no longer holds key {rows[j]['key']!r}")
        return images

    def _read_source(self, url: str, wanted: dict[str, int], rows: list[dict], out: list[dict],
                     images: dict[int, np.ndarray]) -> tuple[str, str] | None:
        """Read the wanted samples of one shard; the outcome of those not read, if the shard failed."""
        try:
            fs, path = storage.filesystem(url, self.spec.storage)
            with fs.open(path, "rb") as f:
                reader = ShardReader(f)
                left = set(wanted)
                for sample in reader:
                    j = wanted.get(sample.key)
                    if j is None or sample.key not in left:
                        continue
                    left.discard(sample.key)
                    self._compare(prepare(sample, max_pixels=self.spec.max_pixels), rows[j], out[j], images, j, url)
                    if not left:
                        break
            if reader.error and left:
                return "source_unreadable", f"{url}: {reader.error}"
        except FileNotFoundError:
            return "source_missing", f"{url} does not exist"
        except OSError as exc:
            return "source_unreadable", f"{url}: {storage.explain(exc) or exc}"
        return None

    @staticmethod
    def _compare(prepared, row: dict, out: dict, images: dict, j: int, url: str) -> None:
        if prepared.original_sha256 != row["original_sha256"]:
            out["outcome"] = "source_changed"
            out["reason"] = (f"{url}: the original of {row['key']!r} has sha256 {prepared.original_sha256}, "
                             f"the archive recorded {row['original_sha256']}")
        elif prepared.error:
            out["outcome"], out["reason"] = "source_unreadable", prepared.error
        else:
            images[j] = prepared.image

    def _decode(self, rows: list[dict], out: list[dict]) -> dict[int, np.ndarray]:
        todo = [j for j, row in enumerate(out) if row["outcome"] == "ok"]
        images: dict[int, np.ndarray] = {}
        for start in range(0, len(todo), self.spec.batch_size):
            batch = todo[start:start + self.spec.batch_size]
            t0 = time.perf_counter()
            results = decode_results(self.codec, [rows[j]["bitstream"] for j in batch], self.spec.steps, self.spec.detail,
                                     self.spec.max_pixels, self.worker_info.get("device", "the device"),
                                     [rows[j]["key"] for j in batch])
            each = (time.perf_counter() - t0) / len(batch)
            for j, result in zip(batch, results):
                out[j]["decode_seconds"] = each
                if isinstance(result, BitstreamError):
                    out[j]["outcome"], out[j]["reason"] = "decode_failed", f"{type(result).__name__}: {result}"
                else:
                    images[j] = result
        return images

    def _baselines(self, row: dict, original: np.ndarray, cut: tuple[slice, slice]) -> dict[str, np.ndarray]:
        """Each baseline at the row's rate, measured; returns their decodings' crops at ``cut``."""
        from rdeic.baselines import BaselineUnavailableError, matched

        t0 = time.perf_counter()
        cuts = {}
        for fmt in self.spec.baselines:
            if fmt in self.unavailable:
                continue
            try:
                b = matched(original, row["bpp"], fmt)
            except BaselineUnavailableError as exc:  # this worker's Pillow lacks the format
                self.unavailable[fmt] = f"unavailable ({exc})"
                continue
            row.update({f"{fmt}_quality": b.quality, f"{fmt}_bpp": b.bpp, f"{fmt}_at_floor": b.at_floor})
            for name, value in self.suite.pair(original, b.decoded).items():
                if name != "niqe":
                    row[f"{fmt}_{name}"] = value
            cuts[fmt] = b.decoded[cut]
        row["baseline_seconds"] = time.perf_counter() - t0
        return cuts

    # ---------------------------------------------------------------- crops
    def _crops(self, out: list[dict], originals: dict, decoded: dict, windows: dict, baseline_cuts: dict) -> None:
        """PNG crops (original | RDEIC | best baseline) of this part's worst images, where they differ most."""
        ok = [j for j, row in enumerate(out) if row["outcome"] == "ok"]
        metric = "lpips" if any(out[j]["lpips"] is not None for j in ok) else "psnr"
        worst = sorted(ok, key=lambda j: _badness(out[j], metric))[: self.spec.worst_k]
        for j in worst:
            row, original, image, cut = out[j], originals[j], decoded[j], windows[j]
            row["crop_original"], row["crop_rdeic"] = encode_png(original[cut]), encode_png(image[cut])
            row["crop_why"] = f"{metric} {row[metric]:.4g}" if row[metric] is not None else metric
            best = self._best_baseline(row, metric)
            if best is not None:
                row["crop_baseline"], row["crop_baseline_name"] = encode_png(baseline_cuts[j][best]), best

    def _best_baseline(self, row: dict, metric: str) -> str | None:
        scored = [(b, row.get(f"{b}_{metric}")) for b in self.spec.baselines]
        scored = [(b, v) for b, v in scored if v is not None]
        if not scored:
            return None
        return (min if metric == "lpips" else max)(scored, key=lambda bv: bv[1])[0]

    # --------------------------------------------------------------- output
    def _write(self, attempt: Attempt, part: str, findings: Findings, samples: list[dict], features: dict) -> list[str]:
        folder = LAYOUT.data(part)
        blobs = {FINDINGS: json.dumps(findings.__dict__, indent=1).encode(),
                 SAMPLES: _parquet(samples, sample_schema(self.spec.baselines))}
        if features:
            buf = io.BytesIO()
            np.savez(buf, **features)
            blobs[FEATURES] = buf.getvalue()
        files = [posixpath.join(folder, name) for name in blobs]
        attempt.begin(files, [folder])
        self.fs.makedirs(storage.join(self.root, folder), exist_ok=True)
        for rel, data in zip(files, blobs.values()):
            storage.write_bytes_atomic(self.fs, storage.join(self.root, rel), data, token=attempt.token)
        return files


def _crc_problem(data: bytes) -> tuple[str, str] | None:
    """(expected, actual) when the trailing CRC32 does not match the bytes before it: the fixity check proper."""
    if len(data) < 5:
        return "a bitstream with its CRC32", f"{len(data)} bytes"
    stored, actual = int.from_bytes(data[-4:], "little"), zlib.crc32(data[:-4])
    return None if stored == actual else (f"crc32 {stored:08x} (stored)", f"crc32 {actual:08x}")


def _badness(row: dict, metric: str) -> float:
    value = row[metric]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.inf
    return -value if metric == "lpips" else value


def _worst_window(a: np.ndarray, b: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of the size×size window (stride size/4) with the largest squared error."""
    err = ((a.astype(np.float32) - b.astype(np.float32)) ** 2).sum(axis=2)
    h, w = err.shape
    if h <= size and w <= size:
        return 0, 0
    integral = np.pad(err.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    stride = max(size // 4, 1)
    best, corner = -1.0, (0, 0)
    for top in range(0, max(h - size, 0) + 1, stride):
        for left in range(0, max(w - size, 0) + 1, stride):
            bottom, right = min(top + size, h), min(left + size, w)
            total = integral[bottom, right] - integral[top, right] - integral[bottom, left] + integral[top, left]
            if total > best:
                best, corner = total, (top, left)
    return corner


def _parquet(rows: list[dict], schema: pa.Schema) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf, compression="zstd")
    return buf.getvalue()
