"""``rdeic eval``'s BD-rate table (:func:`summarize`) and its ``index.html`` (:func:`render`).

The page is built with rdeic/report_html.py, the same writer as the audit's report: one
self-contained file, no scripts, no network. RD plots show every curve against bpp for each metric
that has values (MS-SSIM also in dB, −10·log10(1 − MS-SSIM), as CompressAI's plots show it); the
baselines' target interval is shaded. BD-rate is computed per quality metric where higher is
better (``psnr-rgb``, ``psnr-rgb-pooled``, ``ms-ssim-rgb-db``) against the anchor curve.
"""

from __future__ import annotations

import math

from . import report_html as rh
from .bdrate import bd_rate, curve_notes

# (results key, label) of the plots and the points table, in order.
QUANTITIES = (
    ("psnr-rgb", "psnr-rgb (mean of images)"),
    ("psnr-rgb-pooled", "psnr-rgb-pooled (pooled MSE)"),
    ("ms-ssim-rgb", "ms-ssim-rgb"),
    ("ms-ssim-rgb-db", "ms-ssim-rgb in dB"),
    ("ssim-rgb", "ssim-rgb"),
    ("delta_e", "delta_e, mean colour error ΔE*ab (lower is better)"),
    ("lpips", "lpips (lower is better)"),
    ("dists", "dists (lower is better)"),
    ("niqe", "niqe (lower is better)"),
    ("fid", "fid on 256² patches (lower is better)"),
    ("kid", "kid on 256² patches (lower is better)"),
)
BD_METRICS = ("psnr-rgb", "psnr-rgb-pooled", "ms-ssim-rgb-db")
METRIC_OF = {"psnr-rgb": "psnr", "psnr-rgb-pooled": "psnr", "ms-ssim-rgb": "ms_ssim", "ms-ssim-rgb-db": "ms_ssim",
             "ssim-rgb": "ssim"}


def values(curve: dict, key: str) -> list:
    """The curve's list for ``key``; ``ms-ssim-rgb-db`` is derived from ``ms-ssim-rgb``."""
    results = curve["results"]
    missing = [None] * len(results.get("bpp", []))  # a metric not asked for
    if key == "ms-ssim-rgb-db":
        return [None if v is None or v >= 1 else -10 * math.log10(1 - v) for v in results.get("ms-ssim-rgb", missing)]
    return list(results.get(key, missing))


def summarize(curves: list[dict], anchor: str, interval: tuple[float, float], unavailable: dict) -> dict:
    """The BD-rate table of every curve against ``anchor`` (a curve name), the notes, the interval."""
    by_name = {c["name"]: c for c in curves}
    if anchor not in by_name:
        raise ValueError(f"--anchor: no curve named {anchor!r}; the curves are {', '.join(map(repr, by_name))}")
    base = by_name[anchor]
    table = []
    for curve in curves:
        if curve is base:
            continue
        for metric in BD_METRICS:
            result = bd_rate(base["results"]["bpp"], values(base, metric), curve["results"]["bpp"], values(curve, metric),
                             anchor_name=anchor, test_name=curve["name"])
            table.append({"curve": curve["name"], "metric": metric, "akima": result.akima, "pchip": result.pchip,
                          "overlap": result.overlap, "notes": result.notes})
    notes = [note for curve in curves for note in curve.get("notes", [])]
    notes += [note for curve in curves for note in curve_notes(curve["name"], curve["results"]["bpp"], values(curve, "psnr-rgb"))]
    return {"anchor": anchor, "interval": list(interval), "bd_rate": table, "notes": notes, "unavailable": dict(unavailable)}


def render(summary: dict, curves: list[dict]) -> str:
    with rh.figure_context():
        sections = [_header(summary), _notes(summary), _plots(summary, curves), _bd_table(summary),
                    _points(curves), _versions(summary)]
    return rh.page("RDEIC evaluation", sections)


def _header(summary: dict) -> str:
    interval = summary.get("interval") or [None, None]
    info = [("images", summary.get("images")), ("image count", summary.get("image_count")),
            ("anchor", summary.get("anchor")), ("baselines' bpp interval", f"{rh.fmt(interval[0])} – {rh.fmt(interval[1])}")]
    for name, value in (summary.get("settings") or {}).items():
        info.append((f"setting: {name}", ", ".join(map(str, value)) if isinstance(value, list) else value))
    return "<h1>RDEIC evaluation</h1>\n" + rh.table(None, info)


def _notes(summary: dict) -> str:
    items = [f"{name}: {why}" for name, why in (summary.get("unavailable") or {}).items()]
    skipped = (summary.get("skipped") or {}).items()
    items += [f"{name}: skipped on {s.get('images')} images ({s.get('reason')})" for name, s in skipped]
    items += list(summary.get("notes") or [])
    body = "<ul>" + "".join(f"<li>{rh.e(item)}</li>" for item in items) + "</ul>" if items else '<p class="muted">None.</p>'
    return f'<section id="notes"><h2>Notes</h2>{body}</section>'


def _plots(summary: dict, curves: list[dict]) -> str:
    out, plots = ['<section id="rd"><h2>Rate–distortion</h2>',
                  '<p class="muted">Shaded: the bpp interval the baselines were swept over. One point per model × '
                  "setting; a setting's points over several models form its curve.</p>"], []
    interval = summary.get("interval") or []
    unavailable = summary.get("unavailable") or {}
    for key, label in QUANTITIES:
        series = [(c["name"], [(b, v) for b, v in zip(c["results"].get("bpp", []), values(c, key))
                               if rh.is_number(b) and rh.is_number(v)]) for c in curves]
        series = [(name, sorted(points)) for name, points in series if points]
        if not series:
            if key in (c for curve in curves for c in curve["results"]) or key == "ms-ssim-rgb-db":
                why = unavailable.get(METRIC_OF.get(key, key)) or "no values"
                out.append(f'<p class="muted">{rh.e(label)}: {rh.e(why)}</p>')
            continue
        fig, ax = rh.figure(4.4, 3.0)
        if len(interval) == 2 and all(rh.is_number(v) for v in interval):
            ax.axvspan(interval[0], interval[1], color="0.92", zorder=0)
        for i, (name, points) in enumerate(series):
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="osD^v<>"[i % 7], markersize=4, color=f"C{i % 10}", label=name[:40])
        ax.set(xlabel="bpp", ylabel=label, title=f"bpp vs {label}")
        ax.legend(fontsize=6, loc="best")
        plots.append(rh.plot(fig, f"bpp against {label}"))
    return "\n".join(out) + rh.figs(plots) + "</section>"


def _bd_table(summary: dict) -> str:
    anchor = summary.get("anchor")
    rows, seen = [], set()
    entries = summary.get("bd_rate") or []
    for r in entries:
        same = [x for x in entries if x["curve"] == r["curve"]]
        if all(x["akima"] is None and x["pchip"] is None and x["notes"] == r["notes"] for x in same):
            if r["curve"] not in seen:  # nothing computable for any metric, for the same reasons: one row
                seen.add(r["curve"])
                rows.append([r["curve"], ", ".join(x["metric"] for x in same), "n/a", "n/a", "n/a", "; ".join(r["notes"])])
            continue
        rows.append([r["curve"], r["metric"], _percent(r["akima"]), _percent(r["pchip"]),
                     "n/a" if r["overlap"] is None else f"{100 * r['overlap']:.0f}%", "; ".join(r["notes"]) or ""])
    return (f'<section id="bd-rate"><h2>BD-rate against {rh.e(anchor)}</h2>'
            '<p class="muted">Percent bits saved (negative) or spent (positive) for the same quality, over the quality '
            "interval both curves cover (overlap: that interval over the union of their quality ranges); computed with "
            "the bjontegaard package, Akima and PCHIP interpolation, never extrapolated.</p>"
            + rh.table(("curve", "metric", "BD-rate (Akima)", "BD-rate (PCHIP)", "overlap", "notes"), rows) + "</section>")


def _percent(value) -> str:
    return "n/a" if value is None else f"{value:+.2f}%"


def _points(curves: list[dict]) -> str:
    keys = [(k, label) for k, label in QUANTITIES if any(any(rh.is_number(v) for v in values(c, k)) for c in curves)]
    header = ("curve", "point", "bpp", *(label for _, label in keys), "encode s / image", "decode s / image")
    body = []
    for curve in curves:
        columns = [values(curve, k) for k, _ in keys]
        for i, about in enumerate(curve.get("points") or []):
            label = about.get("label", i)
            if about.get("outside_interval"):
                label = f"{label} (outside the interval)"
            if about.get("patches") is not None:
                label = f"{label}; fid/kid over {about['patches']} patches of 256²"
            if about.get("warning"):
                label = f"{label} ({about['warning']})"
            body.append([curve["name"], label, _at(curve["results"].get("bpp"), i), *(_at(col, i) for col in columns),
                         _at(curve["results"].get("encoding_time"), i), _at(curve["results"].get("decoding_time"), i)])
    return '<section id="points"><h2>Points</h2>' + rh.table(header, body) + "</section>"


def _at(items, i):
    return items[i] if items and i < len(items) else None


def _versions(summary: dict) -> str:
    return ('<section id="versions"><h2>Versions and timings</h2>'
            + rh.table(("package", "version"), list((summary.get("versions") or {}).items()))
            + rh.table(("timing", "seconds"), list((summary.get("timings") or {}).items()))
            + "</section>")
