"""``rdeic-job compress``: WebDataset shards → Parquet archive of RDEIC bitstreams, exactly once.

Re-running with more shards adds them to the archive (committed shards are skipped); what must
match between runs is checked per part: the model id, the codec version and the size limits.
"""

from __future__ import annotations

import argparse
import hashlib
import sys

from pipelines import storage
from pipelines.archive import ARCHIVE, ShardStats
from pipelines.compress import CODEC_VERSION, CompressSpec, ShardTask
from rdeic.bitstream import DEFAULT_MAX_PIXELS
from rdeic.shards import MAX_MEMBER_BYTES, MAX_SIDECAR_BYTES, expand

from . import common


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="URL",
                   help="tar shards: brace patterns (shard-{000000..000099}.tar) or globs, local or s3://")
    p.add_argument("--output", required=True, metavar="URL", help="archive folder, local or s3://")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="refuse images over this many pixels once padded to multiples of 64, as the codec computes "
                        "them (decompression bombs, 16000000x1 strips), each as its sample's error row; default: what "
                        f"the tiled codec fits in each worker's device memory, at most {DEFAULT_MAX_PIXELS} (8192²)")
    p.add_argument("--max-member-bytes", type=int, default=MAX_MEMBER_BYTES, metavar="N",
                   help="refuse a tar member over N bytes, from its header before reading it (default 256 MiB)")
    p.add_argument("--max-sidecar-bytes", type=int, default=MAX_SIDECAR_BYTES, metavar="N",
                   help="refuse a sample whose files other than the image hold over N bytes (default 16 MiB)")
    p.add_argument("--read-threads", type=int, default=2, help="CPU threads reading and decoding images per worker")
    p.add_argument("--inject-crash", metavar="SHARD:N", help=argparse.SUPPRESS)  # tests: kill a worker mid-shard
    common.add_run_args(p)
    common.add_storage_args(p)


def unit_ids(urls: list[str], committed: dict[str, ShardStats]) -> dict[str, str]:
    """Each shard's unit id: the committed unit that came from it, else a new id from its path.

    Shards are matched to committed parts by their canonical URL, so an archive grows whatever
    the spelling of --input; a new id that an earlier shard already uses gets a hash suffix.
    """
    by_source = {storage.canonical_url(s.source): unit for unit, s in committed.items()}
    new = [u for u in urls if u not in by_source]
    ids = dict(by_source)
    for url, unit in (storage.shard_ids(new) if new else {}).items():
        ids[url] = f"{unit}-{hashlib.sha256(url.encode()).hexdigest()[:8]}" if unit in committed else unit
    return {url: ids[url] for url in urls}


def check(args: argparse.Namespace) -> None:
    common.check_run_args(args)
    common.at_least(args, "max-pixels", 64 * 64, " (one padded 64x64 block)")
    common.at_least(args, "read-threads", 1)
    common.at_least(args, "max-member-bytes", 1)
    common.at_least(args, "max-sidecar-bytes", 0)


def run(args: argparse.Namespace) -> int:
    opts = common.storage_from(args)
    model = common.resolve_model(args.model)
    args.output = storage.canonical_url(args.output)  # workers run elsewhere, in another folder
    urls = [storage.canonical_url(u) for u in expand(args.input, opts.fsspec_kwargs)]
    if not urls:
        print(f"rdeic-job: error: no input shards match {args.input}", file=sys.stderr)
        return 2
    settings = {"model_id": common.model_id(model, opts), "codec_version": CODEC_VERSION, "max_pixels": args.max_pixels or "auto",
                "max_member_bytes": args.max_member_bytes, "max_sidecar_bytes": args.max_sidecar_bytes}
    output = common.open_output(args.output, "compress", settings, ARCHIVE, args)
    try:
        ids = unit_ids(urls, output.committed)
        units = [ShardTask(url, ids[url]) for url in urls]
        common.prepare_units(output, units, args)
        spec = CompressSpec(output=args.output, model=model, storage=opts, batch_size=args.batch_size,
                            max_pixels=args.max_pixels, max_member_bytes=args.max_member_bytes,
                            max_sidecar_bytes=args.max_sidecar_bytes, read_threads=args.read_threads,
                            crash=common.crash_spec(args.inject_crash), run_id=output.run_id, settings=settings,
                            device=args.device)
        return common.run_units("compress", output, spec, units, args)
    finally:
        output.close()
