"""What a job may delete: only what an in-progress record, written *before* the data, says it wrote.

Every writer of an output (one attempt of one unit, or a job driver writing its control files)
first writes ``_inprogress/<unit>~<token>.json`` naming the files it is about to create: final
paths (the unit's data) and temporary paths (hidden names carrying the writer's token). Then
it writes the data; a unit then writes its commit marker and removes its record.

A record left behind is the proof needed to clean up after a writer that died: its temporary
files are removed, and its final files too unless the unit was committed (then they are the
committed data). Nothing else is ever deleted, whatever its name.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass, field

from . import storage
from .lease import check_held

log = logging.getLogger(__name__)

INPROGRESS = "_inprogress"
RUN_UNIT = "_run"  # the unit name of a driver's own record (its control files)


class ForeignFileError(RuntimeError):
    """A file the job would write already exists and no record proves the job wrote it."""


@dataclass
class Record:
    unit: str
    run_id: str
    attempt: int
    token: str
    paths: list[str] = field(default_factory=list)  # final files, relative to the output root
    temps: list[str] = field(default_factory=list)  # temporary files, relative to the output root
    dirs: list[str] = field(default_factory=list)  # folders this writer created, relative

    @property
    def name(self) -> str:
        return f"{self.unit}~{self.token}.json"

    @classmethod
    def parse(cls, data: bytes) -> "Record":
        record = cls(**json.loads(data))
        for rel in record.paths + record.temps + record.dirs:
            check_relative(rel)  # a record is read back from storage: it names nothing outside the output
        return record


def check_relative(rel: object) -> str:
    """``rel`` as a path inside the output: relative, no empty, ``.`` or ``..`` part; else ValueError."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or any(p in ("", ".", "..") for p in rel.split("/")):
        raise ValueError(f"{rel!r} is not a path inside the output")
    return rel


def record_path(root: str, name: str) -> str:
    return storage.join(root, INPROGRESS, name)


def unit_of_record(name: str) -> str | None:
    unit, sep, rest = name.rpartition("~")
    return unit if sep and rest.endswith(".json") else None


def list_records(fs, root: str, unit: str | None = None) -> list[str]:
    names = storage.list_files(fs, storage.join(root, INPROGRESS))
    return [n for n in names if unit_of_record(n) is not None and (unit is None or unit_of_record(n) == unit)]


def read_record(fs, root: str, name: str) -> Record | None:
    data = storage.read_bytes(fs, record_path(root, name))
    if data is None:
        return None
    try:
        return Record.parse(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{record_path(root, name)} is not an in-progress record ({exc}); move it away") from None


def clean(fs, root: str, name: str, committed: bool) -> Record | None:
    """Remove what the record's writer left: temporaries always, final files unless committed."""
    record = read_record(fs, root, name)
    if record is None:
        return None
    doomed = record.temps + ([] if committed else record.paths)
    for rel in doomed:
        path = storage.join(root, rel)
        if fs.exists(path):
            log.info("removing %s, left by %s attempt %d of run %s", rel, record.unit, record.attempt, record.run_id)
            _remove(fs, path)
    if not committed and storage.is_local(fs):
        for rel in sorted(record.dirs, key=len, reverse=True):
            path = storage.join(root, rel)
            if os.path.isdir(path) and not os.listdir(path):
                try:
                    os.rmdir(path)
                except FileNotFoundError:
                    pass
    _remove(fs, record_path(root, name))
    return record


def _remove(fs, path: str) -> None:
    """Delete a file this record proves ours; gone already is fine: a worker of a dead run, stopped
    late, may be cleaning by the same record as the run that took over."""
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass


class Attempt:
    """One writer's record: ``begin`` before writing, ``finish`` after the commit (or ``abort``)."""

    def __init__(self, fs, root: str, unit: str, run_id: str, attempt: int = 0, marker: str | None = None) -> None:
        self.fs, self.root, self.marker = fs, root.rstrip("/"), marker
        self.record = Record(unit, run_id, attempt, uuid.uuid4().hex[:12])

    @property
    def token(self) -> str:
        return self.record.token

    def begin(self, paths: list[str], dirs: list[str] = ()) -> None:
        """Clean this (uncommitted) unit's earlier records, refuse foreign files, then write our record."""
        owned = set()
        for name in list_records(self.fs, self.root, self.record.unit):
            earlier = clean(self.fs, self.root, name, committed=False)
            owned.update(earlier.paths + earlier.dirs if earlier else ())
        inside = tuple(d.rstrip("/") + "/" for d in dirs)
        for rel in list(dirs) + [p for p in paths if not p.startswith(inside)]:  # a new folder's files are new
            if rel not in owned and self.fs.exists(storage.join(self.root, rel)):
                raise ForeignFileError(
                    f"{storage.join(self.root, rel)} exists but no record shows this job wrote it; "
                    "move it away (the job never overwrites files it did not write)")
        self.record.paths = list(paths)
        self.record.dirs = list(dirs)
        self._set_temps(list(paths) + ([self.marker] if self.marker else []))
        self._save()

    def _set_temps(self, rels: list[str]) -> None:
        self.record.temps = [self._rel_temp(p) for p in rels] if storage.is_local(self.fs) else []

    def begin_control(self, names: list[str]) -> None:
        """A driver's record: only the temporary names of the control files it rewrites in place."""
        self._set_temps(names)
        self._save()

    def commit(self, body: bytes) -> None:
        """Write the unit's commit marker if this run still holds the lease, then drop the record.

        A writer without a run id (a worker used on its own, outside a job) has no lease to check.
        """
        if self.record.run_id:
            check_held(self.fs, self.root, self.record.run_id)
        storage.write_bytes_atomic(self.fs, storage.join(self.root, self.marker), body, token=self.token)
        try:
            self.finish()
        except OSError as exc:  # committed all the same; the next run removes the record (and keeps the data)
            log.warning("could not remove the in-progress record of %s: %s", self.record.unit, exc)

    def _rel_temp(self, rel: str) -> str:
        return storage.temp_name(rel, self.token)

    def _save(self) -> None:
        storage.write_bytes_atomic(self.fs, record_path(self.root, self.record.name),
                                   json.dumps(asdict(self.record)).encode(), token=self.token)

    def finish(self) -> None:
        """The unit is committed (or the driver's writes are done): the record is no longer needed."""
        self.fs.rm(record_path(self.root, self.record.name))

    def abort(self) -> None:
        """Best effort after a failure; whatever is left, the next attempt or run cleans by the record."""
        try:
            clean(self.fs, self.root, self.record.name, committed=False)
        except OSError as exc:
            log.warning("could not clean up after %s: %s", self.record.unit, exc)
