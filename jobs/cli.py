"""``rdeic-job``: the distributed jobs (compress, decode, train), each with ``--help``."""

from __future__ import annotations

import argparse
import sys
import warnings

from . import common, compress, decode, train

JOBS = {"compress": compress, "decode": decode, "train": train}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rdeic-job", description="Distributed RDEIC jobs on Ray.")
    sub = p.add_subparsers(dest="job", required=True)
    for name, module in JOBS.items():
        sp = sub.add_parser(name, help=module.__doc__.strip().splitlines()[0], description=module.__doc__)
        module.add_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    args = build_parser().parse_args(argv)
    common.setup_logging(args.quiet)
    from pipelines.distributor import WorkerStartError
    from pipelines.manifest import JobConfigMismatch

    try:
        return JOBS[args.job].run(args)
    except WorkerStartError as exc:
        print(f"rdeic-job: error: {exc}", file=sys.stderr)
        return 1
    except (JobConfigMismatch, ValueError, OSError) as exc:
        print(f"rdeic-job: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
