"""``rdeic-job decode``: Parquet archive → PNG images (WebDataset shards or folders), exactly once.

One output unit per committed archive part. A re-run decodes what is not yet committed (new
archive parts included); steps, λs, format, key list, pixel limit and model must match per unit.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys

from pipelines import storage
from pipelines.archive import ARCHIVE, committed_part_ids, part_name
from pipelines.compress import ShardTask
from pipelines.decode import FORMATS, DecodeSpec, layout_for
from pipelines.manifest import MANIFEST, OutputRefused
from rdeic.config import ModelConfig
from rdeic.bitstream import DEFAULT_MAX_PIXELS
from rdeic.modeldir import CONFIG_FILE

from . import common

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--archive", required=True, metavar="URL", help="archive folder written by rdeic-job compress")
    p.add_argument("--output", required=True, metavar="URL", help="output folder, local or s3://")
    p.add_argument("--format", choices=FORMATS, default="webdataset",
                   help="webdataset: one tar per archive part (PNG + original sidecars); folder: one folder per part")
    p.add_argument("--steps", type=int, help="denoising steps L (default: the model's)")
    p.add_argument("--detail", type=float, default=1.0, help="λs, the smoothness/sharpness knob (default 1)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="refuse (as that row's error) bitstreams of images over this many padded pixels; default 4096²")
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


def check_archive_model(fs, root: str, model_id: str) -> None:
    """Refuse at once when the archive's manifest names another model (older archives: workers check)."""
    data = storage.read_bytes(fs, storage.join(root, MANIFEST))
    try:
        recorded = json.loads(data)["settings"]["model_id"] if data else None
    except (ValueError, KeyError, TypeError):
        recorded = None
    if recorded and recorded != model_id:
        raise OutputRefused(f"the archive was written with model {recorded}; --model has {model_id}: decode it with that model")


def _warn_uncommitted(fs, root: str, parts: list[str]) -> None:
    names = storage.list_names(fs, root)
    stray = sorted(n for n in names if n.startswith(ARCHIVE.data_prefix) and n.endswith(ARCHIVE.data_suffix)
                   and n not in {part_name(p) for p in parts})
    if stray:
        log.warning("%d part file(s) in the archive have no commit marker and are not decoded: %s", len(stray),
                    ", ".join(stray[:5]))


def check(args: argparse.Namespace) -> None:
    common.check_run_args(args)
    common.at_least(args, "steps", 1)
    common.at_least(args, "detail", 0, " (λs: 0 is the plain UNet, 1 the model as trained)")
    if not math.isfinite(args.detail):
        raise ValueError(f"--detail must be a finite number, got {args.detail}")
    common.at_least(args, "max-pixels", 64 * 64, " (one padded 64x64 block)")


def check_steps(model: str, opts, steps: int | None) -> None:
    """--steps against the model's schedule, from its config.json alone."""
    if steps is None:
        return
    fs, path = storage.filesystem(model, opts)
    data = storage.read_bytes(fs, storage.join(path, CONFIG_FILE))
    used = ModelConfig.from_json(data.decode()).diffusion.used_timesteps if data else None
    if used is not None and steps > used:
        raise ValueError(f"--steps must be at most {used} for this model (its relay schedule's length), got {steps}")


def run(args: argparse.Namespace) -> int:
    opts = common.storage_from(args)
    model = common.resolve_model(args.model)
    check_steps(model, opts, args.steps)
    args.archive, args.output = storage.canonical_url(args.archive), storage.canonical_url(args.output)  # workers run elsewhere
    archive_fs, archive_root = storage.filesystem(args.archive, opts)
    parts = committed_part_ids(archive_fs, archive_root)
    if not parts:
        print(f"rdeic-job: error: no committed parts in {args.archive}", file=sys.stderr)
        return 2
    _warn_uncommitted(archive_fs, archive_root, parts)
    keys, keys_hash = _read_keys(args.keys, opts) if args.keys else (None, None)
    settings = {"archive": args.archive, "model_id": common.model_id(model, opts),
                "steps": args.steps, "detail": args.detail, "format": args.format, "keys_sha256": keys_hash,
                "max_pixels": args.max_pixels}
    check_archive_model(archive_fs, archive_root, settings["model_id"])
    output = common.open_output(args.output, "decode", settings, layout_for(args.format), args)
    try:
        units = [ShardTask(storage.join(args.archive, part_name(p)), p) for p in parts]
        common.prepare_units(output, units, args)
        spec = DecodeSpec(archive=args.archive, output=args.output, model=model, storage=opts, format=args.format,
                          steps=args.steps, detail=args.detail, batch_size=args.batch_size, max_pixels=args.max_pixels,
                          keys=keys, crash=common.crash_spec(args.inject_crash), run_id=output.run_id,
                          settings=settings, device=args.device)
        return common.run_units("decode", output, spec, units, args)
    finally:
        output.close()
