"""``rdeic-job decode``: Parquet archive → PNG images (WebDataset shards or folders), exactly once."""

from __future__ import annotations

import argparse
import sys

from pipelines import storage
from pipelines.archive import committed_part_ids, part_name
from pipelines.compress import ShardTask
from pipelines.decode import FORMATS, DecodeSpec, layout_for
from pipelines.manifest import JobOutput

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
    committed = output.prepare(args.overwrite)
    spec = DecodeSpec(archive=args.archive, output=args.output, model=model, storage=opts, format=args.format,
                      steps=args.steps, detail=args.detail, batch_size=args.batch_size, keys=keys,
                      crash=common.crash_spec(args.inject_crash))
    units = [ShardTask(storage.join(args.archive, part_name(p)), p) for p in parts]
    summary = common.run_units("decode", spec, units, committed, args)
    return common.finish(summary, output)
