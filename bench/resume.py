"""Resume cost vs committed units: how long a job takes to open an output that already holds N units.

For N in 10², 10³, 10⁴ (``--counts``), on a local folder and on a local S3 server (moto), with N
commit markers and N small part files in place, it measures in one run:

* ``open, index``: ``JobOutput.open`` as a re-run sees it after a finished run: one listing of
  ``_commits/``, one listing of the root, and ``_index.jsonl.gz``;
* ``open, no index``: the same after a run that died before writing its index: every marker is
  read, in one batch of concurrent requests;
* ``baseline``: what the driver did before the index (and what it did twice per run): open and
  parse every marker, one after the other.

Requests: ``open, index`` makes a fixed number (two listings of 1000 names per page, one GET of the
index, the lease and record writes); the other two make one GET per marker. The S3 server is moto
in its own process on 127.0.0.1: per-request latency is far below a real object store's, so the
ratios understate what the index saves there.

Run: ``python bench/resume.py [--counts 100 1000 10000] [--repeat 3]``; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"moto server did not start on port {port}")


def populate(fs, root: str, n: int) -> None:
    """An output of ours (its manifest written by a first, empty run) with n committed units."""
    from pipelines import storage
    from pipelines.archive import ARCHIVE, ShardStats

    first = job_output(fs, root, -1)
    first.open()
    first.close()

    settings = {"model_id": "bench@0000000000000000", "codec_version": "bench", "max_pixels": 1}
    files = {}
    for i in range(n):
        unit = f"shard-{i:06d}"
        stats = ShardStats(unit, f"s3://bucket/in/{unit}.tar", ARCHIVE.data(unit), ok=100, bytes_in=10 ** 6, bytes_out=10 ** 4,
                           bitstream_bytes=10 ** 4, pixels=2 ** 24, settings=settings, files=[ARCHIVE.data(unit)],
                           error_reasons={"corrupt_image": 1}, error_examples={"corrupt_image": "x: broken"})
        files[storage.join(root, ARCHIVE.marker(unit))] = stats.to_json().encode()
        files[storage.join(root, ARCHIVE.data(unit))] = b"PAR1"
    if storage.is_local(fs):
        for path, data in files.items():
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Path(path).write_bytes(data)
    else:
        fs.pipe(files)


def job_output(fs, root: str, run: int):
    from pipelines.archive import ARCHIVE
    from pipelines.manifest import JobOutput

    settings = {"model_id": "bench@0000000000000000", "codec_version": "bench", "max_pixels": 1}
    return JobOutput(fs, root, "compress", settings, ARCHIVE, f"bench-run-{run}")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(fs, root: str, n: int, repeat: int) -> dict:
    from pipelines import storage
    from pipelines.manifest import INDEX
    from pipelines.report import summarize, totals

    def open_close(run: int, finish: bool = False) -> int:
        out = job_output(fs, root, run)
        units = len(out.open())
        if finish:  # writes the index
            out.finish([], summarize("compress", out.run_id, "", 0, [], [], 0, 0, []), totals)
        out.close()
        assert units == n, units
        return units

    def baseline() -> None:  # the pre-index driver: every marker, one GET each
        fs.invalidate_cache()
        for path in fs.ls(storage.join(root, "_commits"), detail=False):
            with fs.open(path, "rb") as f:
                json.loads(f.read())

    open_close(0, finish=True)
    with_index = [timed(lambda: open_close(1)) for _ in range(repeat)]
    no_index = []
    for _ in range(repeat):
        fs.rm(storage.join(root, INDEX))
        no_index.append(timed(lambda: open_close(2)))
        open_close(3, finish=True)
    base = [timed(baseline) for _ in range(repeat)]
    return {"index": with_index, "no_index": no_index, "baseline": base}


def fmt(values: list[float]) -> str:
    return f"{min(values):.2f}–{max(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--stores", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    import boto3

    from pipelines import storage

    port = free_port()
    # its own process, so that the server does not share this process's GIL with the client
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    wait_for_port(port)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
    opts = storage.StorageOptions.from_env(endpoint_url=endpoint)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for store in args.stores:
                for n in args.counts:
                    url = f"{tmp}/out-{n}" if store == "local" else f"s3://bench/out-{n}"
                    fs, root = storage.filesystem(url, opts)
                    populate(fs, root, n)
                    r = measure(fs, root, n, args.repeat)
                    ratio = statistics.median(r["baseline"]) / statistics.median(r["index"])
                    rows.append((store, n, fmt(r["index"]), fmt(r["no_index"]), fmt(r["baseline"]), f"{ratio:.1f}×"))
                    print(f"done: {store} {n}", file=sys.stderr)
    finally:
        server.terminate()
    print(f"\nResume cost, seconds (min–max of {args.repeat}); {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}; S3 = moto (own process) on 127.0.0.1\n")
    print("| store | committed units | open, index | open, no index (one batch read) | baseline: read every marker | baseline / index |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


if __name__ == "__main__":
    main()
