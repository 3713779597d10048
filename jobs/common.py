"""Arguments and plumbing shared by the job entry points."""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time

from pipelines import storage
from pipelines.compress import DEVICES, CrashSpec, ShardTask
from pipelines.lease import DEFAULT_TTL, LeaseLost, new_run_id
from pipelines.manifest import JobOutput
from pipelines.report import summarize, table, totals


def add_storage_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("storage (S3-compatible stores; credentials from the standard AWS environment)")
    g.add_argument("--endpoint-url", help="S3 endpoint, e.g. http://minio:9000 (default: $AWS_ENDPOINT_URL)")
    g.add_argument("--region", help="S3 region (default: $AWS_REGION)")
    g.add_argument("--anon", action="store_true", help="anonymous S3 access")


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory, local or object-store URL (default: $RDEIC_MODEL or the bundled demo model)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto: a GPU per worker if the cluster has GPUs now, else CPU workers; cuda: always ask for a GPU "
                        "per worker (autoscaling clusters start GPU nodes for it); cpu: CPU workers")
    p.add_argument("--actors", type=int, help="number of workers (default: one per GPU, or 1 without GPUs)")
    p.add_argument("--start-timeout", type=float, default=600.0, metavar="S",
                   help="give up if no worker has started after S seconds (default 600); work starts with the first")
    p.add_argument("--batch-size", type=int, default=8, help="images per model call (default 8)")
    p.add_argument("--coder-processes", type=int, metavar="N",
                   help="entropy-coding processes beside each worker's model, one more CPU each (default: on GPU workers "
                        "the cluster's CPUs per GPU less one, at most 8; on CPU workers 0, coding in the model's thread)")
    p.add_argument("--max-retries", type=int, default=3, help="retries of a unit whose worker died or failed (default 3)")
    p.add_argument("--overwrite", action="store_true",
                   help="rewrite the committed units of this run's inputs that were written with other settings (each is logged)")
    p.add_argument("--break-lease", action="store_true",
                   help="take the output's lease even if another run holds it (only when that run is known to be dead)")
    p.add_argument("--lease-ttl", type=float, default=DEFAULT_TTL, metavar="S",
                   help=f"the output lease lapses S seconds after its run stops renewing it (default {DEFAULT_TTL:.0f})")
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the summary")


def at_least(args: argparse.Namespace, name: str, low: float, what: str = "") -> None:
    """Refuse ``--name`` below ``low`` (None means the default and passes), in one line."""
    value = getattr(args, name.replace("-", "_"))
    if value is not None and not value >= low:  # "not >=" also refuses NaN
        raise ValueError(f"--{name} must be at least {low:g}{what}, got {value}")


def check_run_args(args: argparse.Namespace) -> None:
    """The options every job shares, checked before Ray starts or a model loads."""
    for name, low in (("batch-size", 1), ("max-retries", 0), ("actors", 1), ("coder-processes", 0)):
        at_least(args, name, low)
    for name in ("start-timeout", "lease-ttl"):
        at_least(args, name, 1, " second")


def storage_from(args: argparse.Namespace) -> storage.StorageOptions:
    return storage.StorageOptions.from_env(endpoint_url=args.endpoint_url, region=args.region, anon=args.anon)


def resolve_model(value: str | None) -> str:
    from rdeic.cli import default_model

    model = value or default_model()
    if not model:
        raise SystemExit("rdeic-job: error: no model given: pass --model DIR or set $RDEIC_MODEL")
    return storage.canonical_url(model)  # workers run in another folder


def model_id(model: str, opts: storage.StorageOptions) -> str:
    from pipelines.modelcache import remote_model_id

    return remote_model_id(model, opts)  # model_id.json + config.json: the driver downloads no weights


def file_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def crash_spec(value: str | None) -> CrashSpec | None:
    """``UNIT:N[:MODE[:ATTEMPTS]]`` of the hidden ``--inject-crash`` option (tests): after N samples of UNIT
    (N = 0: after its data, before its commit marker) the worker exits (MODE ``exit``, the default),
    hangs (``stall``: tests that kill the driver or start a second job mid-unit) or raises an
    infrastructure error (``fail``: a sick device), on the first ATTEMPTS attempts (default 1)."""
    if not value:
        return None
    unit, _, rest = value.partition(":")
    n, _, rest = rest.partition(":")
    mode, _, attempts = rest.partition(":")
    if mode not in ("", "exit", "stall", "fail"):
        raise ValueError(f"--inject-crash: unknown mode {mode!r}")
    return CrashSpec(unit, int(n or 1), attempts=int(attempts or 1), stall=mode == "stall", fail=mode == "fail")


def open_output(url: str, kind: str, settings: dict, layout, args: argparse.Namespace) -> JobOutput:
    """The job's output, owned and leased by this run (refused with one line otherwise)."""
    fs, root = storage.filesystem(url, storage_from(args))
    output = JobOutput(fs, root, kind, settings, layout, new_run_id(), lease_ttl=args.lease_ttl)
    output.open(break_lease=args.break_lease)
    return output


def prepare_units(output: JobOutput, units: list[ShardTask], args: argparse.Namespace) -> None:
    """Per-unit settings check; with --overwrite, uncommit the differing units of this run."""
    output.uncommit(output.check_settings({u.shard_id for u in units}, args.overwrite))


def run_units(kind: str, output: JobOutput, spec, units: list[ShardTask], args: argparse.Namespace) -> int:
    """Run the uncommitted units on Ray actors, then index, manifest and summary; the exit status."""
    from pipelines.distributor import init_ray, run_tasks

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    todo = [u for u in units if u.shard_id not in output.committed]
    init_ray(args.ray_address)
    result = run_tasks(kind, spec, todo, args.actors, args.max_retries, skipped=len(units) - len(todo), desc=kind,
                       start_timeout=args.start_timeout, check=lambda: _check_lease(output), progress=not args.quiet,
                       coder_processes=args.coder_processes)
    done = [s for s in result.stats if not s.skipped]
    run = summarize(kind, output.run_id, started, len(units), done, result.failed, result.seconds,
                    result.startup_seconds, result.actors, skipped=len(units) - len(done) - len(result.failed),
                    untracked=output.untracked, rewritten=output.rewritten)
    summary = output.finish(result.stats, run, totals)
    print(table(summary))
    if result.failed:
        print(f"rdeic-job: {len(result.failed)} unit(s) failed; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


def _check_lease(output: JobOutput) -> None:
    if output.lease.lost.is_set():
        raise LeaseLost(f"this run lost the lease on {output.root}; stopping (what it committed stays committed)")


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
