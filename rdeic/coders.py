"""Entropy coding beside the model: inline, or in a pool of coder processes.

The model side produces, per image, the y symbols and their CDF row indexes (int32 arrays); a
coder turns them into the image's rANS stream. Decoding cannot be split that way: the
checkerboard × slice loop asks the coder for each chunk of symbols before it can compute the
next chunk's distributions (2 × slices round trips per image), so each image's decoder lives in
one coder for the whole loop, and the model side is written as a generator that yields the
indexes of its next chunk and receives the chunk's symbols (:func:`run_lockstep` drives it).

compressai's coder holds the GIL for its whole call, so threads cannot overlap it with the
model's work; processes can. :class:`CoderPool` runs ``processes`` of them and keeps each
image's decoder in one of them; :class:`InlineCoder` codes in the calling thread. Both run the
same compressai calls on the same arrays, so the bytes and symbols are the same.

This module imports neither torch nor compressai's Python package, so a coder process starts in
a fraction of a second.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable, Generator, Iterable, Sequence

import numpy as np

# (cdf rows, lengths, offsets) as compressai's coder takes them: Python lists
Tables = tuple[list, list, list]
# One image's symbols (int32) and their CDF rows (uint8 or int32), in coding order
EncodeJob = tuple[np.ndarray, np.ndarray]
# A decoding model-side generator: yields each image's CDF rows of its next chunk, receives the
# chunk's symbols, returns its result
DecodeSteps = Generator[list[np.ndarray], list[np.ndarray], object]


@dataclass(frozen=True)
class YStream:
    """A y section and the zeros to append before decoding it (the codec's safety margin for damaged
    streams): the zeros are made where the decoder runs, not sent to it."""

    data: bytes
    margin: int = 0


def _open_decoder(decoder_class, stream: "bytes | YStream"):
    decoder = decoder_class()
    decoder.set_stream(stream if isinstance(stream, bytes) else stream.data + bytes(stream.margin))
    return decoder


class CoderError(RuntimeError):
    """A coder process failed or died; the pool is closed and the next call starts a new one."""


def _ans():
    from . import entropy  # registers compressai without running its package __init__

    return entropy.BufferedRansEncoder, entropy.RansDecoder


def _used_rows(indexes: np.ndarray, tables: Tables) -> tuple[list, Tables]:
    """The indexes renumbered over only the rows they use, and those rows.

    compressai converts every row it is given on every call, and the wide rows (large scales) are
    the rarely used ones: a chunk of symbols typically needs a third of the rows and a tenth of the
    numbers. A symbol is coded with its own row alone, so the bytes are the same.
    """
    used = np.flatnonzero(np.bincount(indexes, minlength=len(tables[1])))
    if len(used) == len(tables[1]):
        return indexes.tolist(), tables
    renumber = np.zeros(len(tables[1]), dtype=np.int32)
    renumber[used] = np.arange(len(used), dtype=np.int32)
    rows = used.tolist()
    return renumber[indexes].tolist(), tuple([column[r] for r in rows] for column in tables)  # type: ignore[return-value]


def encode_one(symbols: np.ndarray, indexes: np.ndarray, tables: Tables) -> bytes:
    encoder_class, _ = _ans()
    encoder = encoder_class()
    rows, used = _used_rows(indexes, tables)
    encoder.encode_with_indexes(symbols.tolist(), rows, *used)
    return encoder.flush()


def _decode_chunk(decoder, indexes: np.ndarray, tables: Tables) -> np.ndarray:
    rows, used = _used_rows(indexes, tables)
    return np.asarray(decoder.decode_stream(rows, *used), dtype=np.int32)


class _Done:
    def __init__(self, value) -> None:
        self.value = value

    def result(self):
        return self.value


class InlineCoder:
    """Codes in the calling thread, at once."""

    processes = 0

    def __init__(self, tables: Tables) -> None:
        self.tables = tables

    def encode(self, jobs: Sequence[EncodeJob]) -> _Done:
        return _Done([encode_one(s, i, self.tables) for s, i in jobs])

    def open(self, streams: Sequence[bytes | YStream]) -> "_InlineSession":
        return _InlineSession(streams, self.tables)

    def abandon(self) -> None:
        pass

    def close(self) -> None:
        pass


class _InlineSession:
    def __init__(self, streams: Sequence[bytes | YStream], tables: Tables) -> None:
        _, decoder_class = _ans()
        self.tables = tables
        self.decoders = [_open_decoder(decoder_class, s) for s in streams]

    def decode(self, indexes: Sequence[np.ndarray]) -> _Done:
        return _Done([_decode_chunk(d, idx, self.tables) for d, idx in zip(self.decoders, indexes)])

    def close(self) -> None:
        self.decoders = []


# ------------------------------------------------------------------------------ the process pool
def _serve(conn) -> None:
    """A coder process: answer requests until told to stop or the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes the pool
    _, decoder_class = _ans()
    decoders: dict[int, object] = {}
    tables: Tables = ([], [], [])
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        kind, rid, payload = message
        try:
            if kind == "tables":
                tables = payload
                continue
            if kind == "open":  # no reply: errors surface with the session's first decode
                for sid, stream in payload:
                    decoders[sid] = _open_decoder(decoder_class, stream)
                continue
            if kind == "close":
                for sid in payload:
                    decoders.pop(sid, None)
                continue
            if kind == "encode":
                reply = [encode_one(s, i, tables) for s, i in payload]
            elif kind == "decode":
                reply = [_decode_chunk(decoders[sid], idx, tables) for sid, idx in payload]
            else:
                raise ValueError(f"unknown request {kind!r}")
            answer = ("ok", rid, reply)
        except Exception as exc:  # reported to the parent, which closes the pool
            answer = ("error", rid, f"{type(exc).__name__}: {exc}")
        try:
            conn.send(answer)
        except OSError:  # the parent has gone or closed the pool: nobody wants the answer
            return


class _Worker:
    """One coder process: ``python -m rdeic.coders FD``, talking over a socket pair.

    Not multiprocessing's spawn, which re-runs the parent's main script in the child: a script
    without an ``if __name__ == "__main__"`` guard would start its whole job again in every coder.
    """

    def __init__(self, tables: Tables, number: int) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)  # this rdeic, wherever it was imported from
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        # Every call makes and frees lists of a few MB; glibc's defaults hand such blocks back to the
        # kernel each time and fault them in again: a fresh coder process coded 40% slower than the
        # model's process, whose allocator earlier large blocks had tuned (bench/throughput.py).
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 << 20))
        env.setdefault("MALLOC_TRIM_THRESHOLD_", str(256 << 20))
        try:
            self.process = subprocess.Popen([sys.executable, "-m", "rdeic.coders", str(theirs.fileno())],
                                            pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self.name = f"rdeic-coder-{number}"
        self.conn = Connection(ours.detach())
        self.replies: dict[int, tuple[str, object]] = {}
        # Replies are read as they arrive, on a thread of their own: with the caller only reading when it
        # wants a result, a large request and a large reply could each wait for the other's buffer to drain.
        self._arrived = threading.Condition()
        self._lost: BaseException | None = None
        self._reader = threading.Thread(target=self._read, name=f"{self.name}-replies", daemon=True)
        self._reader.start()
        self.send(("tables", -1, tables))

    def _read(self) -> None:
        try:
            while True:
                status, got, payload = self.conn.recv()
                with self._arrived:
                    self.replies[got] = (status, payload)
                    self._arrived.notify_all()
        except (EOFError, OSError) as exc:
            with self._arrived:
                self._lost = exc
                self._arrived.notify_all()

    def send(self, message) -> None:
        try:
            self.conn.send(message)
        except (OSError, ValueError) as exc:
            raise CoderError(self._gone(exc)) from None

    def reply(self, rid: int):
        with self._arrived:
            while rid not in self.replies and self._lost is None:
                self._arrived.wait()
            found = self.replies.pop(rid, None)
        if found is None:
            raise CoderError(self._gone(self._lost))
        status, payload = found
        if status != "ok":
            raise CoderError(f"coder process {self.name} (pid {self.process.pid}) failed: {payload}")
        return payload

    def _gone(self, exc: BaseException) -> str:
        try:
            code = self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            code = None
        how = "is still running" if code is None else (f"was killed by signal {-code}" if code < 0 else f"exited with status {code}")
        return f"coder process {self.name} (pid {self.process.pid}) {how}: {type(exc).__name__}"

    def stop(self, wait: float) -> None:
        if self.process.poll() is None:
            try:
                self.conn.send(None)
            except (OSError, ValueError):
                pass
        for stop in (None, self.process.terminate, self.process.kill):
            if stop is not None:
                stop()
            try:
                self.process.wait(timeout=wait if stop is None else 5.0)
                break
            except subprocess.TimeoutExpired:
                continue
        self.process.wait()
        self._reader.join(timeout=5.0)  # the process's end of the socket is closed: the reader sees EOF
        self.conn.close()


def _stop_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.stop(wait=2.0)
    workers.clear()


class CoderPool:
    """``processes`` coder processes (fresh interpreters: safe beside CUDA and threads), started on first use.

    Requests go out at once and their replies are collected when asked for, so the model works on
    the next batch while the processes code this one. Images are spread over the processes, and a
    decoding image stays with its process. Anything going wrong while requests are outstanding
    (an error, a dead process, Ctrl-C) closes the pool, since its pipes may then hold stale
    replies; the next call starts fresh processes.
    """

    def __init__(self, tables: Tables, processes: int) -> None:
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError(f"coder processes must be a positive integer, got {processes!r}")
        self.tables = tables
        self.processes = processes
        self._workers: list[_Worker] = []
        self._ids = itertools.count()
        self._next = 0  # round-robin start, so small batches spread too
        self._outstanding = 0
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)

    # -- lifetime
    def _started(self) -> list[_Worker]:
        if not self._workers:
            try:
                for n in range(self.processes):
                    self._workers.append(_Worker(self.tables, n))
            except BaseException:
                _stop_all(self._workers)
                raise
        return self._workers

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def close(self) -> None:
        """Stop the processes (they finish the request in hand); safe to call twice."""
        _stop_all(self._workers)
        self._outstanding = 0

    def abandon(self) -> None:
        """Called when a caller gives up with requests outstanding: their replies would be stale."""
        if self._outstanding:
            self.close()

    def __enter__(self) -> "CoderPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests
    def _spread(self, count: int) -> list[_Worker]:
        workers = self._started()
        first, self._next = self._next, (self._next + count) % len(workers)
        return [workers[(first + k) % len(workers)] for k in range(count)]

    def _send(self, owners: list[_Worker], kind: str, rid: int, items: Sequence) -> None:
        groups: dict[_Worker, list] = {}
        for worker, item in zip(owners, items):
            groups.setdefault(worker, []).append(item)
        try:
            for worker, payload in groups.items():
                worker.send((kind, rid, payload))
        except BaseException:
            self.close()
            raise

    def _ask(self, owners: list[_Worker], kind: str, items: Sequence) -> "_Pending | _Done":
        if not items:
            return _Done([])
        rid = next(self._ids)
        self._send(owners, kind, rid, items)
        self._outstanding += 1
        return _Pending(self, rid, owners)

    def encode(self, jobs: Sequence[EncodeJob]) -> "_Pending | _Done":
        return self._ask(self._spread(len(jobs)), "encode", jobs)

    def open(self, streams: Sequence[bytes | YStream]) -> "_PoolSession":
        owners = self._spread(len(streams))
        sids = [next(self._ids) for _ in streams]
        self._send(owners, "open", -1, list(zip(sids, streams)))
        return _PoolSession(self, owners, sids)


class _Pending:
    """The replies to one request, put back into the order of its images."""

    def __init__(self, pool: CoderPool, rid: int, owners: list[_Worker]) -> None:
        self.pool, self.rid, self.owners = pool, rid, owners
        self.value: list | None = None

    def result(self) -> list:
        if self.value is None:
            try:
                replies = {w: iter(w.reply(self.rid)) for w in dict.fromkeys(self.owners)}
            except BaseException:
                self.pool.close()
                raise
            self.pool._outstanding -= 1
            self.value = [next(replies[w]) for w in self.owners]
        return self.value


class _PoolSession:
    def __init__(self, pool: CoderPool, owners: list[_Worker], sids: list[int]) -> None:
        self.pool, self.owners, self.sids = pool, owners, sids

    def decode(self, indexes: Sequence[np.ndarray]) -> "_Pending | _Done":
        if len(indexes) != len(self.sids):
            raise ValueError(f"{len(indexes)} index arrays for a session of {len(self.sids)} images")
        return self.pool._ask(self.owners, "decode", list(zip(self.sids, indexes)))

    def close(self) -> None:
        if self.pool._workers and self.owners[:1] and self.owners[0] in self.pool._workers:
            self.pool._send(self.owners, "close", -1, self.sids)


def make_coder(tables: Tables, processes: int) -> InlineCoder | CoderPool:
    return CoderPool(tables, processes) if processes else InlineCoder(tables)


# ------------------------------------------------------------------------------- scheduling
def run_pipelined(batches: Iterable, analyse: Callable, coder, finish: Callable, in_flight: int = 2) -> None:
    """Encode: ``analyse(batch)`` (the model side) gives ``(jobs, context)``; the coder codes the jobs
    while the model analyses the next batches; ``finish(batch, context, streams)`` as each completes,
    in order, with at most ``in_flight`` batches waiting on the coder."""
    waiting: deque = deque()
    try:
        for batch in batches:
            jobs, context = analyse(batch)
            waiting.append((batch, context, coder.encode(jobs)))
            while len(waiting) > in_flight:
                batch, context, pending = waiting.popleft()
                finish(batch, context, pending.result())
        while waiting:
            batch, context, pending = waiting.popleft()
            finish(batch, context, pending.result())
    except BaseException:
        coder.abandon()
        raise


def run_lockstep(jobs: Iterable[tuple[Sequence[bytes | YStream], DecodeSteps, Callable]], coder, in_flight: int = 2,
                 finish_in_thread: bool = False) -> None:
    """Decode: each job is ``(streams, steps, done)``: the images' y streams, the model-side generator
    (see ``DecodeSteps``) and ``done(result)``, called when the generator returns (the rest of the
    device work). Up to ``in_flight`` jobs advance in turn, so the model computes one job's next
    chunk while the coder decodes another's.

    ``finish_in_thread`` (with coder processes): ``done`` runs on a thread of its own, one job at a
    time and in order, since a job's diffusion takes as long as many chunks of coding and, run here,
    would leave the coders without requests meanwhile (a fifth of their time in
    bench/throughput.py --simulate). ``done`` must then set up its own per-thread state (grad mode).
    """
    queue = iter(jobs)
    active: deque = deque()
    finishing: deque[Future] = deque()
    finisher = ThreadPoolExecutor(1, thread_name_prefix="rdeic-finish") if finish_in_thread and coder.processes else None

    def finish(done: Callable, value) -> None:
        if finisher is None:
            done(value)
            return
        finishing.append(finisher.submit(done, value))
        while len(finishing) > 1:  # one running, one waiting: memory stays bounded
            finishing.popleft().result()

    def begin() -> None:
        for streams, steps, done in queue:
            session = coder.open(streams)
            finished, value = _advance(steps, None)
            if not finished:
                active.append((session, steps, done, session.decode(value)))
                return
            session.close()
            finish(done, value)

    try:
        for _ in range(in_flight):
            begin()
        while active:
            session, steps, done, pending = active.popleft()
            finished, value = _advance(steps, pending.result())
            if not finished:
                active.append((session, steps, done, session.decode(value)))
                continue
            session.close()
            begin()  # the next job's first request goes out before this one's diffusion
            finish(done, value)
        while finishing:
            finishing.popleft().result()
    except BaseException:
        for _, steps, _, _ in active:
            steps.close()
        coder.abandon()  # closes the pool if requests are out; otherwise it stays usable ...
        for session, _, _, _ in active:
            with suppress(Exception):  # ... and its decoders of these jobs go
                session.close()
        raise
    finally:
        if finisher is not None:
            finisher.shutdown(wait=True, cancel_futures=True)


def _advance(steps: DecodeSteps, values) -> tuple[bool, object]:
    """(False, the next request) or (True, the generator's result); the result is handled outside the
    ``except``, so that an error there does not come chained to a StopIteration."""
    try:
        return False, steps.send(values)
    except StopIteration as stop:
        return True, stop.value

if __name__ == "__main__":  # a coder process of CoderPool
    _serve(Connection(int(sys.argv[1])))
