"""The Parquet archive: one part per input shard, then its commit marker.

::

    archive/
      _manifest.json                        job config, model id, committed parts
      _summary.json                         the last run's summary
      _commits/part-<shard-id>.stats.json   commit marker: the shard's stats, written after the part
      part-<shard-id>.parquet               one row per input sample (ok or error)

A part without its marker is an uncommitted leftover: a resumed job removes and redoes it.
Readers need only pyarrow (or pandas, DuckDB, Ray Data); the folder reads as one dataset,
since dataset readers skip names starting with "_" or ".".
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage

SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source_shard", pa.string(), nullable=False),
        pa.field("source_index", pa.int64(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("mode", pa.string()),
        pa.field("bitstream", pa.binary()),
        pa.field("num_bytes", pa.int64()),
        pa.field("bpp", pa.float64()),
        pa.field("model_id", pa.string()),
        pa.field("codec_version", pa.string()),
        pa.field("original_sha256", pa.string()),
        pa.field("original_bytes", pa.int64()),
        pa.field("original_format", pa.string()),
        pa.field("meta_json", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("encode_ms", pa.float64()),
        pa.field("encoded_at", pa.timestamp("us", tz="UTC")),
    ]
)


def part_name(shard_id: str) -> str:
    return f"part-{shard_id}.parquet"


COMMITS = "_commits"


def marker_name(shard_id: str) -> str:
    return f"{COMMITS}/part-{shard_id}.stats.json"


@dataclass
class ShardStats:
    """Per-shard outcome; its JSON is the commit marker."""

    shard_id: str
    source: str
    output: str
    ok: int = 0
    errors: int = 0
    bytes_in: int = 0  # compress: original image bytes; decode: bitstream bytes (ok samples)
    bytes_out: int = 0  # compress: bitstream bytes; decode: written PNG bytes
    bitstream_bytes: int = 0
    pixels: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0  # time inside the codec (the rest is reading, decoding, writing)
    shard_error: str | None = None  # the shard could not be read to its end
    error_reasons: dict[str, int] = field(default_factory=dict)  # capped histogram of reasons
    failed_keys: list[dict] = field(default_factory=list)  # decode: every key that failed, with why
    worker: dict = field(default_factory=dict)
    attempt: int = 0
    skipped: bool = False  # already committed by an earlier run

    @property
    def mean_bpp(self) -> float | None:
        return self.bitstream_bytes * 8 / self.pixels if self.pixels else None

    def to_json(self) -> str:
        data = asdict(self)
        data["mean_bpp"] = self.mean_bpp
        data.pop("skipped")
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ShardStats":
        data = json.loads(text)
        data.pop("mean_bpp", None)
        return cls(**data)

    def count_error(self, reason: str, limit: int = 50) -> None:
        self.errors += 1
        short = reason.split(":")[-1].strip()[:120] if ":" in reason else reason[:120]
        if short in self.error_reasons or len(self.error_reasons) < limit:
            self.error_reasons[short] = self.error_reasons.get(short, 0) + 1
        else:
            self.error_reasons["(other reasons)"] = self.error_reasons.get("(other reasons)", 0) + 1


def table_bytes(rows: list[dict]) -> bytes:
    """A Parquet file of the archive schema; bitstreams are already entropy coded, so not compressed."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    buf = io.BytesIO()
    compression = {name: "zstd" for name in SCHEMA.names}
    compression["bitstream"] = "none"
    pq.write_table(table, buf, compression=compression, row_group_size=1024)
    return buf.getvalue()


def write_part(fs, root: str, shard_id: str, rows: list[dict], stats: ShardStats) -> None:
    """Data first, then the marker: a part is committed once its marker exists."""
    storage.write_bytes_atomic(fs, storage.join(root, part_name(shard_id)), table_bytes(rows))
    storage.write_bytes_atomic(fs, storage.join(root, marker_name(shard_id)), stats.to_json().encode())


def read_marker(fs, root: str, shard_id: str) -> ShardStats | None:
    path = storage.join(root, marker_name(shard_id))
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return ShardStats.from_json(f.read().decode())


def read_part(fs, root: str, shard_id: str, columns: list[str] | None = None) -> pa.Table:
    with fs.open(storage.join(root, part_name(shard_id)), "rb") as f:
        return pq.read_table(f, columns=columns)


def committed_part_ids(fs, root: str) -> list[str]:
    """Ids of the parts whose commit marker exists (what a decode job reads)."""
    prefix, suffix = "part-", ".stats.json"
    names = [p.rsplit("/", 1)[-1] for p in fs.glob(storage.join(root, COMMITS, prefix + "*" + suffix))]
    return sorted(n[len(prefix): -len(suffix)] for n in names)
