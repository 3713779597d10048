"""The Parquet archive: one part per input shard, then its commit marker.

::

    archive/
      _manifest.json                        what this output is (format, kind, settings) and its runs
      _summary.json                         the last run and the whole archive, in numbers
      _index.jsonl.gz                       every committed unit's stats, one JSON line each
      _lease.json                           which run may write here (pipelines/lease.py)
      _commits/part-<shard-id>.stats.json   commit marker: the shard's stats, written after the part
      _inprogress/<unit>~<token>.json       what a running attempt is writing (pipelines/ownership.py)
      part-<shard-id>.parquet               one row per input sample (ok or error)

Readers need only pyarrow (or pandas, DuckDB, Ray Data); the folder reads as one dataset,
since dataset readers skip names starting with "_" or ".".
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field, fields

import pyarrow as pa
import pyarrow.parquet as pq

from . import reasons, storage

SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source_shard", pa.string(), nullable=False),
        pa.field("source_index", pa.int64(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("mode", pa.string()),
        pa.field("frames", pa.int32()),  # frames in the original (animations, multi-page files): the first is archived
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
        pa.field("error_code", pa.string()),  # a code of pipelines/reasons.py
        pa.field("encode_ms", pa.float64()),
        pa.field("encoded_at", pa.timestamp("us", tz="UTC")),
    ]
)


COMMITS = "_commits"


@dataclass(frozen=True)
class Layout:
    """Names of one unit's output and marker inside an output root."""

    data_prefix: str  # "part-"
    data_suffix: str  # ".parquet", ".tar", or "" for a folder per unit

    def __post_init__(self) -> None:
        if not self.data_prefix:
            raise ValueError("a layout needs a prefix")

    def data(self, unit_id: str) -> str:
        return f"{self.data_prefix}{unit_id}{self.data_suffix}"

    def marker(self, unit_id: str) -> str:
        return f"{COMMITS}/{self.data_prefix}{unit_id}.stats.json"

    def unit_of_marker(self, name: str) -> str | None:
        """The unit id of a file name inside the commits folder, if it is a marker."""
        suffix = ".stats.json"
        if name.startswith(self.data_prefix) and name.endswith(suffix) and not name.startswith("."):
            return name[len(self.data_prefix): -len(suffix)]
        return None

    def committed_units(self, fs, root: str) -> list[str]:
        """Units whose marker exists: one listing of the commits folder."""
        names = storage.list_files(fs, storage.join(root, COMMITS))
        return sorted(u for n in names if (u := self.unit_of_marker(n)) is not None)


ARCHIVE = Layout("part-", ".parquet")


def part_name(shard_id: str) -> str:
    return ARCHIVE.data(shard_id)


class MarkerError(ValueError):
    """A commit marker that is not valid JSON or not a marker of ours."""


@dataclass
class ShardStats:
    """Per-unit outcome; its JSON is the commit marker."""

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
    warning: str | None = None  # e.g. a valid shard without samples
    error_reasons: dict[str, int] = field(default_factory=dict)  # reason code -> count
    error_examples: dict[str, str] = field(default_factory=dict)  # reason code -> its first message
    failed_keys: list[dict] = field(default_factory=list)  # decode: every key that failed: key, code, reason
    skipped_members: list[dict] = field(default_factory=list)  # tar members that are no sample (directories)
    skipped_count: int = 0
    renamed_keys: dict[str, str] = field(default_factory=dict)  # decode: file stem -> key, where they differ
    files: list[str] = field(default_factory=list)  # what the unit wrote, relative to the output root
    settings: dict = field(default_factory=dict)  # what must match for a later run to add to the output
    run_id: str = ""
    worker: dict = field(default_factory=dict)
    attempt: int = 0
    skipped: bool = False  # already committed by an earlier run (not stored)

    # the index keeps the numbers, not the per-key lists (those stay in the markers)
    DETAIL = ("failed_keys", "skipped_members", "renamed_keys", "files", "worker", "error_examples")

    @property
    def mean_bpp(self) -> float | None:
        return self.bitstream_bytes * 8 / self.pixels if self.pixels else None

    def to_dict(self, detail: bool = True) -> dict:
        data = asdict(self)
        data.pop("skipped")
        if not detail:
            for name in self.DETAIL:
                data.pop(name)
        return data

    def to_json(self) -> str:
        data = self.to_dict()
        data["mean_bpp"] = self.mean_bpp
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: object, where: str) -> "ShardStats":
        if not isinstance(data, dict):
            raise MarkerError(f"{where}: not a commit marker (a JSON object is expected)")
        data = {k: v for k, v in data.items() if k != "mean_bpp"}
        unknown = sorted(set(data) - _MARKER_FIELDS)
        if unknown:
            raise MarkerError(f"{where}: not a commit marker of this version (unknown fields {unknown[:5]})")
        try:
            return cls(**data)
        except TypeError as exc:  # a required field is missing
            raise MarkerError(f"{where}: not a commit marker ({exc})") from None

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "commit marker") -> "ShardStats":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise MarkerError(f"{where}: not valid JSON ({exc})") from None
        return cls.from_dict(data, where)

    def count_error(self, code: str, message: str) -> None:
        reasons.check(code)
        self.errors += 1
        self.error_reasons[code] = self.error_reasons.get(code, 0) + 1
        self.error_examples.setdefault(code, message[:300])


_MARKER_FIELDS = {f.name for f in fields(ShardStats)} - {"skipped"}


def table_bytes(rows: list[dict]) -> bytes:
    """A Parquet file of the archive schema; bitstreams are already entropy coded, so not compressed."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    buf = io.BytesIO()
    compression = {name: "zstd" for name in SCHEMA.names}
    compression["bitstream"] = "none"
    pq.write_table(table, buf, compression=compression, row_group_size=1024)
    return buf.getvalue()


def read_marker(fs, root: str, layout: Layout, unit_id: str) -> ShardStats | None:
    path = storage.join(root, layout.marker(unit_id))
    data = storage.read_bytes(fs, path)
    return None if data is None else ShardStats.from_json(data, path)


class PartError(ValueError):
    """A file named like an archive part that is not one (another schema)."""


def read_part(fs, root: str, shard_id: str, columns: list[str] | None = None) -> pa.Table:
    path = storage.join(root, part_name(shard_id))
    with fs.open(path, "rb") as f:
        part = pq.ParquetFile(f)
        missing = [c for c in columns or [] if c not in part.schema_arrow.names]
        if missing:
            raise PartError(f"{path} is not an archive part: it lacks the columns {missing[:6]} "
                            f"(it has {part.schema_arrow.names[:6]})")
        return part.read(columns=columns)


def committed_part_ids(fs, root: str) -> list[str]:
    """Ids of the parts whose commit marker exists (what a decode job reads)."""
    return ARCHIVE.committed_units(fs, root)
