"""Run summaries: this run's numbers, the whole output's numbers, and a table for the terminal.

``_summary.json`` holds both: ``run`` (what this run did, so a no-op re-run shows zeros there)
and ``archive`` (totals over every committed unit, from the index, so they only ever grow).
Error reasons are grouped by their stable code (pipelines/reasons.py).
"""

from __future__ import annotations

import time

from .archive import ShardStats


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _sum_reasons(stats: list[ShardStats]) -> dict[str, int]:
    reasons: dict[str, int] = {}
    for s in stats:
        for code, n in s.error_reasons.items():
            reasons[code] = reasons.get(code, 0) + n
    return dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))


def totals(stats: list[ShardStats]) -> dict:
    """Numbers over a set of committed units."""
    pixels = sum(s.pixels for s in stats)
    bits = sum(s.bitstream_bytes for s in stats) * 8
    return {
        "units_committed": len(stats),
        "samples_ok": sum(s.ok for s in stats),
        "samples_error": sum(s.errors for s in stats),
        "error_reasons": _sum_reasons(stats),
        "units_with_shard_errors": sum(1 for s in stats if s.shard_error),
        "bytes_in": sum(s.bytes_in for s in stats),
        "bytes_out": sum(s.bytes_out for s in stats),
        "mean_bpp": bits / pixels if pixels else None,
    }


def summarize(kind: str, run_id: str, started_at: str, units_total: int, done: list[ShardStats], failed: list[dict],
              seconds: float, startup_seconds: float, actors: list[dict], skipped: int = 0,
              untracked: list[str] = (), rewritten: list[str] = ()) -> dict:
    """What this run did (``done``: units it committed; ``failed``: units that ran out of attempts)."""
    ok = sum(s.ok for s in done)
    examples: dict[str, str] = {}
    for s in done:
        for code, text in s.error_examples.items():
            examples.setdefault(code, text)
    return {
        "kind": kind,
        "run_id": run_id,
        "started_at": started_at,
        "finished_at": _now(),
        "units_total": units_total,
        "units_done": len(done),
        "units_already_committed": skipped,
        "units_rewritten": list(rewritten),
        "units_failed_count": len(failed),
        "units_failed": failed,
        **{k: v for k, v in totals(done).items() if k != "units_committed"},
        "error_examples": examples,
        "shard_errors": {s.shard_id: s.shard_error for s in done if s.shard_error},
        "warnings": {s.shard_id: s.warning for s in done if s.warning},
        "failed_keys": [k for s in done for k in s.failed_keys][:1000],  # decode: all of them are in the markers
        "untracked_files": list(untracked)[:100],
        "seconds": round(seconds, 3),
        "startup_seconds": round(startup_seconds, 3),
        "images_per_second": round(ok / seconds, 3) if seconds else None,
        "images_per_second_after_startup": round(ok / (seconds - startup_seconds), 3) if seconds > startup_seconds else None,
        "workers": actors,
    }


def table(summary: dict) -> str:
    run, whole = summary["run"], summary["archive"]
    bpp = whole["mean_bpp"]
    rows = [
        ("units", f"{run['units_done']} done, {run['units_already_committed']} already committed, "
                  f"{run['units_failed_count']} failed, of {run['units_total']} in this run"),
        ("samples", f"{run['samples_ok']} ok, {run['samples_error']} errors this run"),
        ("output", f"{whole['units_committed']} units: {whole['samples_ok']} ok, {whole['samples_error']} errors"
                   + (f", mean bpp {bpp:.4f}" if bpp is not None else "")),
        ("bytes", f"{run['bytes_in']:,} in, {run['bytes_out']:,} out this run"),
        ("time", f"{run['seconds']:.1f} s ({run['startup_seconds']:.1f} s worker start-up), "
                 f"{run['images_per_second'] or 0:.2f} images/s, {run['images_per_second_after_startup'] or 0:.2f} after start-up"),
        ("workers", ", ".join(f"{w.get('device')}(gpu {','.join(w.get('gpu_ids') or []) or '-'})" for w in run["workers"]) or "-"),
    ]
    for code, n in list(run["error_reasons"].items())[:5]:
        rows.append(("error", f"{n} × {code}: {run['error_examples'].get(code, '')[:100]}"))
    for unit, text in list(run["shard_errors"].items())[:5] + list(run["warnings"].items())[:5]:
        rows.append(("warning", f"{unit}: {text}"))
    if run["untracked_files"]:
        rows.append(("untracked", f"{len(run['untracked_files'])} files not written by this job, left untouched"))
    for unit in run["units_rewritten"][:5]:
        rows.append(("rewritten", unit))
    for f in run["units_failed"][:10]:
        rows.append(("FAILED", f"{f['shard_id']} after {f['attempts']} attempts: {f['error']}"))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([f"{summary['run']['kind']} summary", line] + [f"{k:<{width}}  {v}" for k, v in rows] + [line])
