"""Job manifests and resuming: which shards are committed, and whether a rerun may continue.

The commit markers are the truth; the manifest records the job's config (so that a rerun
with another config or model refuses to mix outputs) and, after each run, the committed parts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass

from . import storage
from .archive import COMMITS, ShardStats

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
SUMMARY = "_summary.json"


class JobConfigMismatch(RuntimeError):
    """The output holds a job with another config or model; resuming would mix them."""


@dataclass(frozen=True)
class Layout:
    """Names of one unit's output and marker inside the output root."""

    data_prefix: str  # "part-": every name a job owns starts with it (or with "_")
    data_suffix: str  # ".parquet", ".tar", or "" for a folder per unit

    def __post_init__(self) -> None:
        if not self.data_prefix:
            raise ValueError("a layout needs a prefix, so that a job never touches files it does not own")

    def data(self, unit_id: str) -> str:
        return f"{self.data_prefix}{unit_id}{self.data_suffix}"

    def marker(self, unit_id: str) -> str:
        return f"{COMMITS}/{self.data_prefix}{unit_id}.stats.json"

    def unit_of_marker(self, name: str) -> str | None:
        """The unit id of a file name inside the commits folder, if it is a marker."""
        suffix = ".stats.json"
        if name.startswith(self.data_prefix) and name.endswith(suffix):
            return name[len(self.data_prefix): -len(suffix)]
        return None


def fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


class JobOutput:
    def __init__(self, fs, root: str, kind: str, config: dict, layout: Layout) -> None:
        self.fs, self.root, self.kind, self.config, self.layout = fs, root.rstrip("/"), kind, config, layout
        self.fingerprint = fingerprint({"kind": kind, **config})

    def path(self, name: str) -> str:
        return storage.join(self.root, name)

    def _read_json(self, name: str) -> dict | None:
        path = self.path(name)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as f:
            return json.loads(f.read().decode())

    def _names(self, folder: str = "") -> list[str]:
        path = storage.join(self.root, folder) if folder else self.root
        if not self.fs.exists(path):
            return []
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False)]

    def prepare(self, overwrite: bool) -> dict[str, ShardStats]:
        """Check the manifest, clear leftovers, and return the committed units' stats."""
        self.fs.makedirs(self.root, exist_ok=True)
        existing = self._read_json(MANIFEST)
        if existing is not None and existing.get("fingerprint") != self.fingerprint:
            if not overwrite:
                raise JobConfigMismatch(
                    f"{self.root} holds a {existing.get('kind')} job with another config or model "
                    f"(model {existing.get('config', {}).get('model_id')}); pass --overwrite to replace it, "
                    "or write to another output"
                )
            self._remove_everything()
        elif existing is None and any(self.layout.unit_of_marker(n) for n in self._names(COMMITS)):
            if not overwrite:
                raise JobConfigMismatch(f"{self.root} holds committed outputs but no {MANIFEST}; pass --overwrite to replace them")
            self._remove_everything()
        committed = self._committed()
        self._remove_leftovers(set(committed))
        self._write_manifest(sorted(committed))
        return committed

    def _committed(self) -> dict[str, ShardStats]:
        out = {}
        for name in self._names(COMMITS):
            unit = self.layout.unit_of_marker(name)
            if unit is not None:
                with self.fs.open(self.path(f"{COMMITS}/{name}"), "rb") as f:
                    stats = ShardStats.from_json(f.read().decode())
                stats.skipped = True
                out[unit] = stats
        return out

    def _is_tmp(self, name: str) -> bool:
        return name.startswith(".") and ".tmp-" in name  # storage.open_atomic's names

    def _remove_leftovers(self, committed: set[str]) -> None:
        data = {self.layout.data(u) for u in committed}
        for name in self._names():
            is_unit_data = name.startswith(self.layout.data_prefix) and name not in data and (
                name.endswith(self.layout.data_suffix) if self.layout.data_suffix else self.fs.isdir(self.path(name))
            )
            if is_unit_data or self._is_tmp(name):
                log.info("removing uncommitted leftover %s", name)
                self.fs.rm(self.path(name), recursive=True)
        for name in self._names(COMMITS):
            if self._is_tmp(name):
                self.fs.rm(self.path(f"{COMMITS}/{name}"))

    def _remove_everything(self) -> None:
        for name in self._names():
            if name in (MANIFEST, SUMMARY, COMMITS) or name.startswith(self.layout.data_prefix) or self._is_tmp(name):
                self.fs.rm(self.path(name), recursive=True)

    def _write_manifest(self, committed: list[str], extra: dict | None = None) -> None:
        body = {
            "kind": self.kind,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "committed": [self.layout.data(u) for u in committed],
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if extra:
            body.update(extra)
        storage.write_bytes_atomic(self.fs, self.path(MANIFEST), json.dumps(body, indent=1).encode())

    def finish(self, summary: dict) -> None:
        committed = sorted(self._committed())
        self._write_manifest(committed)
        storage.write_bytes_atomic(self.fs, self.path(SUMMARY), json.dumps(summary, indent=1).encode())
