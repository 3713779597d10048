"""One writer at a time per output: a lease file with an owner and an expiry, safe on object stores.

``_lease.json`` in the output root names the run that may write there. It is taken with a
conditional create (S3 ``If-None-Match: *``; a local folder serialises writers with flock),
renewed by the driver every ``ttl / 4`` seconds with a compare-and-swap (S3 ``If-Match``), and
released by writing ``released: true`` the same way. Workers check it before every commit
(:func:`check_held`), so a run that has lost its lease stops committing.

A lease that is released, or that expired (its run stopped renewing it), is taken over with a
warning naming the old owner; so is one whose run was on this machine and is no longer alive.
A lease in force is watched until it is renewed (its run is alive: LeaseBusy) or lapses. A live
lease is never taken without ``break_lease=True`` (``--break-lease``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from . import storage

log = logging.getLogger(__name__)

LEASE = "_lease.json"
DEFAULT_TTL = 120.0
MAX_WAIT = 300.0  # longest a run waits to see whether a lease's holder is alive


class LeaseBusy(RuntimeError):
    """Another live run holds the output's lease."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over (or cannot be renewed): it must stop writing."""


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class Holder:
    run_id: str
    host: str
    pid: int
    boot_id: str
    command: str
    acquired_at: float
    expires_at: float
    released: bool = False

    @classmethod
    def parse(cls, data: bytes) -> "Holder | None":
        """The holder, or None for a file that is not a well-formed lease (treated as lapsed, never as ours)."""
        try:
            holder = cls(**json.loads(data))
        except (ValueError, TypeError):
            return None
        fields_ok = (all(isinstance(v, str) for v in (holder.run_id, holder.host, holder.boot_id, holder.command))
                     and type(holder.pid) is int and 0 < holder.pid < 2 ** 31 and isinstance(holder.released, bool)
                     and all(isinstance(v, (int, float)) and math.isfinite(v) for v in (holder.acquired_at, holder.expires_at)))
        return holder if fields_ok else None

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.acquired_at))
        return f"run {self.run_id} (host {self.host}, pid {self.pid}, since {since})"

    def dead_here(self) -> bool:
        """The holder ran on this machine (same host and boot) and its process is gone."""
        if self.host != socket.gethostname() or not self.boot_id or self.boot_id != _boot_id():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def _path(fs, root: str) -> str:
    return storage.join(root, LEASE)


def current_holder(fs, root: str) -> Holder | None:
    data = storage.read_bytes(fs, _path(fs, root))
    return Holder.parse(data) if data is not None else None


def check_held(fs, root: str, run_id: str) -> None:
    """Raise LeaseLost unless ``run_id`` holds the output's lease (workers call this before committing)."""
    holder = current_holder(fs, root)
    if holder is None or holder.released or holder.run_id != run_id:
        who = "nobody" if holder is None or holder.released else holder.describe()
        raise LeaseLost(f"run {run_id} no longer holds the lease on {root} (held by {who}); not committing")


class Lease:
    def __init__(self, fs, root: str, run_id: str, ttl: float = DEFAULT_TTL) -> None:
        if ttl <= 0:
            raise ValueError(f"lease ttl must be > 0 seconds, got {ttl}")
        self.fs, self.root, self.run_id, self.ttl = fs, root.rstrip("/"), run_id, ttl
        self.path = _path(fs, root)
        self.lost = threading.Event()
        self._version: str | None = None
        self._acquired_at = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False

    def _body(self, released: bool = False) -> bytes:
        holder = Holder(self.run_id, socket.gethostname(), os.getpid(), _boot_id(), " ".join(sys.argv)[:300],
                        self._acquired_at, time.time() + self.ttl, released)
        return json.dumps(asdict(holder), indent=1).encode()

    def _write(self, version: str | None, released: bool = False) -> None:
        body = self._body(released)
        storage.write_if(self.fs, self.path, body, version)
        current = storage.read_versioned(self.fs, self.path)
        if current is None or Holder.parse(current[0]) != Holder.parse(body):
            raise storage.PreconditionFailed(f"{self.path} changed right after it was written")
        self._version = current[1]

    def acquire(self, break_lease: bool = False, max_wait: float = MAX_WAIT) -> None:
        """Take the lease, or raise LeaseBusy naming the live holder.

        A holder is alive only if it renews: a lease that is neither released nor expired is
        watched until it is renewed (LeaseBusy at once) or expires (taken over), for at most
        ``max_wait`` seconds. So a retried job whose previous driver died elsewhere waits for
        the old lease to lapse instead of failing, and a second run next to a live one is told
        within a renewal interval.
        """
        deadline, seen, races = time.monotonic() + max_wait, None, 0
        while True:
            current = storage.read_versioned(self.fs, self.path)
            holder = Holder.parse(current[0]) if current else None
            reason = "free" if current is None else self._free_reason(holder, break_lease)
            if reason is None:
                renewed = seen is not None and (holder.run_id, holder.expires_at) != (seen.run_id, seen.expires_at)
                if renewed or time.monotonic() > deadline:
                    raise LeaseBusy(f"{self.root} is in use by {holder.describe()}, which keeps renewing its lease; "
                                    "wait for it to finish, or if that run is dead, pass --break-lease")
                if seen is None:
                    log.warning("%s is leased by %s; waiting to see whether it is still alive (lease expires in %.0f s)",
                                self.root, holder.describe(), holder.expires_at - time.time())
                seen = holder
                time.sleep(min(1.0, max(0.05, holder.expires_at - time.time() + 0.05)))
                continue
            try:
                self._write(current[1] if current else None)
            except storage.PreconditionFailed:  # another run got there first: look again
                races += 1
                if races > 5:
                    raise LeaseBusy(f"{self.root}: other runs keep taking the lease; try again") from None
                continue
            if reason not in ("free", "released"):
                log.warning("taking over the lease on %s: %s", self.root, reason)
            self._held = True
            return

    @staticmethod
    def _free_reason(holder: Holder | None, break_lease: bool) -> str | None:
        if holder is None:
            return "the lease file is unreadable"
        if holder.released:
            return "released"
        if holder.expires_at < time.time():
            return f"{holder.describe()} stopped renewing it {time.time() - holder.expires_at:.0f} s ago"
        if holder.dead_here():
            return f"{holder.describe()} is no longer running on this machine"
        if break_lease:
            return f"--break-lease given; {holder.describe()} still held it"
        return None

    def renew(self) -> None:
        try:
            self._write(self._version)
        except storage.PreconditionFailed:
            self.lost.set()
            holder = current_holder(self.fs, self.root)
            raise LeaseLost(f"the lease on {self.root} was taken over by "
                            f"{holder.describe() if holder else 'someone else'}; this run stops") from None

    def release(self) -> None:
        """Mark the lease free for the next run (idempotent)."""
        self.stop_heartbeat()
        if self.lost.is_set() or not self._held:
            return
        self._held = False
        try:
            self._write(self._version, released=True)
        except (storage.PreconditionFailed, OSError) as exc:
            log.warning("could not release the lease on %s (%s); it expires in %.0f s", self.root, exc, self.ttl)

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.renew()
            except LeaseLost as exc:
                log.error("%s", exc)
                return
            except OSError as exc:  # a storage hiccup: the next beat retries well before expiry
                log.warning("could not renew the lease on %s: %s", self.root, exc)
