"""An output folder of a job: whose it is, what is committed, and whether a new run may add to it.

The driver of every job opens its output with :class:`JobOutput` before any worker starts:

1. **Ownership.** The folder must be new, empty, or an output of this system (its
   ``_manifest.json`` says so). Anything else is refused with one line naming what is there.
2. **One writer.** The run takes the output's lease (pipelines/lease.py) and keeps it renewed.
3. **Cleanup by proof.** In-progress records of attempts that died are cleaned
   (pipelines/ownership.py); files no record names are listed as *untracked* and never touched.
4. **Resume in O(listings).** The committed units are one listing of ``_commits/``; their stats
   come from ``_index.jsonl.gz`` (written when a run finishes) plus the few markers committed
   since, read in one batch.
5. **Per-part settings.** What must match between runs (model id, codec version, settings that
   change the bytes) is checked per committed unit, never by how the inputs were spelled; a
   difference names the unit, the field and both values. ``--overwrite`` rewrites only the
   differing units of this run's inputs, one logged line each.
"""

from __future__ import annotations

import gzip
import json
import logging
import posixpath
import time

from . import storage
from .archive import COMMITS, Layout, MarkerError, ShardStats
from .lease import DEFAULT_TTL, LEASE, Lease
from .ownership import INPROGRESS, RUN_UNIT, Attempt, check_relative, clean, record_path, unit_of_record

log = logging.getLogger(__name__)

FORMAT = "rdeic-archive-output"
FORMAT_VERSION = 2
MANIFEST = "_manifest.json"
SUMMARY = "_summary.json"
INDEX = "_index.jsonl.gz"
CONTROL_FILES = [MANIFEST, SUMMARY, INDEX]
RESERVED = {MANIFEST, SUMMARY, INDEX, LEASE, COMMITS, INPROGRESS}
RUNS_KEPT = 100  # run records kept in the manifest


class OutputRefused(RuntimeError):
    """This run may not use the output: not ours, another job's, or its bookkeeping is damaged."""


class JobConfigMismatch(OutputRefused):
    """Committed units were written with other settings; adding to them would mix outputs."""


def _few(names: list[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


class JobOutput:
    def __init__(self, fs, root: str, kind: str, settings: dict, layout: Layout, run_id: str,
                 lease_ttl: float = DEFAULT_TTL, products: tuple[str, ...] = ()) -> None:
        """``products``: files the driver writes at the root besides the units' (e.g. an audit's report)."""
        self.fs, self.root, self.kind, self.settings, self.layout = fs, root.rstrip("/"), kind, settings, layout
        self.control_files = CONTROL_FILES + list(products)
        self.reserved = RESERVED | set(products)
        self.run_id = run_id
        self.lease = Lease(fs, self.root, run_id, lease_ttl)
        self.control = Attempt(fs, self.root, RUN_UNIT, run_id)
        self.committed: dict[str, ShardStats] = {}
        self.untracked: list[str] = []
        self.rewritten: list[str] = []
        self.manifest: dict = {}

    def path(self, name: str) -> str:
        return storage.join(self.root, name)

    # ---------------------------------------------------------------- open
    def open(self, break_lease: bool = False) -> dict[str, ShardStats]:
        """Check ownership, take the lease, clean after dead attempts; the committed units' stats."""
        self.manifest = self._read_manifest() or {}
        if not self.manifest:  # never take a lease in, or write into, a folder of someone else's
            entries = storage.list_names(self.fs, self.root)
            if set(entries) - self.reserved:
                names = sorted(n + ("/" if d else "") for n, d in entries.items())
                raise OutputRefused(f"{self.root} is not empty and is not an rdeic-archive output (it holds "
                                    f"{_few(names)}); choose a new or empty folder")
        self.fs.makedirs(self.root, exist_ok=True)
        self.lease.acquire(break_lease)
        self.lease.start_heartbeat()
        try:
            self.manifest = self._read_manifest() or {}  # again, now that no other run writes here
            entries = storage.list_names(self.fs, self.root)
            units = set(self.layout.committed_units(self.fs, self.root)) if COMMITS in entries else set()
            if INPROGRESS in entries and self._clean_records(units):
                entries = storage.list_names(self.fs, self.root)
            self.control.begin_control(self.control_files)
            self.committed = self._load_stats(units)
            self.untracked = self._untracked(entries, units)
            if not self.manifest:
                self._write_manifest()
        except BaseException:
            self.close()
            raise
        if self.untracked:
            log.warning("%s holds %d files this job did not write (left untouched): %s", self.root,
                        len(self.untracked), _few(self.untracked))
        return self.committed

    def _read_manifest(self) -> dict | None:
        data = storage.read_bytes(self.fs, self.path(MANIFEST))
        if data is None:
            return None
        try:
            manifest = json.loads(data)
        except ValueError as exc:
            raise OutputRefused(f"{self.path(MANIFEST)} is not valid JSON ({exc}); move it away or use another output") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            if isinstance(manifest, dict) and "fingerprint" in manifest:
                raise OutputRefused(f"{self.root} was written by rdeic-archive 0.1, whose outputs this version does not "
                                    "extend or resume; write to a new folder (rdeic-job decode still reads 0.1 archives)")
            raise OutputRefused(f"{self.path(MANIFEST)} is not an rdeic-archive manifest; use another output")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise OutputRefused(f"{self.root} has output format version {manifest.get('format_version')}; "
                                f"this version reads {FORMAT_VERSION}")
        if manifest.get("kind") != self.kind:
            raise OutputRefused(f"{self.root} is the output of a {manifest.get('kind')} job, not of {self.kind}; "
                                "use another output")
        return manifest

    def _clean_records(self, committed: set[str]) -> int:
        """Every record here is a dead writer's: we hold the lease, and our own attempts have not started.
        Returns how many there were."""
        names = storage.list_files(self.fs, storage.join(self.root, INPROGRESS))
        records = [n for n in names if unit_of_record(n) is not None]
        for name in records:
            unit = unit_of_record(name)
            clean(self.fs, self.root, name, committed=unit in committed or unit == RUN_UNIT)
        for name in names:
            token = name.rpartition(".tmp-")[2]
            if name.startswith(".") and name.endswith(f"~{token}.json.tmp-{token}"):
                self.fs.rm(record_path(self.root, name))  # a record cut while being written: its own token names it
        return len(records)

    def _load_stats(self, units: set[str]) -> dict[str, ShardStats]:
        stats = {u: s for u, s in self._read_index().items() if u in units}
        missing = sorted(units - set(stats))
        if missing:
            log.info("reading %d commit markers not yet in %s", len(missing), INDEX)
            stats.update(self._read_markers(missing))
            self._write_index(stats)
        for s in stats.values():
            s.skipped = True
        return stats

    def _read_markers(self, units: list[str]) -> dict[str, ShardStats]:
        return read_markers(self.fs, self.root, self.layout, units)

    def _read_index(self) -> dict[str, ShardStats]:
        return read_index(self.fs, self.root)

    def _write_index(self, stats: dict[str, ShardStats]) -> None:
        lines = "".join(json.dumps(stats[u].to_dict(detail=False), sort_keys=True) + "\n" for u in sorted(stats))
        storage.write_bytes_atomic(self.fs, self.path(INDEX), gzip.compress(lines.encode(), mtime=0), token=self.control.token)

    def _untracked(self, entries: dict[str, bool], units: set[str]) -> list[str]:
        ours = self.reserved | {self.layout.data(u) for u in units}
        return sorted(n + ("/" if d else "") for n, d in entries.items() if n not in ours)

    # ------------------------------------------------------------ settings
    def check_settings(self, this_run: set[str], overwrite: bool) -> list[str]:
        """Committed units whose settings differ from this run's: refused, or (overwrite) to rewrite."""
        rewrite, refuse = [], []
        for unit in sorted(self.committed):
            diff = self._diff(self.committed[unit].settings)
            if diff:
                (rewrite if overwrite and unit in this_run else refuse).append((unit, diff))
        if refuse:
            unit, (name, theirs, ours) = refuse[0][0], refuse[0][1][0]
            hint = ("pass --overwrite to rewrite the parts of this run's inputs" if unit in this_run else
                    "it is not among this run's inputs, so even --overwrite would leave it")
            more = f" ({len(refuse) - 1} more units differ)" if len(refuse) > 1 else ""
            raise JobConfigMismatch(f"{self.layout.data(unit)} in {self.root} was written with {name}={theirs}, this run "
                                    f"has {name}={ours}{more}; {hint}, or write to another output")
        for unit, diff in rewrite:
            log.warning("rewriting %s: %s", self.layout.data(unit), "; ".join(f"{n} {a} -> {b}" for n, a, b in diff))
        return [unit for unit, _ in rewrite]

    def _diff(self, theirs: dict) -> list[tuple[str, object, object]]:
        return [(k, theirs.get(k), v) for k, v in sorted(self.settings.items()) if _comparable(k, theirs.get(k)) != _comparable(k, v)]

    def uncommit(self, units: list[str]) -> None:
        """Remove committed units this run will redo: marker first, then their files, by a record."""
        for unit in units:
            self.committed.pop(unit)
            stats = self._read_markers([unit])[unit]  # the index holds no file lists
            attempt = Attempt(self.fs, self.root, unit, self.run_id)
            attempt.record.paths = self._unit_files(unit, stats.files)
            attempt.record.dirs = sorted({posixpath.dirname(f) for f in attempt.record.paths} - {""})
            attempt._save()  # the record proves the files ours while they are removed
            self.fs.rm(self.path(self.layout.marker(unit)))
            clean(self.fs, self.root, attempt.record.name, committed=False)
            self.rewritten.append(unit)

    def _unit_files(self, unit: str, files: list[str]) -> list[str]:
        """The files a marker says its unit wrote, if they are that unit's: its data, or inside its folder."""
        data = self.layout.data(unit)
        for rel in files:
            check_relative(rel)
            if rel != data and not rel.startswith(data + "/"):
                raise OutputRefused(f"{self.path(self.layout.marker(unit))} lists {rel!r}, which is not {unit}'s to delete; "
                                    "move the marker away to redo that unit")
        return files or [data]

    # -------------------------------------------------------------- finish
    def finish(self, run_stats: list[ShardStats], run_summary: dict, totals) -> dict:
        """Index, manifest and summary from one listing of the markers; releases the lease."""
        units = set(self.layout.committed_units(self.fs, self.root))
        stats = {**self.committed, **{s.shard_id: s for s in run_stats if not s.skipped}}
        stats.update(self._read_markers(sorted(units - set(stats))))
        stats = {u: s for u, s in stats.items() if u in units}
        self._write_index(stats)
        summary = {"run": run_summary, "archive": totals(list(stats.values()))}
        runs = self.manifest.get("runs", []) + [{"run_id": self.run_id, **{k: run_summary.get(k) for k in (
            "started_at", "finished_at", "units_done", "units_failed_count", "samples_ok", "samples_error")}}]
        self.manifest.update(runs=runs[-RUNS_KEPT:])
        self._write_manifest(units_committed=len(units))
        storage.write_bytes_atomic(self.fs, self.path(SUMMARY), json.dumps(summary, indent=1).encode(), token=self.control.token)
        self.close()
        return summary

    def _write_manifest(self, **extra) -> None:
        self.manifest.update(format=FORMAT, format_version=FORMAT_VERSION, kind=self.kind, settings=self.settings,
                             index=INDEX, updated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra)
        self.manifest.setdefault("units_committed", 0)
        storage.write_bytes_atomic(self.fs, self.path(MANIFEST), json.dumps(self.manifest, indent=1).encode(),
                                   token=self.control.token)

    def close(self) -> None:
        """Drop the driver's record and release the lease (idempotent)."""
        try:
            if storage.read_bytes(self.fs, record_path(self.root, self.control.record.name)) is not None:
                self.control.finish()
        finally:
            self.lease.release()


def _comparable(name: str, value: object) -> object:
    """A setting as runs must agree on it. The codec version's container part is left out: every decoder
    reads every container version, so an archive's parts may differ in it (the rows record theirs)."""
    if name == "codec_version" and isinstance(value, str):
        return value.split(" bitstream/", 1)[0]
    return value


def read_markers(fs, root: str, layout: Layout, units: list[str], bad: dict[str, str] | None = None) -> dict[str, ShardStats]:
    """Markers read in one batch (concurrent requests on object stores), each checked.

    A marker that vanished or is not one of ours raises OutputRefused, or, given ``bad``, is
    recorded there (unit -> why) for a reader that reports rather than refuses (the audit).
    """
    if not units:
        return {}
    paths = {storage.join(root, layout.marker(u)): u for u in units}
    fs.invalidate_cache(storage.join(root, COMMITS))
    out = {}
    for path, data in fs.cat(list(paths), on_error="return").items():
        path = path.split("://", 1)[-1]
        unit = paths[path]
        try:
            if isinstance(data, FileNotFoundError):
                raise OutputRefused(f"{path} vanished while this run started; is another job writing here without the lease?")
            if isinstance(data, BaseException):
                raise data
            try:
                out[unit] = ShardStats.from_json(data, path)
            except MarkerError as exc:
                raise OutputRefused(f"{exc}; move it away to redo that unit") from None
        except OutputRefused as exc:
            if bad is None:
                raise
            bad[unit] = str(exc)
    return out


def read_index(fs, root: str) -> dict[str, ShardStats]:
    """The stats of the units committed when the output's last run finished (empty if absent or damaged)."""
    data = storage.read_bytes(fs, storage.join(root, INDEX))
    if data is None:
        return {}
    try:
        lines = gzip.decompress(data).decode().splitlines()
        stats = [ShardStats.from_json(line, f"{INDEX} line {n}") for n, line in enumerate(lines, 1)]
        return {s.shard_id: s for s in stats}
    except (OSError, EOFError, UnicodeDecodeError, MarkerError) as exc:
        log.warning("%s is damaged (%s); rebuilding it from the commit markers", storage.join(root, INDEX), exc)
        return {}
