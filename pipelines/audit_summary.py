"""From the audit's committed units to its report: ``summary.json``'s numbers and the rows people read.

Aggregates are over the images whose outcome is ``ok``. PSNR is given both ways, as the mean
of per-image PSNRs (CompressAI's ``eval_model``) and from the MSE pooled over all pixels (CLIC);
the per-image lists use CompressAI's names (``psnr-rgb``, ``ms-ssim-rgb``, ``bpp``,
``decoding_time``) so existing plotting tools read them. ``figures`` is the flat dict of headline
numbers that the gate judges and the report's trend plots.
"""

from __future__ import annotations

import math

import numpy as np

from rdeic import metrics as metrics_module
from rdeic.metrics import MS_SSIM_MIN_SIDE, PAIR_METRICS

from .audit import CROP_COLUMNS, OUTCOMES

FORMAT = "rdeic-audit-report"
FORMAT_VERSION = 1
LISTED = 1000  # findings listed in summary.json per class (the counts are always whole)
MS_SSIM_SKIP = f"images with a side under {MS_SSIM_MIN_SIDE} px (MS-SSIM's five scales need both sides >= {MS_SSIM_MIN_SIDE})"


def aggregate(values: list) -> dict:
    """mean, median, p05, min, max and n over the finite values (all None when there are none)."""
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if not len(finite):
        return {"mean": None, "median": None, "p05": None, "min": None, "max": None, "n": 0}
    return {"mean": float(finite.mean()), "median": float(np.median(finite)), "p05": float(np.percentile(finite, 5)),
            "min": float(finite.min()), "max": float(finite.max()), "n": int(len(finite))}


def pooled_psnr(rows: list[dict], prefix: str = "") -> float | None:
    """PSNR of the MSE pooled over every pixel of the images (CLIC's way; big images weigh more)."""
    return metrics_module.pooled_psnr((r.get(f"{prefix}mse"), r["width"] * r["height"]) for r in rows)


def integrity(findings: list[dict], untracked: list[dict], bad_markers: dict[str, str]) -> dict:
    changed = [c for f in findings for c in f["changed"]]
    changed += [{"key": None, "part": unit, "check": "marker", "expected": "a commit marker of this archive",
                 "actual": why[:300]} for unit, why in sorted(bad_markers.items())]
    missing = [m for f in findings for m in f["missing"]]
    changed.sort(key=lambda c: (c["part"], c["key"] or "", c["check"]))
    return {
        "parts": len(findings), "rows": sum(f["rows"] for f in findings), "ok_rows": sum(f["ok_rows"] for f in findings),
        "error_rows": sum(f["error_rows"] for f in findings), "rows_checked": sum(f["rows_checked"] for f in findings),
        "counts": {"changed": len(changed), "missing": len(missing), "untracked": len(untracked)},
        "changed": changed[:LISTED], "missing": missing[:LISTED], "untracked": untracked[:LISTED],
    }


def metrics(rows: list[dict], requested: list[str], unavailable: dict[str, str], distribution: dict) -> dict:
    ok = [r for r in rows if r["outcome"] == "ok"]
    out = {name: aggregate([r[name] for r in ok]) for name in PAIR_METRICS if name in requested}
    if "psnr" in out:
        out["psnr"]["pooled"] = pooled_psnr(ok)
    if "ms_ssim" in out and "ms_ssim" not in unavailable:
        skipped = sum(1 for r in ok if r["ms_ssim"] is None)
        out["ms_ssim"].update(skipped=skipped, skipped_reason=MS_SSIM_SKIP if skipped else None)
    out["bpp"] = aggregate([r["bpp"] for r in ok])
    for name in ("fid", "kid"):
        if name in requested:
            out[name] = {"value": distribution.get(name), "patches": distribution.get("patches", 0)}
    if "fid" in out:
        out["fid"]["warning"] = distribution.get("warning")
    return out


def baselines(rows: list[dict], names: list[str], requested: list[str]) -> dict:
    ok = [r for r in rows if r["outcome"] == "ok"]
    out = {}
    for b in names:
        entry = {"bpp": aggregate([r[f"{b}_bpp"] for r in ok])}
        for name in PAIR_METRICS:
            if name in requested and name != "niqe":
                entry[name] = aggregate([r[f"{b}_{name}"] for r in ok])
        if "psnr" in entry:
            entry["psnr"]["pooled"] = pooled_psnr(ok, f"{b}_")
        entry.update(at_floor=sum(1 for r in ok if r[f"{b}_at_floor"]), n=len(ok))
        out[b] = entry
    return out


def sample(rows: list[dict], requested: int, seed: str, strata: int) -> dict:
    outcomes = {}
    for r in rows:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    return {"requested": requested, "seed": seed, "drawn": len(rows), "strata": strata,
            "outcomes": {o: outcomes[o] for o in OUTCOMES if o in outcomes}}


def compressai_results(rows: list[dict]) -> dict:
    """Per-image lists named as CompressAI's ``eval_model`` JSON (ms-ssim-rgb is null where skipped)."""
    ok = [r for r in rows if r["outcome"] == "ok"]
    return {"psnr-rgb": [r["psnr"] for r in ok], "ms-ssim-rgb": [r["ms_ssim"] for r in ok],
            "bpp": [r["bpp"] for r in ok], "decoding_time": [r["decode_seconds"] for r in ok]}


def figures(summary: dict) -> dict:
    """The flat headline numbers: what thresholds name and what the trend shows."""
    out = {f"integrity.{k}": v for k, v in summary["integrity"]["counts"].items()}
    for outcome in OUTCOMES[1:]:
        out[f"sample.{outcome}"] = summary["sample"]["outcomes"].get(outcome, 0)
    for name, agg in summary["metrics"].items():
        if "value" in agg:
            out[name] = agg["value"]
        else:
            out[f"{name}.mean"] = agg["mean"]
            out[f"{name}.median"] = agg["median"]
            if "pooled" in agg:
                out[f"{name}.pooled"] = agg["pooled"]
    for b, entry in summary["baselines"].items():
        for name, agg in entry.items():
            if isinstance(agg, dict):
                out[f"{b}.{name}.mean"] = agg["mean"]
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def worst_crops(rows: list[dict], k: int = 12) -> dict:
    """The worst images that carry crops, worst first (LPIPS where measured, else lowest PSNR)."""
    with_crops = [r for r in rows if r.get("crop_original")]
    metric = "lpips" if any(r["lpips"] is not None for r in with_crops) else "psnr"

    def badness(r: dict) -> float:
        v = r[metric]
        if v is None or not math.isfinite(v):
            return math.inf
        return -v if metric == "lpips" else v

    return {r["key"]: {"original": r["crop_original"], "rdeic": r["crop_rdeic"], "baseline": r["crop_baseline"],
                       "baseline_name": r["crop_baseline_name"], "why": r["crop_why"]}
            for r in sorted(with_crops, key=badness)[:k]}


def without_crops(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in CROP_COLUMNS} for r in rows]
