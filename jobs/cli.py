"""``rdeic-job``: the distributed jobs (compress, decode, audit, train), each with ``--help``."""

from __future__ import annotations

import argparse
import sys
import warnings

from . import audit, common, compress, decode, train

JOBS = {"compress": compress, "decode": decode, "audit": audit, "train": train}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rdeic-job", description="Distributed RDEIC jobs on Ray.")
    sub = p.add_subparsers(dest="job", required=True)
    for name, module in JOBS.items():
        sp = sub.add_parser(name, help=module.__doc__.strip().splitlines()[0], description=module.__doc__)
        module.add_arguments(sp)
    return p


EXIT_OK, EXIT_FAILED, EXIT_REFUSED, EXIT_BUSY, EXIT_INTERRUPTED = 0, 1, 2, 75, 130


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 all units committed; 1 some units failed or no worker could start (rerun to retry);
    2 refused (arguments, an output that is not ours or has other settings); 75 the output is in use
    by another run (EX_TEMPFAIL: try later); 130 interrupted (rerun to resume); audit only: 3 the
    regression gate failed."""
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    args = build_parser().parse_args(argv)
    common.setup_logging(args.quiet)
    check = getattr(JOBS[args.job], "check", None)
    if check is not None:
        try:
            check(args)  # before Ray starts or a model loads
        except ValueError as exc:
            return _error(exc, EXIT_REFUSED)
    from pipelines.distributor import WorkerStartError
    from pipelines.lease import LeaseBusy, LeaseLost
    from pipelines.manifest import OutputRefused

    try:
        return JOBS[args.job].run(args)
    except (WorkerStartError, LeaseLost) as exc:
        return _error(exc, EXIT_FAILED)
    except LeaseBusy as exc:
        return _error(exc, EXIT_BUSY)
    except (OutputRefused, ValueError, OSError) as exc:
        return _error(exc, EXIT_REFUSED)
    except Exception as exc:
        from pipelines.storage import explain

        message = explain(exc)
        if message is None:
            raise
        return _error(message, EXIT_REFUSED)
    except KeyboardInterrupt:
        print("rdeic-job: interrupted; what was committed stays committed: rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


def _error(exc: BaseException, status: int) -> int:
    print(f"rdeic-job: error: {exc}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
