"""Entropy coding in coder processes beside the model: the same bytes, and a pool that never leaks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from rdeic.codec import Codec
from rdeic.coders import CoderError, CoderPool, InlineCoder, run_lockstep, run_pipelined
from tests.helpers import random_image

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "bitstream_v1"


@pytest.fixture(scope="module")
def pooled(tiny_model_dir):
    with Codec.load(tiny_model_dir, max_batch=4, coder_processes=2) as codec:
        yield codec


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, just not reaped
        return f.read().split(")")[-1].split()[0] != "Z"


def _wait_gone(pids, seconds: float = 10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.05)
    return left


def test_pooled_coding_writes_the_same_bytes_and_pixels(tiny_codec, pooled, rng):
    images = [random_image(rng, 64, 64) for _ in range(5)] + [random_image(rng, 70, 100), random_image(rng, 128, 64)]
    streams = tiny_codec.compress(images)
    assert pooled.compress(images) == streams
    assert len(set(pooled.coder().pids())) == 2
    inline = tiny_codec.decompress(streams, steps=2)
    for a, b in zip(pooled.decompress(streams, steps=2), inline):
        assert np.array_equal(a, b)
    assert pooled.verify(streams) == [None] * len(streams)


def test_a_version_1_fixture_decodes_bit_exactly_through_the_pool():
    """Today's fixture stream (written before the pool) decodes to its recorded pixels through coder processes."""
    from PIL import Image

    from rdeic.cli import default_model

    data = (FIXTURES / "demo-100x70.rdeic").read_bytes()
    expected = np.asarray(Image.open(FIXTURES / "demo-100x70.steps2.png").convert("RGB"))
    with Codec.load(default_model(), coder_processes=2) as codec:
        assert np.array_equal(codec.decompress([data], steps=2)[0], expected)


@pytest.mark.parametrize("case", ["photo", "every_row"])
def test_the_coder_writes_and_reads_the_bytes_the_coder_of_before_wrote(case):
    """tests/fixtures/coder: symbols and the bytes written for them before the coder changed (see its README)."""
    from rdeic.cli import default_model
    from rdeic.coders import encode_one

    fixture = np.load(Path(__file__).resolve().parent.parent / "fixtures" / "coder" / "demo-tables.npz")
    sym, idx, y = fixture[f"{case}_symbols"], fixture[f"{case}_indexes"], fixture[f"{case}_y"].tobytes()
    tables = Codec.load(default_model()).model.compression.cdf_tables()
    assert encode_one(sym, idx, tables) == y
    for coder in (InlineCoder(tables), CoderPool(tables, 1)):
        try:
            session = coder.open([y])
            got = [session.decode([chunk]).result()[0] for chunk in np.array_split(idx, 20)]
        finally:
            coder.close()
        assert np.array_equal(np.concatenate(got), sym)


def test_a_damaged_stream_is_reported_through_the_pool_as_inline(tiny_codec, pooled, rng):
    from rdeic import bitstream as bs

    good = tiny_codec.compress([random_image(rng, 64, 64)])[0]
    stream = bs.read(good)
    y = bytearray(stream.y)
    y[len(y) // 2] ^= 0x55
    bad = bs.write(stream.header, stream.hyper, bytes(y))
    inline = tiny_codec.decompress_results([bad, good], steps=1)
    pooled_results = pooled.decompress_results([bad, good], steps=1)
    assert type(pooled_results[0]) is type(inline[0])
    assert np.array_equal(pooled_results[1], inline[1])


def test_a_coder_process_that_dies_is_an_error_naming_it_and_the_pool_restarts(tiny_model_dir, rng):
    images = [random_image(rng, 64, 64) for _ in range(4)]
    with Codec.load(tiny_model_dir, max_batch=2, coder_processes=2) as codec:
        expected = codec.compress(images)
        first = codec.coder().pids()
        os.kill(first[0], signal.SIGKILL)
        with pytest.raises(CoderError, match=rf"coder process rdeic-coder-0 \(pid {first[0]}\) was killed by signal 9"):
            codec.compress(images)
        assert _wait_gone(first) == []  # the survivor was stopped too, and both reaped
        assert codec.compress(images) == expected  # fresh processes
        second = codec.coder().pids()
        assert not set(second) & set(first)
    assert _wait_gone(second) == []


def test_an_error_on_the_model_side_with_requests_outstanding_closes_the_pool(tiny_model_dir, rng):
    images = [random_image(rng, 64, 64) for _ in range(6)]
    with Codec.load(tiny_model_dir, max_batch=2, coder_processes=2) as codec:
        expected = codec.compress(images)
        pids = codec.coder().pids()
        real, calls = codec.model.compression.analyse, []

        def failing(feat):
            calls.append(1)
            if len(calls) == 2:  # the first batch is with the coders now
                raise RuntimeError("device fell over")
            return real(feat)

        codec.model.compression.analyse = failing
        try:
            with pytest.raises(RuntimeError, match="device fell over"):
                codec.compress(images)
        finally:
            del codec.model.compression.analyse
        assert _wait_gone(pids) == []
        assert codec.compress(images) == expected


def test_an_error_inside_a_decode_loop_closes_the_pool_and_the_next_decode_works(tiny_model_dir, rng):
    with Codec.load(tiny_model_dir, max_batch=2, coder_processes=2) as codec:
        streams = codec.compress([random_image(rng, 64, 64) for _ in range(4)])
        expected = codec.decompress(streams, steps=1)
        pids = codec.coder().pids()
        model = codec.model.compression
        real = type(model).decode_steps

        def failing(self, codes):
            steps = real(self, codes)
            yield next(steps)
            raise RuntimeError("device fell over mid-loop")

        type(model).decode_steps = failing
        try:
            with pytest.raises(RuntimeError, match="mid-loop"):
                codec.decompress(streams, steps=1)
        finally:
            type(model).decode_steps = real
        assert _wait_gone(pids) == []
        for a, b in zip(codec.decompress(streams, steps=1), expected):
            assert np.array_equal(a, b)


def test_a_diffusion_error_on_the_finishing_thread_reaches_the_caller_and_the_next_decode_works(tiny_model_dir, rng):
    with Codec.load(tiny_model_dir, max_batch=2, coder_processes=2) as codec:
        streams = codec.compress([random_image(rng, 64, 64) for _ in range(6)])
        expected = codec.decompress(streams, steps=1)
        calls = []
        real = codec._diffuse

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise MemoryError("device out of memory")
            return real(*args, **kwargs)

        codec._diffuse = failing
        try:
            with pytest.raises(MemoryError, match="out of memory"):
                codec.decompress(streams, steps=1)
        finally:
            del codec._diffuse
        assert all(np.array_equal(a, b) for a, b in zip(codec.decompress(streams, steps=1), expected))


def test_finishing_on_a_thread_keeps_the_order_and_reports_the_first_error():
    """The accelerator path: each job's rest of the work (``done``) on a thread of its own, in order,
    while the coders decode the next jobs; an error there reaches the caller, and the pool stays usable."""
    import threading

    rng = np.random.default_rng(1)
    tables = _toy_tables()
    jobs = [[_toy_job(rng, 200) for _ in range(2)] for _ in range(6)]
    streams = [InlineCoder(tables).encode(batch).result() for batch in jobs]
    with CoderPool(tables, 2) as pool:
        finished, threads = [], set()

        def done_for(k):
            def done(result):
                threads.add(threading.current_thread().name)
                finished.append((k, result))
            return done

        run_lockstep(((s, _toy_decode_steps([j[1] for j in batch]), done_for(k))
                      for k, (batch, s) in enumerate(zip(jobs, streams))), pool, finish_in_thread=True)
        assert [k for k, _ in finished] == list(range(6))
        assert all(np.array_equal(r, s) for (k, got), batch in zip(finished, jobs) for r, (s, _) in zip(got, batch))
        assert threads and all(name.startswith("rdeic-finish") for name in threads)

        def failing(result):
            raise MemoryError("device out of memory")

        with pytest.raises(MemoryError):
            run_lockstep(((s, _toy_decode_steps([j[1] for j in batch]), failing if k == 2 else done_for(k))
                          for k, (batch, s) in enumerate(zip(jobs, streams))), pool, finish_in_thread=True)
        finished.clear()
        run_lockstep(((s, _toy_decode_steps([j[1] for j in batch]), done_for(k))
                      for k, (batch, s) in enumerate(zip(jobs, streams))), pool, finish_in_thread=True)
        assert [k for k, _ in finished] == list(range(6))


def test_one_intra_op_thread_while_any_thread_decodes_and_the_setting_restored_after(tiny_model_dir, rng):
    import torch

    before = torch.get_num_threads()
    seen = []
    with Codec.load(tiny_model_dir, max_batch=1, coder_processes=1) as codec:
        real = codec._diffuse
        codec._diffuse = lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k)
        codec.decompress(codec.compress([random_image(rng, 64, 64) for _ in range(4)]), steps=1)
    assert seen == [1, 1, 1, 1] and torch.get_num_threads() == before


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_process_or_descriptor_leaks_after_100_batches():
    """100 encode and 100 lock-step decode batches through one pool: the same two processes throughout,
    no descriptors left behind, and none alive after close."""
    rng = np.random.default_rng(0)
    tables = _toy_tables()
    pool = CoderPool(tables, 2)
    inline = InlineCoder(tables)
    fds = _fd_count()
    jobs = [[_toy_job(rng, 300) for _ in range(3)] for _ in range(100)]
    results = []
    run_pipelined(jobs, lambda batch: (batch, None), pool, lambda batch, _, streams: results.append(streams))
    pids = pool.pids()
    assert results == [inline.encode(batch).result() for batch in jobs]
    decoded = []
    run_lockstep(((streams, _toy_decode_steps([j[1] for j in batch]), decoded.append)
                  for batch, streams in zip(jobs, results)), pool)
    for batch, got in zip(jobs, decoded):
        assert all(np.array_equal(s, g) for (s, _), g in zip(batch, got))
    assert pool.pids() == pids and len(pids) == 2
    pool.close()
    assert _wait_gone(pids) == []
    assert _fd_count() <= fds


def test_ctrl_c_stops_the_coder_processes(tiny_model_dir, tmp_path):
    """SIGINT to the process group, as a terminal sends it: the codec's process ends with KeyboardInterrupt
    and its coder processes go with it, without tracebacks of their own."""
    script = tmp_path / "busy.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        import numpy as np
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from rdeic.codec import Codec
        codec = Codec.load({str(tiny_model_dir)!r}, max_batch=2, coder_processes=2)
        images = [np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)] * 4
        codec.compress(images)
        print(*codec.coder().pids(), flush=True)
        while True:
            codec.decompress(codec.compress(images), steps=1)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2, proc.stderr.read()
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err
    assert err.count("Traceback") == 1, err  # the codec's own, none from a coder process
    assert "_serve" not in err and "BrokenPipeError" not in err, err
    assert _wait_gone(pids) == []


def test_pool_arguments_are_checked(tiny_model_dir):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="coder processes"):
            CoderPool(_toy_tables(), bad)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="coder_processes"):
            Codec.load(tiny_model_dir, coder_processes=bad)


# ---------------------------------------------------------------------------------- toy coding
def _toy_tables():
    """Three CDF rows of compressai's layout (16-bit precision), one per width."""
    rows, lengths, offsets = [], [], []
    for width in (3, 5, 9):
        freqs = np.full(width, (1 << 16) // width)
        freqs[0] += (1 << 16) - freqs.sum()
        cdf = [0] + np.cumsum(freqs).tolist()
        rows.append(cdf + [0] * (11 - len(cdf)))
        lengths.append(len(cdf))
        offsets.append(-(width // 2))
    return rows, lengths, offsets


def _toy_job(rng, n: int):
    idx = rng.integers(0, 3, n).astype(np.int32)
    half = np.array([1, 2, 4], np.int32)[idx]
    return rng.integers(-half, half + 1).astype(np.int32), idx


def _toy_decode_steps(indexes: list[np.ndarray]):
    """A model side that asks for each image's symbols in 3 chunks, as the checkerboard loop does."""
    got = [[] for _ in indexes]
    for part in range(3):
        values = yield [np.array_split(idx, 3)[part] for idx in indexes]
        for n, v in enumerate(values):
            got[n].append(v)
    return [np.concatenate(g) for g in got]
