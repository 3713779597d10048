"""Whole-job throughput vs the codec alone, on this machine.

Builds WebDataset shards of 256×256 PNG photos-like images on a local S3 server (moto),
then measures in one run:

* the codec alone: ``Codec.compress`` on the already decoded images, same preset and batch;
* ``rdeic-job compress`` S3 → Parquet on S3 with 1 and with 2 actors (local Ray, CPU).

The job's rate is given end to end and after worker start-up (model loading), and as a
ratio to the codec alone. Run: ``python bench/pipeline.py [--shards 4 --per-shard 24]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=6)
    p.add_argument("--per-shard", type=int, default=32)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--model", help="model directory (default: a random tiny model)")
    args = p.parse_args()

    import boto3
    import numpy as np
    import ray
    from moto.server import ThreadedMotoServer

    from jobs.cli import main as job
    from rdeic.codec import Codec
    from rdeic.weights import init_model, save_model
    from tests.helpers import encode, random_image, write_shard

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="bench")

    tmp = Path(tempfile.mkdtemp())
    model = args.model or str(tmp / "tiny")
    if not args.model:
        save_model(init_model("tiny"), model)
    rng = np.random.default_rng(0)
    images = []
    for s in range(args.shards):
        samples = []
        for i in range(args.per_shard):
            img = random_image(rng, args.size, args.size)
            images.append(img)
            samples.append({"__key__": f"{s:03d}_{i:04d}", "png": encode(img), "json": b"{}"})
        write_shard(tmp / f"shard-{s:06d}.tar", samples)
        s3.upload_file(str(tmp / f"shard-{s:06d}.tar"), "bench", f"in/shard-{s:06d}.tar")
    n = len(images)

    codec = Codec.load(model, max_batch=args.batch_size)
    codec.compress(images[: args.batch_size])  # warm-up
    runs = []

    def codec_alone() -> None:
        t0 = time.perf_counter()
        for start in range(0, n, args.batch_size):
            codec.compress(images[start:start + args.batch_size])
        runs.append(time.perf_counter() - t0)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    for actors in (1, 2):
        codec_alone()  # interleaved with the job runs: this machine's speed drifts
        out = f"s3://bench/archive-{actors}"
        rc = job(["compress", "--input", "s3://bench/in/*.tar", "--output", out, "--model", model,
                  "--actors", str(actors), "--batch-size", str(args.batch_size), "-q"])
        assert rc == 0
        summary = json.loads(s3.get_object(Bucket="bench", Key=f"archive-{actors}/_summary.json")["Body"].read())["run"]
        assert summary["samples_ok"] == n
        markers = [json.loads(s3.get_object(Bucket="bench", Key=o["Key"])["Body"].read())
                   for o in s3.list_objects_v2(Bucket="bench", Prefix=f"archive-{actors}/")["Contents"] if o["Key"].endswith(".stats.json")]
        busy = sum(m["model_seconds"] for m in markers) / sum(m["seconds"] for m in markers)
        rows.append((actors, summary["images_per_second"], summary["images_per_second_after_startup"], summary["startup_seconds"], busy))
    codec_alone()
    codec_rate = n / statistics.median(runs)
    ray.shutdown()
    server.stop()

    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, CPU only; {n} images of {args.size}², "
          f"{args.shards} shards, batch {args.batch_size}; model {codec.model_id}; local S3 (moto) and local Ray; "
          "each actor and the codec-alone run use 1 torch thread")
    print(f"codec alone (Codec.compress, decoded images in memory): {codec_rate:.2f} images/s "
          f"(median of {len(runs)} runs interleaved with the jobs: {', '.join(f'{n / r:.2f}' for r in runs)})")
    head = (f"{'actors':>6} {'job img/s':>10} {'after start-up':>15} {'start-up s':>11} {'ratio':>7} "
            f"{'ratio after start-up':>21} {'model busy':>11}")
    print(head)
    print("-" * len(head))
    for actors, rate, steady, startup, busy in rows:
        print(f"{actors:>6} {rate:>10.2f} {steady:>15.2f} {startup:>11.1f} {rate / codec_rate:>7.2f} "
              f"{steady / codec_rate:>21.2f} {busy:>10.0%}")
    print("model busy: share of the shards' wall time spent inside Codec.compress, from the commit markers")


if __name__ == "__main__":
    main()
