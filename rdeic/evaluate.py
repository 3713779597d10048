"""``rdeic eval``: rate–distortion points of RDEIC models and curves of classical codecs on a folder of images.

Every model × decode setting (``steps``, ``detail``) is one point: bpp and every metric averaged
over the images. The points of one setting across the models form a curve (the five released λ_r
checkpoints make a five-point curve; one model makes a one-point curve). Each baseline format of
rdeic/baselines.py is a curve of fixed-quality points, each quality applied to every image (as
CompressAI and the codec literature do), chosen to cover the RDEIC points' bpp interval: for each
of ``points`` rates spaced evenly in log-bpp over the interval, the lowest quality whose mean bpp
reaches it, and the quality just below the interval's low end. A format that cannot reach the
interval gives its nearest qualities instead, and the curve says so (``notes``).

Per-image numbers come from rdeic/metrics.py's :class:`MetricSuite` (per-image PSNR averaged as
``psnr-rgb``, and the pooled-MSE PSNR as ``psnr-rgb-pooled``); FID and KID of a point are over the
256² patches of all its images (:func:`rdeic.metrics.fid_kid`, with the patch count). Output in
``--out``: ``curves/<name>.json`` (CompressAI's ``eval_model`` layout), ``images.parquet`` (one row
per image and point), ``summary.json`` (settings, BD-rate table, versions, timings) and
``index.html`` (rdeic/eval_report.py).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from . import baselines as bl
from .images import open_image, to_rgb
from .metrics import DISTRIBUTION_METRICS, MetricSuite, fid_kid, pooled_psnr
from .metrics import versions as metric_versions
from .shards import IMAGE_EXTENSIONS, MAX_MEMBER_BYTES

log = logging.getLogger(__name__)

# CompressAI's names for our per-image metrics (the others keep their names).
RESULT_NAMES = {"psnr": "psnr-rgb", "ssim": "ssim-rgb", "ms_ssim": "ms-ssim-rgb"}
FORMAT, FORMAT_VERSION = "rdeic-eval", 1
MIN_SPAN = 4.0  # the baselines' interval spans at least this factor in bpp (one RDEIC rate: ×/÷ 2 around it)

# Per image, padded: the metrics (LPIPS, DISTS, MS-SSIM) run on whole images, so eval keeps the limit the
# codec had before it tiled; --max-pixels raises it.
MAX_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class Setting:
    """One decode setting: ``steps`` None is the model's default."""

    steps: int | None
    detail: float

    @property
    def name(self) -> str:
        return f"rdeic steps={self.steps if self.steps is not None else 'default'} detail={self.detail:g}"


@dataclass(frozen=True)
class EvalSpec:
    images: str
    out: str
    models: tuple[str, ...]
    settings: tuple[Setting, ...]
    baselines: tuple[str, ...] = ("jpeg", "webp", "avif")
    metrics: tuple[str, ...] = ("psnr", "ssim", "ms_ssim", "delta_e", "lpips", "dists", "niqe", "fid", "kid")
    anchor: str | None = None
    points: int = 6
    bpp_range: tuple[float, float] | None = None
    backbones: str | None = None
    device: str = "cpu"
    seed: int | None = None  # decode seed of every image; None: the codec's, derived from the content
    max_pixels: int = MAX_PIXELS  # per image, padded to multiples of 64


def load_images(source: str, max_pixels: int | None = MAX_PIXELS) -> dict[str, np.ndarray]:
    """The images under a folder or fsspec URL (recursively, sorted by relative path), as RGB uint8; each
    checked against ``max_pixels`` (padded, as the codec counts them) before its pixels are decoded."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(source)
    if not fs.isdir(root):
        raise ValueError(f"--images: {source!r} is not a folder")
    root = root.rstrip("/")
    paths = sorted(p for p in fs.find(root) if Path(p).suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"--images: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {source!r}")
    out = {}
    for path in paths:
        name = path[len(root):].lstrip("/")
        size = fs.size(path)
        if size is None or size > MAX_MEMBER_BYTES:  # the jobs' limit for one image file
            raise ValueError(f"--images: {name}: the file has {size} bytes, over the limit of {MAX_MEMBER_BYTES}")
        try:
            out[name] = to_rgb(open_image(fs.cat_file(path), max_pixels))
        except ValueError as exc:
            raise ValueError(f"--images: {name}: {exc}") from None
    return out


def check_out(out: str) -> Path:
    """``out`` must be new, empty, or an earlier ``rdeic eval`` output (its files are replaced); nothing is created."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out: {out} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()):
        try:
            ours = json.loads((path / "summary.json").read_text()).get("format") == FORMAT
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise ValueError(f"--out: {out} is not empty and not an rdeic eval output; give a new or empty folder")
    return path


class Measure:
    """Metrics of decoded images against the originals: per-image rows and one point's averages."""

    def __init__(self, images: dict[str, np.ndarray], suite: MetricSuite) -> None:
        self.images, self.suite = images, suite
        self.real = suite.features(list(images.values())) if suite.distribution else None

    def point(self, decoded: list[np.ndarray], info: dict, rows: list[dict]) -> dict:
        """Append one row per image (``info`` plus its numbers) to ``rows``; return the point's means."""
        mine = []
        for (name, original), image, extra in zip(self.images.items(), decoded, info.pop("per_image")):
            h, w = original.shape[:2]
            row = {**info, "image": name, "width": w, "height": h, **extra, **self.suite.pair(original, image)}
            row["bpp"] = 8 * row["num_bytes"] / (w * h)
            mine.append(row)
        rows.extend(mine)
        point = {key: _mean([r.get(key) for r in mine]) for key in ("bpp", *self.suite.names, "encode_seconds", "decode_seconds")
                 if key not in DISTRIBUTION_METRICS}
        point["psnr-pooled"] = pooled_psnr((r["mse"], r["width"] * r["height"]) for r in mine)
        if self.real is not None:
            point.update(fid_kid(self.real, self.suite.features(decoded)))
        return point


def evaluate(spec: EvalSpec, images: dict[str, np.ndarray]) -> tuple[list[dict], list[dict], dict]:
    """(curves, per-image rows, facts) of the whole evaluation; nothing is written."""
    import torch

    torch.manual_seed(0)
    suite = MetricSuite(spec.metrics, backbones=spec.backbones, device=spec.device)
    measure = Measure(images, suite)
    rows: list[dict] = []
    curves = _model_curves(spec, images, measure, rows)
    rdeic_bpp = [b for c in curves for b in c["results"]["bpp"] if b]
    interval = spec.bpp_range or _interval(rdeic_bpp)
    for fmt in spec.baselines:
        curves.append(_baseline_curve(fmt, images, measure, rows, interval, spec.points))
    facts = {"interval": list(interval), "unavailable": dict(suite.unavailable),
             "skipped": {name: {"images": n, "reason": suite.skip_reasons.get(name)} for name, n in suite.skipped.items()},
             "metric_seconds": suite.seconds}
    return curves, rows, facts


def _model_curves(spec: EvalSpec, images: dict[str, np.ndarray], measure: Measure, rows: list[dict]) -> list[dict]:
    from .codec import Codec

    curves = {setting: _new_curve(setting.name, "rdeic", f"RDEIC decoded with {setting.name[6:]}") for setting in spec.settings}
    for model in spec.models:
        codec = Codec.load(model, device=spec.device)
        names = list(images)
        streams, encode_seconds = [], []
        for name in names:
            t0 = time.perf_counter()
            seeds = None if spec.seed is None else [spec.seed]
            streams.append(codec.compress([images[name]], seeds=seeds)[0])
            encode_seconds.append(time.perf_counter() - t0)
        for setting in spec.settings:
            decoded, per_image = [], []
            for stream, enc in zip(streams, encode_seconds):
                t0 = time.perf_counter()
                decoded.append(codec.decompress([stream], steps=setting.steps, detail=setting.detail, max_pixels=None)[0])
                per_image.append({"num_bytes": len(stream), "encode_seconds": enc, "decode_seconds": time.perf_counter() - t0})
            steps = setting.steps or codec.config.diffusion.default_steps
            info = {"curve": setting.name, "kind": "rdeic", "model": str(model), "model_id": str(codec.model_id),
                    "steps": steps, "detail": setting.detail, "format": None, "quality": None, "per_image": per_image}
            point = measure.point(decoded, info, rows)
            _add_point(curves[setting], point, {"label": str(codec.model_id), "model": str(model), "steps": steps,
                                                "detail": setting.detail})
        codec.close()
    return list(curves.values())


def _interval(rates: list[float]) -> tuple[float, float]:
    """The RDEIC points' bpp interval, widened around its geometric centre to span at least ``MIN_SPAN``."""
    if not rates:
        return (0.1, 1.0)
    low, high = min(rates), max(rates)
    if high / low < MIN_SPAN:
        centre = math.sqrt(low * high)
        low, high = min(low, centre / math.sqrt(MIN_SPAN)), max(high, centre * math.sqrt(MIN_SPAN))
    return (low, high)


def _baseline_curve(fmt: str, images: dict[str, np.ndarray], measure: Measure, rows: list[dict],
                    interval: tuple[float, float], points: int) -> dict:
    sweep = bl.Sweep(fmt, list(images.values()))
    curve = _new_curve(fmt, "baseline", f"{fmt} (Pillow, fixed quality over all images; rdeic/baselines.py settings)")
    for quality in sweep.qualities(interval, points):
        decoded, per_image = [], []
        for data, enc in sweep.encodings(quality):
            t0 = time.perf_counter()
            decoded.append(bl.decode(data))
            per_image.append({"num_bytes": len(data), "encode_seconds": enc, "decode_seconds": time.perf_counter() - t0})
        info = {"curve": fmt, "kind": "baseline", "model": None, "model_id": None, "steps": None, "detail": None,
                "format": fmt, "quality": quality, "per_image": per_image}
        point = measure.point(decoded, info, rows)
        outside = point["bpp"] < interval[0] * 0.999 or point["bpp"] > interval[1] * 1.001
        _add_point(curve, point, {"label": f"q={quality}", "quality": quality, "outside_interval": outside})
    bpp = curve["results"]["bpp"]
    if sweep.bpp(sweep.low) > interval[0]:
        curve["notes"].append(f"{fmt}: its lowest quality ({sweep.low}) gives {min(bpp):.4g} bpp, above the interval's "
                              f"low end {interval[0]:.4g}")
    if sweep.bpp(sweep.high) < interval[1]:
        curve["notes"].append(f"{fmt}: its highest quality ({sweep.high}) gives {max(bpp):.4g} bpp, below the interval's "
                              f"high end {interval[1]:.4g}")
    return curve


def _new_curve(name: str, kind: str, description: str) -> dict:
    return {"name": name, "description": description, "kind": kind, "results": {}, "points": [], "notes": []}


def _add_point(curve: dict, point: dict, about: dict) -> None:
    """Append one point to the curve's CompressAI-style lists (one list per quantity, one entry per point)."""
    names = {"bpp": "bpp", "psnr-pooled": "psnr-rgb-pooled", "encode_seconds": "encoding_time",
             "decode_seconds": "decoding_time", **RESULT_NAMES}
    for key, value in point.items():
        if key in ("warning", "patches"):
            continue
        curve["results"].setdefault(names.get(key, key), []).append(_finite(value))
    if "patches" in point:
        about = {**about, "patches": point["patches"], "warning": point.get("warning")}
    curve["points"].append(about)


def write(spec: EvalSpec, out: Path, curves: list[dict], rows: list[dict], facts: dict, seconds: float) -> dict:
    """Write the curves, the rows, the summary and the report; return the summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from . import eval_report

    (out / "curves").mkdir(parents=True, exist_ok=True)
    files = [f"curves/{_slug(curve['name'])}.json" for curve in curves]
    for name in set(_previous_files(out)) - set(files):  # an earlier run's curves, listed in its summary
        (out / name).unlink(missing_ok=True)
    for curve, name in zip(curves, files):
        (out / name).write_text(json.dumps(curve, indent=2) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), out / "images.parquet")
    anchor = spec.anchor or (spec.baselines[0] if spec.baselines else curves[0]["name"])
    summary = eval_report.summarize(curves, anchor=anchor, interval=tuple(facts["interval"]),
                                    unavailable=facts["unavailable"])
    summary |= {"format": FORMAT, "format_version": FORMAT_VERSION, "images": spec.images, "curve_files": files,
                "image_count": len({r["image"] for r in rows}), "skipped": facts["skipped"],
                "settings": {"models": list(spec.models), "steps": list(dict.fromkeys(s.steps for s in spec.settings)),
                             "details": list(dict.fromkeys(s.detail for s in spec.settings)), "baselines": list(spec.baselines),
                             "metrics": list(spec.metrics), "points": spec.points, "bpp_range": spec.bpp_range, "seed": spec.seed,
                             "device": spec.device, "torch_seed": 0},
                "versions": versions(), "timings": {"seconds": round(seconds, 3),
                                                    **{f"metric {k}": round(v, 3) for k, v in facts["metric_seconds"].items()}}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "index.html").write_text(eval_report.render(summary, curves), encoding="utf-8")
    return summary


def _previous_files(out: Path) -> list[str]:
    try:
        listed = json.loads((out / "summary.json").read_text()).get("curve_files") or []
    except (OSError, ValueError):
        return []
    return [name for name in listed if isinstance(name, str) and re.fullmatch(r"curves/[A-Za-z0-9._-]+\.json", name)]


def versions() -> dict[str, str]:
    out = {"rdeic-archive": _version("rdeic-archive"), "bjontegaard": _version("bjontegaard"), **metric_versions()}
    out.update({f"codec {k}": v for k, v in bl.codec_versions().items()})
    return out


def check_spec(spec: EvalSpec) -> None:
    """Refuse, before any work, what would fail later: unknown formats, metrics or anchor, no models or settings."""
    from .metrics import METRIC_NAMES

    for fmt in spec.baselines:
        bl.check_format(fmt)
    unknown = [m for m in spec.metrics if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"--metrics: unknown {', '.join(map(repr, unknown))}; valid metrics are {', '.join(METRIC_NAMES)}")
    if not spec.models or not spec.settings:
        raise ValueError("rdeic eval needs at least one model and one decode setting")
    names = [s.name for s in spec.settings] + list(spec.baselines)
    if spec.anchor is not None and spec.anchor not in names:
        raise ValueError(f"--anchor: no curve named {spec.anchor!r}; the curves are {', '.join(map(repr, names))}")


def run(spec: EvalSpec) -> dict:
    """The whole ``rdeic eval``: read, measure, write; returns the summary."""
    t0 = time.perf_counter()
    check_spec(spec)
    out = check_out(spec.out)
    images = load_images(spec.images, spec.max_pixels)
    curves, rows, facts = evaluate(spec, images)
    return write(spec, out, curves, rows, facts, time.perf_counter() - t0)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _mean(values) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "curve"
