"""Arguments and plumbing shared by the job entry points."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys

from dataclasses import replace

from pipelines import storage
from pipelines.compress import CrashSpec, ShardTask
from pipelines.manifest import JobOutput
from pipelines.report import summarize, table


def add_storage_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("storage (S3-compatible stores; credentials from the standard AWS environment)")
    g.add_argument("--endpoint-url", help="S3 endpoint, e.g. http://minio:9000 (default: $AWS_ENDPOINT_URL)")
    g.add_argument("--region", help="S3 region (default: $AWS_REGION)")
    g.add_argument("--anon", action="store_true", help="anonymous S3 access")


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory, local or object-store URL (default: $RDEIC_MODEL or the bundled demo model)")
    p.add_argument("--actors", type=int, help="number of workers (default: one per GPU, or 1 without GPUs)")
    p.add_argument("--batch-size", type=int, default=8, help="images per model call (default 8)")
    p.add_argument("--max-retries", type=int, default=3, help="retries of a shard whose worker died or failed (default 3)")
    p.add_argument("--overwrite", action="store_true", help="replace an output written with another config or model")
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the summary")


def storage_from(args: argparse.Namespace) -> storage.StorageOptions:
    return storage.StorageOptions.from_env(endpoint_url=args.endpoint_url, region=args.region, anon=args.anon)


def resolve_model(value: str | None) -> str:
    from rdeic.cli import default_model

    model = value or default_model()
    if not model:
        raise SystemExit("rdeic-job: error: no model given: pass --model DIR or set $RDEIC_MODEL")
    return model


def model_id(model: str, opts: storage.StorageOptions) -> str:
    from rdeic.modeldir import model_id_of

    return str(model_id_of(storage.localize_model(model, opts)))


def file_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def crash_spec(value: str | None) -> CrashSpec | None:
    """``UNIT:N[:stall]`` of the hidden ``--inject-crash`` option: after N samples of UNIT the worker
    exits (tests of a dying worker) or hangs (tests that kill the driver mid-unit)."""
    if not value:
        return None
    unit, _, rest = value.partition(":")
    n, _, mode = rest.partition(":")
    if mode not in ("", "stall"):
        raise ValueError(f"--inject-crash: unknown mode {mode!r}")
    return CrashSpec(unit, int(n or 1), stall=mode == "stall")


def run_units(kind: str, spec, units: list[ShardTask], committed: dict, args: argparse.Namespace) -> dict:
    """Run the uncommitted units on Ray actors; the summary of this run over all units."""
    from pipelines.distributor import init_ray, run_tasks

    todo = [u for u in units if u.shard_id not in committed]
    init_ray(args.ray_address)
    result = run_tasks(kind, spec, todo, args.actors, args.max_retries, skipped=len(units) - len(todo), desc=kind)
    stats = result.stats + [replace(s, skipped=True) for s in committed.values()]
    return summarize(kind, stats, result.failed, result.seconds, result.actors, len(units), result.startup_seconds)


def finish(summary: dict, job_output: JobOutput) -> int:
    job_output.finish(summary)
    print(table(summary))
    failed = summary["shards_failed"]
    if failed:
        print(f"rdeic-job: {len(failed)} shard(s) failed; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True)
