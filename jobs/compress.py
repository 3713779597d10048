"""``rdeic-job compress``: WebDataset shards → Parquet archive of RDEIC bitstreams, exactly once."""

from __future__ import annotations

import argparse
import sys

from pipelines import storage
from pipelines.compress import CODEC_VERSION, CompressSpec, ShardTask
from pipelines.manifest import JobOutput, Layout

from . import common


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="URL",
                   help="tar shards: brace patterns (shard-{000000..000099}.tar) or globs, local or s3://")
    p.add_argument("--output", required=True, metavar="URL", help="archive folder, local or s3://")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, help="refuse larger images (decompression bombs); default 4096²")
    p.add_argument("--read-threads", type=int, default=2, help="CPU threads reading and decoding images per worker")
    p.add_argument("--inject-crash", metavar="SHARD:N", help=argparse.SUPPRESS)  # tests: kill a worker mid-shard
    common.add_run_args(p)
    common.add_storage_args(p)


def run(args: argparse.Namespace) -> int:
    opts = common.storage_from(args)
    model = common.resolve_model(args.model)
    urls = storage.expand_inputs(args.input, opts)
    if not urls:
        print(f"rdeic-job: error: no input shards match {args.input}", file=sys.stderr)
        return 2
    ids = storage.shard_ids(urls)
    config = {
        "inputs": args.input,
        "shards": len(urls),
        "shards_sha256": common.file_sha256("\n".join(urls)),
        "model_id": common.model_id(model, opts),
        "max_pixels": args.max_pixels,
        "codec_version": CODEC_VERSION,
    }
    fs, root = storage.filesystem(args.output, opts)
    output = JobOutput(fs, root, "compress", config, Layout("part-", ".parquet"))
    committed = output.prepare(args.overwrite)
    spec = CompressSpec(output=args.output, model=model, storage=opts, batch_size=args.batch_size,
                        max_pixels=args.max_pixels, read_threads=args.read_threads, crash=common.crash_spec(args.inject_crash))
    summary = common.run_units("compress", spec, [ShardTask(url, ids[url]) for url in urls], committed, args)
    summary["model_id"] = config["model_id"]
    return common.finish(summary, output)
