"""``rdeic-job decode``: Parquet archive → PNG images (WebDataset shards or folders), exactly once."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from pipelines import storage
from pipelines.archive import ShardStats, committed_part_ids, part_name
from pipelines.compress import CrashSpec, ShardTask
from pipelines.decode import FORMATS, DecodeSpec, layout_for
from pipelines.manifest import JobConfigMismatch, JobOutput
from pipelines.report import summarize

from . import common


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--archive", required=True, metavar="URL", help="archive folder written by rdeic-job compress")
    p.add_argument("--output", required=True, metavar="URL", help="output folder, local or s3://")
    p.add_argument("--format", choices=FORMATS, default="webdataset",
                   help="webdataset: one tar per archive part (PNG + original sidecars); folder: one folder per part")
    p.add_argument("--steps", type=int, help="denoising steps L (default: the model's)")
    p.add_argument("--detail", type=float, default=1.0, help="λs, the smoothness/sharpness knob (default 1)")
    p.add_argument("--keys", metavar="FILE", help="decode only the keys listed in FILE (one per line)")
    p.add_argument("--inject-crash", metavar="PART:N", help=argparse.SUPPRESS)
    common.add_run_args(p)
    common.add_storage_args(p)


def _read_keys(path: str, opts) -> tuple[frozenset[str], str]:
    fs, p = storage.filesystem(path, opts)
    with fs.open(p, "rb") as f:
        text = f.read().decode()
    keys = frozenset(line.strip() for line in text.splitlines() if line.strip())
    return keys, common.file_sha256("\n".join(sorted(keys)))


def run(args: argparse.Namespace) -> int:
    from pipelines.distributor import WorkerStartError, init_ray, run_tasks

    opts = common.storage_from(args)
    model = common.resolve_model(args.model)
    archive_fs, archive_root = storage.filesystem(args.archive, opts)
    parts = committed_part_ids(archive_fs, archive_root)
    if not parts:
        print(f"rdeic-job: error: no committed parts in {args.archive}", file=sys.stderr)
        return 2
    keys, keys_hash = _read_keys(args.keys, opts) if args.keys else (None, None)
    config = {
        "archive": args.archive,
        "model_id": common.model_id(model, opts),
        "steps": args.steps,
        "detail": args.detail,
        "format": args.format,
        "keys_sha256": keys_hash,
    }
    fs, root = storage.filesystem(args.output, opts)
    output = JobOutput(fs, root, "decode", config, layout_for(args.format))
    try:
        committed = output.prepare(args.overwrite)
    except JobConfigMismatch as exc:
        print(f"rdeic-job: error: {exc}", file=sys.stderr)
        return 2
    crash = None
    if args.inject_crash:
        part, _, n = args.inject_crash.partition(":")
        crash = CrashSpec(part, int(n or 1))
    spec = DecodeSpec(archive=args.archive, output=args.output, model=model, storage=opts, format=args.format,
                      steps=args.steps, detail=args.detail, batch_size=args.batch_size, keys=keys, crash=crash)
    tasks = [ShardTask(storage.join(args.archive, part_name(p)), p) for p in parts if p not in committed]
    init_ray(args.ray_address)
    try:
        result = run_tasks("decode", spec, tasks, args.actors, args.max_retries, skipped=len(parts) - len(tasks),
                           desc="decode")
    except WorkerStartError as exc:
        print(f"rdeic-job: error: {exc}", file=sys.stderr)
        return 1
    stats: list[ShardStats] = result.stats + [replace(s, skipped=True) for s in committed.values()]
    summary = summarize("decode", stats, result.failed, result.seconds, result.actors, len(parts), result.startup_seconds)
    summary["failed_keys"] = [k for s in stats for k in s.failed_keys][:1000]
    return common.finish(summary, output)
