"""``rdeic-job audit``: a 100% integrity scan and a sampled quality audit of an archive, a report, a gate.

One unit per committed archive part, on the same Ray actors as decode: every row's bitstream is
checked as far as entropy decoding, and the part's share of a deterministic sample is decoded and
compared with its originals, next to JPEG, WebP and AVIF at the same rate. The report goes to
``--report URL/<run-id>/`` (``summary.json``, ``rows.parquet``, ``index.html``). A run id is one
audit: re-run with it, the audit resumes where it stopped, or, when finished, rebuilds the same
report; other settings under the same run id are refused. docs/audit.md has the whole story.

Exit status: 0 the gate passed (or has no rules); 1 the audit could not finish (rerun to
resume); 2 refused (arguments, thresholds); 3 the gate failed (one line per failed rule); 75 an
audit of this report root is running.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import audit_summary, gate, storage
from pipelines.archive import ARCHIVE, COMMITS, committed_part_ids, part_name
from pipelines.audit import FEATURES, FINDINGS, LAYOUT, SAMPLES, AuditSpec, sample_schema
from pipelines.compress import ShardTask
from pipelines.lease import LEASE, Holder, Lease, LeaseLost, new_run_id
from pipelines.manifest import RESERVED, JobOutput, OutputRefused, read_index, read_markers
from pipelines.report import summarize, table, totals
from pipelines.sampling import quotas
from rdeic.bitstream import DEFAULT_MAX_PIXELS
from rdeic.metrics import METRIC_NAMES as METRICS

from . import common
from .decode import check_archive_model, check_steps

log = logging.getLogger(__name__)

BASELINES = ("jpeg", "webp", "avif")
PRODUCTS = ("summary.json", "rows.parquet", "index.html", "plan.json")
DEFAULT_RULES = "absolute:\n  - integrity.changed == 0\n  - integrity.missing == 0\n"
EXIT_GATE = 3
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--archive", required=True, metavar="URL", help="archive folder written by rdeic-job compress")
    p.add_argument("--report", required=True, metavar="URL",
                   help="report root: this audit writes URL/<run-id>/, earlier runs there give the trend and the previous run")
    p.add_argument("--run-id", metavar="ID",
                   help="this audit's name (default: today's UTC date, YYYY-MM-DD): the same id resumes or rebuilds its report")
    p.add_argument("--sample", type=int, default=64, metavar="N", help="images to decode and measure (default 64; 0: integrity only)")
    p.add_argument("--seed", default="0", metavar="S",
                   help="which images: the same seed draws the same panel; a date as seed rotates through the archive (default 0)")
    p.add_argument("--metrics", default=",".join(METRICS), metavar="LIST",
                   help=f"comma-separated, of {','.join(METRICS)} (default: all; those without local weights are reported unavailable)")
    p.add_argument("--baselines", default=",".join(BASELINES), metavar="LIST",
                   help="classical codecs at the same rate: jpeg,webp,avif (default all) or none")
    p.add_argument("--thresholds", metavar="FILE",
                   help="YAML gate rules (docs/audit.md); default: integrity.changed == 0 and integrity.missing == 0")
    p.add_argument("--steps", type=int, help="denoising steps L (default: the model's)")
    p.add_argument("--detail", type=float, default=1.0, help="λs, the smoothness/sharpness knob (default 1)")
    p.add_argument("--source-root", metavar="URL", help="folder the source shards are in now, if they moved since compress")
    p.add_argument("--backbones", metavar="DIR",
                   help="folder with the metrics' backbone weights (default: $RDEIC_BACKBONES, then the torch hub cache)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="refuse (as that row's finding) bitstreams of images over this many padded pixels; default 4096²")
    p.add_argument("--inject-crash", metavar="PART:N", help=argparse.SUPPRESS)
    common.add_run_args(p)
    common.add_storage_args(p)


def _names(value: str, known: tuple[str, ...], what: str) -> list[str]:
    names = [] if value.strip() == "none" else [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--{what}: unknown {', '.join(unknown)} (choose from {', '.join(known)}, or none)")
    return list(dict.fromkeys(names))


def check(args: argparse.Namespace) -> None:
    common.check_run_args(args)
    if args.overwrite:
        raise ValueError("--overwrite does not apply to an audit: a run id's report is never rewritten; choose another --run-id")
    common.at_least(args, "sample", 0)
    common.at_least(args, "steps", 1)
    common.at_least(args, "max-pixels", 64 * 64, " (one padded 64x64 block)")
    if not np.isfinite(args.detail) or args.detail < 0:
        raise ValueError(f"--detail must be a finite number >= 0, got {args.detail}")
    args.metrics = _names(args.metrics, METRICS, "metrics")
    args.baselines = _names(args.baselines, BASELINES, "baselines")
    args.run_id = args.run_id or time.strftime("%Y-%m-%d", time.gmtime())
    if not _RUN_ID.fullmatch(args.run_id):
        raise ValueError(f"--run-id must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit, got {args.run_id!r}")
    if args.backbones:
        if "://" in args.backbones:
            raise ValueError(f"--backbones must be a local folder (on every worker), got {args.backbones}")
        args.backbones = os.path.abspath(args.backbones)  # workers run in another folder
    if len(args.seed) > 200:
        raise ValueError("--seed is longer than 200 characters")
    args.rules = gate.read_rules(args.thresholds) if args.thresholds else gate.load_rules(DEFAULT_RULES, "the default gate")


def run(args: argparse.Namespace) -> int:
    opts = common.storage_from(args)
    model = common.resolve_model(args.model)
    check_steps(model, opts, args.steps)
    args.archive, args.report = storage.canonical_url(args.archive), storage.canonical_url(args.report)
    source_root = storage.canonical_url(args.source_root) if args.source_root else None
    archive_fs, archive_root = storage.filesystem(args.archive, opts)
    parts = committed_part_ids(archive_fs, archive_root)
    if not parts:
        print(f"rdeic-job: error: no committed parts in {args.archive}", file=sys.stderr)
        return 2
    model_id = common.model_id(model, opts)
    check_archive_model(archive_fs, archive_root, model_id)
    settings = {"archive": args.archive, "model_id": model_id, "sample": args.sample, "seed": args.seed,
                "metrics": args.metrics, "baselines": args.baselines, "steps": args.steps, "detail": args.detail,
                "source_root": source_root, "max_pixels": args.max_pixels}
    fs, root = storage.filesystem(args.report, opts)
    _check_report_root(fs, root)
    lock = Lease(fs, root, new_run_id(), args.lease_ttl)  # one audit at a time per report root
    fs.makedirs(root, exist_ok=True)
    lock.acquire(args.break_lease)
    lock.start_heartbeat()
    try:
        output = JobOutput(fs, storage.join(root, args.run_id), "audit", settings, LAYOUT, lock.run_id,
                           lease_ttl=args.lease_ttl, products=PRODUCTS)
        output.open(break_lease=args.break_lease)
        try:
            plan = _plan(output, archive_fs, archive_root, parts, settings)
            spec = AuditSpec(archive=args.archive, report=storage.join(args.report, args.run_id), model=model, storage=opts,
                             quotas=plan["quotas"], seed=args.seed, metrics=tuple(args.metrics),
                             baselines=tuple(args.baselines), steps=args.steps, detail=args.detail,
                             batch_size=args.batch_size, max_pixels=args.max_pixels, source_root=source_root,
                             backbones=args.backbones, crash=common.crash_spec(args.inject_crash), run_id=output.run_id,
                             settings=settings, device=args.device)
            units = [ShardTask(storage.join(args.archive, part_name(p)), p) for p in plan["parts"]]
            return _run(args, output, spec, units, plan, archive_fs, archive_root, lock)
        finally:
            output.close()
    finally:
        lock.release()


def _check_report_root(fs, root: str) -> None:
    """A report root holds run folders and the lock; a file of anything else means it is someone else's folder."""
    entries = storage.list_names(fs, root)
    foreign = sorted(n for n, is_dir in entries.items() if not is_dir and n not in RESERVED)
    lock = storage.read_bytes(fs, storage.join(root, LEASE)) if LEASE in entries else None
    if lock is not None and Holder.parse(lock) is None:  # taking the lock would overwrite a file not ours
        foreign.append(LEASE)
    if foreign:
        raise OutputRefused(f"{root} holds files that are not audit reports ({', '.join(foreign[:5])}); "
                            "choose a new or empty folder as --report")


def _plan(output: JobOutput, archive_fs, archive_root: str, parts: list[str], settings: dict) -> dict:
    """The parts and quotas of this run id, fixed when it first starts: a resumed audit audits what it began with."""
    path = output.path("plan.json")
    data = storage.read_bytes(output.fs, path)
    if data is not None:
        plan = _checked_plan(data, path)
        if plan["settings"] != settings:
            diff = [k for k in settings if plan.get("settings", {}).get(k) != settings[k]]
            raise OutputRefused(f"audit {output.root} was started with other settings ({', '.join(diff) or 'all'} "
                                f"differ); re-run it with its own, or choose another --run-id")
        if sorted(parts) != plan["parts"]:
            log.info("the archive changed since this audit started; auditing the %d parts it began with", len(plan["parts"]))
        return plan
    bad: dict[str, str] = {}
    stats = read_index(archive_fs, archive_root)
    stats = {p: stats[p] for p in parts if p in stats}
    stats.update(read_markers(archive_fs, archive_root, ARCHIVE, sorted(set(parts) - set(stats)), bad=bad))
    plan = {"settings": settings, "planned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "parts": sorted(parts),
            "quotas": quotas({p: stats[p].ok for p in stats}, settings["sample"]), "bad_markers": bad,
            "untracked": _untracked(archive_fs, archive_root, parts)}
    storage.write_bytes_atomic(output.fs, path, json.dumps(plan, indent=1).encode(), token=output.control.token)
    return plan


def _checked_plan(data: bytes, path: str) -> dict:
    """plan.json as read back from storage: its part ids build paths, so each is checked before use."""
    try:
        plan = json.loads(data)
        parts, quotas_ = plan["parts"], plan["quotas"]
        well_formed = (isinstance(plan["settings"], dict) and isinstance(plan["planned_at"], str)
                       and isinstance(plan["bad_markers"], dict) and isinstance(plan["untracked"], list)
                       and isinstance(parts, list) and all(_is_unit_id(p) for p in parts) and isinstance(quotas_, dict)
                       and all(p in parts and type(n) is int and n >= 0 for p, n in quotas_.items()))
    except (ValueError, KeyError, TypeError) as exc:
        well_formed, plan = False, exc
    if not well_formed:
        raise OutputRefused(f"{path} is not an audit plan of this version; move it away or choose another --run-id")
    return plan


def _is_unit_id(value: object) -> bool:
    return isinstance(value, str) and value not in ("", ".", "..") and "/" not in value and "\x00" not in value


def _untracked(fs, root: str, parts: list[str]) -> list[dict]:
    """Files in the archive that no commit marker accounts for (never touched, only listed)."""
    committed = {part_name(p) for p in parts}
    out = []
    for name, is_dir in sorted(storage.list_names(fs, root).items()):
        if name in RESERVED or name in committed:
            continue
        is_part = name.startswith(ARCHIVE.data_prefix) and name.endswith(ARCHIVE.data_suffix)
        why = "a part file without a commit marker" if is_part else "not written by rdeic-job compress"
        out.append({"path": name + ("/" if is_dir else ""), "reason": why})
    markers = {ARCHIVE.marker(p).split("/", 1)[1] for p in parts}
    for name in storage.list_files(fs, storage.join(root, COMMITS)):
        if name not in markers:
            out.append({"path": f"{COMMITS}/{name}", "reason": "not a commit marker of a part"})
    return out


def _run(args, output: JobOutput, spec: AuditSpec, units: list[ShardTask], plan: dict, archive_fs, archive_root,
         lock: Lease) -> int:
    from pipelines.distributor import init_ray, run_tasks

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    todo = [u for u in units if u.shard_id not in output.committed]
    if todo:
        init_ray(args.ray_address)
    result = run_tasks("audit", spec, todo, args.actors, args.max_retries, skipped=len(units) - len(todo), desc="audit",
                       start_timeout=args.start_timeout, check=lambda: _check_leases(output, lock),
                       progress=not args.quiet, coder_processes=args.coder_processes)
    done = [s for s in result.stats if not s.skipped]
    run = summarize("audit", output.run_id, started, len(units), done, result.failed, result.seconds,
                    result.startup_seconds, result.actors, skipped=len(units) - len(done) - len(result.failed),
                    untracked=output.untracked, rewritten=output.rewritten)
    if result.failed:
        output.finish(result.stats, run, totals)
        print(table({"run": run, "archive": totals(done)}))
        print(f"rdeic-job: {len(result.failed)} part(s) could not be audited; rerun the same command to resume "
              "(the report is written when every part is done)", file=sys.stderr)
        return 1
    summary = _report(args, output, spec, plan, units, started, result.seconds)
    output.finish(result.stats, run, totals)
    _print(summary, output.root)
    lines = gate.failures(summary["gate"])
    for line in lines:
        print(f"rdeic-job: {line}", file=sys.stderr)
    return EXIT_GATE if lines else 0


def _check_leases(output: JobOutput, lock: Lease) -> None:
    if output.lease.lost.is_set() or lock.lost.is_set():
        raise LeaseLost(f"this audit lost its lock on {output.root}; stopping (what it committed stays committed)")


def _read_units(output: JobOutput, units: list[ShardTask],
                baselines: tuple[str, ...]) -> tuple[list[dict], list[dict], list[np.ndarray], list[np.ndarray]]:
    """Every unit's findings, sampled rows and patch features, read in one batch (concurrent requests on
    object stores), each unit's files checked: a damaged one is named, never half-read."""
    names = (FINDINGS, SAMPLES, FEATURES)
    paths = {(u.shard_id, n): storage.join(output.path(LAYOUT.data(u.shard_id)), n) for u in units for n in names}
    got = {k.split("://", 1)[-1]: v for k, v in output.fs.cat(list(paths.values()), on_error="return").items()}
    schema = sample_schema(baselines)
    findings, rows, real, fake = [], [], [], []
    for u in units:
        blobs = {n: got.get(paths[(u.shard_id, n)].split("://", 1)[-1]) for n in names}
        try:
            f, unit_rows, features = _unit_data(blobs, schema)
        except (ValueError, KeyError, TypeError, OSError, pa.ArrowException) as exc:
            raise OutputRefused(f"{output.path(LAYOUT.data(u.shard_id))} is damaged ({str(exc)[:200]}); move "
                                f"{output.path(LAYOUT.marker(u.shard_id))} away to audit that part again") from None
        findings.append(f)
        rows += unit_rows
        if features is not None:
            real.append(features[0])
            fake.append(features[1])
    return findings, rows, real, fake


def _unit_data(blobs: dict, schema: pa.Schema) -> tuple[dict, list[dict], tuple | None]:
    for name in (FINDINGS, SAMPLES):
        if not isinstance(blobs[name], bytes):
            raise FileNotFoundError(f"{name} is missing")
    f = json.loads(blobs[FINDINGS])
    counts = [f[k] for k in ("rows", "ok_rows", "error_rows", "rows_checked")]
    if not (all(type(n) is int and n >= 0 for n in counts) and isinstance(f["changed"], list)
            and isinstance(f["missing"], list) and isinstance(f["unavailable"], dict)
            and isinstance(f["scan_seconds"], (int, float))):
        raise ValueError(f"{FINDINGS} is not a unit's findings")
    table = pq.read_table(io.BytesIO(blobs[SAMPLES]))
    if not table.schema.equals(schema):
        raise ValueError(f"{SAMPLES} has other columns than this audit's")
    features = None
    if isinstance(blobs[FEATURES], bytes):
        with np.load(io.BytesIO(blobs[FEATURES]), allow_pickle=False) as npz:
            features = (npz["real"], npz["fake"])
        if any(a.ndim != 2 or a.dtype != np.float32 for a in features) or features[0].shape[1] != features[1].shape[1]:
            raise ValueError(f"{FEATURES} does not hold two (patches × features) float32 arrays of one width")
    return f, table.to_pylist(), features


def _report(args, output: JobOutput, spec: AuditSpec, plan: dict, units: list[ShardTask], started: str,
            seconds: float) -> dict:
    from rdeic.metrics import fid_kid, versions

    from pipelines.audit_report import render

    findings, rows, real, fake = _read_units(output, units, spec.baselines)
    unavailable = {}
    for f in findings:
        unavailable.update(f.get("unavailable", {}))
    distribution = {}
    if real and ("fid" in args.metrics or "kid" in args.metrics) and not {"fid", "kid"} <= set(unavailable):
        distribution = fid_kid(np.concatenate(real), np.concatenate(fake))
    rows.sort(key=lambda r: (r["part"], r["source_index"]))
    summary = {
        "format": audit_summary.FORMAT, "format_version": audit_summary.FORMAT_VERSION, "run_id": args.run_id,
        "archive": args.archive, "report": spec.report, "model_id": spec.settings["model_id"],
        "started_at": started, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {k: v for k, v in spec.settings.items() if k not in ("archive", "model_id")},
        "name": f"RDEIC {spec.settings['model_id']}",
        "description": f"rdeic-job audit {args.run_id} of {args.archive}",
        "integrity": audit_summary.integrity(findings, plan["untracked"], plan["bad_markers"]),
        "sample": audit_summary.sample(rows, args.sample, args.seed, len(units)),
        "metrics": audit_summary.metrics(rows, args.metrics, unavailable, distribution),
        "unavailable": unavailable,
        "baselines": audit_summary.baselines(rows, args.baselines, args.metrics),
        "results": audit_summary.compressai_results(rows),
        "versions": {"rdeic-archive": _version(), **versions()},
        "timings": _timings(seconds, findings, rows),
    }
    summary["figures"] = audit_summary.figures(summary)
    history = _history(output, args.run_id, args.archive, before=plan["planned_at"])
    previous = history[-1] if history else None
    summary["gate"] = gate.evaluate(args.rules, summary["figures"], previous and previous["figures"],
                                    previous and previous["run_id"], thresholds=args.thresholds)
    history.append({"run_id": args.run_id, "finished_at": summary["finished_at"], "figures": summary["figures"]})
    table_ = pa.Table.from_pylist(audit_summary.without_crops(rows),
                                  schema=pa.schema([f for f in sample_schema(spec.baselines) if f.name not in audit_summary.CROP_COLUMNS]))
    buf = io.BytesIO()
    pq.write_table(table_, buf, compression="zstd")
    html = render(summary, audit_summary.without_crops(rows), audit_summary.worst_crops(rows), history)
    token = output.control.token
    storage.write_bytes_atomic(output.fs, output.path("rows.parquet"), buf.getvalue(), token=token)
    storage.write_bytes_atomic(output.fs, output.path("index.html"), html.encode(), token=token)
    storage.write_bytes_atomic(output.fs, output.path("summary.json"), json.dumps(summary, indent=1).encode(), token=token)
    return summary


def _timings(seconds: float, findings: list[dict], rows: list[dict]) -> dict:
    """This run's wall time, and the workers' time per stage summed over every unit (earlier runs' too)."""
    out = {"seconds": round(seconds, 3), "scan_seconds": round(sum(f["scan_seconds"] for f in findings), 3)}
    for stage in ("decode_seconds", "metric_seconds", "baseline_seconds"):
        out[stage] = round(sum(r[stage] or 0 for r in rows), 3)
    return out


def _history(output: JobOutput, run_id: str, archive: str, before: str) -> list[dict]:
    """Audits of the same archive under this report root that finished before this one was planned, oldest
    first (so a finished run id rebuilds the same report, whatever ran since)."""
    root = output.root.rsplit("/", 1)[0]
    names = [n for n, is_dir in storage.list_names(output.fs, root).items() if is_dir and n != run_id and n not in RESERVED]
    paths = {storage.join(root, n, "summary.json").split("://", 1)[-1]: n for n in names}
    runs = []
    for path, data in (output.fs.cat(list(paths), on_error="return") if paths else {}).items():
        name = paths.get(path.split("://", 1)[-1], path)
        try:
            s = json.loads(data) if isinstance(data, bytes) else None
        except ValueError:
            continue
        if not (isinstance(s, dict) and s.get("format") == audit_summary.FORMAT and s.get("archive") == archive):
            continue
        if isinstance(s.get("figures"), dict) and isinstance(s.get("finished_at"), str) and s["finished_at"] <= before:
            runs.append({"run_id": str(s.get("run_id", name)), "finished_at": s["finished_at"], "figures": s["figures"]})
    return sorted(runs, key=lambda r: (r["finished_at"], r["run_id"]))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rdeic-archive")
    except PackageNotFoundError:
        return "unknown"


def _print(summary: dict, where: str) -> None:
    found, metrics, gate_ = summary["integrity"], summary["metrics"], summary["gate"]
    psnr = metrics.get("psnr", {})
    lines = [
        f"audit {summary['run_id']} of {summary['archive']}",
        f"integrity   {found['parts']} parts, {found['rows']} rows, {found['rows_checked']} bitstreams checked: "
        f"{found['counts']['changed']} changed, {found['counts']['missing']} missing, {found['counts']['untracked']} untracked",
        f"sample      {summary['sample']['drawn']} drawn: " + ", ".join(f"{n} {o}" for o, n in summary["sample"]["outcomes"].items()),
        f"quality     bpp {_num(metrics['bpp']['mean'])}, PSNR {_num(psnr.get('mean'))} dB (pooled {_num(psnr.get('pooled'))})",
        f"gate        {'passed' if gate_['passed'] else 'FAILED' if gate_['passed'] is False else 'no rules'}",
        f"report      {where}/index.html",
    ]
    print("\n".join(lines))


def _num(value) -> str:
    return "-" if value is None else f"{value:.4g}"
