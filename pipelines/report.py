"""Run summaries: a JSON document for the output folder and a table for the terminal."""

from __future__ import annotations

import time

from .archive import ShardStats


def summarize(kind: str, stats: list[ShardStats], failed: list[dict], seconds: float, actors: list[dict],
              total_shards: int, startup_seconds: float = 0.0) -> dict:
    done = [s for s in stats if not s.skipped]
    previously = [s for s in stats if s.skipped]
    ok = sum(s.ok for s in done)
    pixels = sum(s.pixels for s in done)
    bits = sum(s.bitstream_bytes for s in done) * 8
    reasons: dict[str, int] = {}
    for s in done:
        for reason, n in s.error_reasons.items():
            reasons[reason] = reasons.get(reason, 0) + n
    return {
        "kind": kind,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "shards_total": total_shards,
        "shards_done_this_run": len(done),
        "shards_already_committed": len(previously),
        "shards_failed": failed,
        "shard_errors": {s.shard_id: s.shard_error for s in done if s.shard_error},
        "samples_ok": ok,
        "samples_error": sum(s.errors for s in done),
        "samples_ok_all_runs": sum(s.ok for s in stats),
        "samples_error_all_runs": sum(s.errors for s in stats),
        "error_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:20]),
        "failed_keys": [k for s in done for k in s.failed_keys][:1000],  # decode: all are in the markers
        "bytes_in": sum(s.bytes_in for s in done),
        "bytes_out": sum(s.bytes_out for s in done),
        "mean_bpp": bits / pixels if pixels else None,
        "seconds": round(seconds, 3),
        "startup_seconds": round(startup_seconds, 3),
        "images_per_second": round(ok / seconds, 3) if seconds else None,
        "images_per_second_after_startup": round(ok / (seconds - startup_seconds), 3) if seconds > startup_seconds else None,
        "workers": actors,
    }


def table(summary: dict) -> str:
    rows = [
        ("shards", f"{summary['shards_done_this_run']} done, {summary['shards_already_committed']} already committed, "
                   f"{len(summary['shards_failed'])} failed, of {summary['shards_total']}"),
        ("samples", f"{summary['samples_ok']} ok, {summary['samples_error']} errors this run; "
                    f"{summary['samples_ok_all_runs']} ok, {summary['samples_error_all_runs']} errors in all"),
        ("bytes", f"{summary['bytes_in']:,} in, {summary['bytes_out']:,} out"),
        ("mean bpp", f"{summary['mean_bpp']:.4f}" if summary["mean_bpp"] is not None else "-"),
        ("time", f"{summary['seconds']:.1f} s ({summary['startup_seconds']:.1f} s worker start-up), "
                 f"{summary['images_per_second'] or 0:.2f} images/s, {summary['images_per_second_after_startup'] or 0:.2f} after start-up"),
        ("workers", ", ".join(f"{w.get('device')}(gpu {','.join(w.get('gpu_ids') or []) or '-'})" for w in summary["workers"]) or "-"),
    ]
    for reason, n in list(summary["error_reasons"].items())[:5]:
        rows.append(("error", f"{n} × {reason}"))
    for shard, err in list(summary["shard_errors"].items())[:5]:
        rows.append(("shard error", f"{shard}: {err}"))
    for f in summary["shards_failed"][:10]:
        rows.append(("FAILED", f"{f['shard_id']} after {f['attempts']} attempts: {f['error']}"))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([f"{summary['kind']} summary", line] + [f"{k:<{width}}  {v}" for k, v in rows] + [line])
