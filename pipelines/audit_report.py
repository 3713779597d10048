"""The audit's ``index.html``: one self-contained page for people to read (no scripts, no network).

The page, its figures (matplotlib PNGs as data URIs) and its tables are built with
rdeic/report_html.py, the one report writer (``rdeic eval`` uses it too). Every string taken from the summary, the rows, the
crops or the history is HTML-escaped: keys and paths are whatever the archive's sources called them.
"""

from __future__ import annotations

from rdeic import report_html
from rdeic.metrics import LOWER_IS_BETTER as METRICS_LOWER_IS_BETTER
from rdeic.metrics import PAIR_METRICS as PER_IMAGE_METRICS
from rdeic.report_html import e as _e
from rdeic.report_html import figs as _figs
from rdeic.report_html import figure as _figure
from rdeic.report_html import img as _img
from rdeic.report_html import is_number as _is_number
from rdeic.report_html import plot as _plot
from rdeic.report_html import table as _table

# The second bpp-vs-metric scatter shows the first of these that has values.
PERCEPTUAL_METRICS = ("lpips", "dists", "ms_ssim", "ssim")
LOWER_IS_BETTER = METRICS_LOWER_IS_BETTER | {"bpp"}
# (label, metric, statistic) rows of the headline table.
HEADLINE = (
    ("bpp", "bpp", "mean"),
    ("psnr (mean of images)", "psnr", "mean"),
    ("psnr (pooled MSE)", "psnr", "pooled"),
    ("ssim", "ssim", "mean"),
    ("ms_ssim", "ms_ssim", "mean"),
    ("delta_e (colour error)", "delta_e", "mean"),
    ("lpips", "lpips", "mean"),
    ("dists", "dists", "mean"),
    ("niqe", "niqe", "mean"),
    ("fid", "fid", "value"),
    ("kid", "kid", "value"),
)
FINDINGS = (
    ("changed", ("key", "part", "check", "expected", "actual")),
    ("missing", ("part", "path", "expected")),
    ("untracked", ("path", "reason")),
)
MAX_TABLE_ROWS = 50
# The page skeleton, CSP, style, escaping, tables and figure embedding are rdeic/report_html.py's.
_CSS = """
.crops{display:flex;gap:6px}
img.crop{max-width:360px;image-rendering:pixelated} .nocrop{padding:1em;color:#666}
"""


def render(summary: dict, rows: list[dict], crops: dict, history: list[dict]) -> str:
    """The whole page; see the audit data contract (issue 10) for the shapes of the arguments."""
    baselines = list(summary.get("baselines") or (summary.get("settings") or {}).get("baselines") or [])
    unavailable = summary.get("unavailable") or {}
    with report_html.figure_context():
        sections = [
            _header(summary),
            _gate(summary.get("gate") or {}),
            _integrity(summary.get("integrity") or {}),
            _sample(summary.get("sample") or {}, rows),
            _headline(summary, baselines, unavailable),
            _bpp_histogram(rows),
            _scatters(rows, baselines, unavailable),
            _distributions(rows, baselines, unavailable, summary.get("metrics") or {}),
            _worst(crops),
            _trend(summary, history),
            _versions(summary),
        ]
    return report_html.page(f"RDEIC audit {summary.get('run_id', '')}", sections, _CSS)


# --- sections ---------------------------------------------------------------------------------------


def _header(summary: dict) -> str:
    info = [("archive", summary.get("archive")), ("report", summary.get("report")),
            ("model", summary.get("model_id")), ("started", summary.get("started_at")),
            ("finished", summary.get("finished_at"))]
    for name, value in (summary.get("settings") or {}).items():
        info.append((f"setting: {name}", ", ".join(map(str, value)) if isinstance(value, list) else value))
    return f"<h1>RDEIC audit {_e(summary.get('run_id', 'n/a'))}</h1>\n" + _table(None, info)


def _gate(gate: dict) -> str:
    rules = gate.get("rules") or []
    cls, outcome = {True: ("pass", "passed"), False: ("fail", "FAILED")}.get(gate.get("passed"), ("muted", "not evaluated"))
    out = [f'<section id="gate"><h2>Gate: <span class="{cls}">{outcome}</span></h2>',
           _table(None, [("thresholds", gate.get("thresholds")), ("previous run", gate.get("previous_run"))])]
    failed = [r for r in rules if r.get("passed") is False]
    others = [r for r in rules if r.get("passed") is not False]
    if failed:
        out.append(f'<h3 class="fail">Failed rules ({len(failed)})</h3><ul class="fail">'
                   + "".join(f"<li>{_e(_rule_text(r))}</li>" for r in failed) + "</ul>")
    if others:
        out.append("<h3>Other rules</h3><ul>" + "".join(
            f'<li class="pass">passed: {_e(_rule_text(r))}</li>' if r.get("passed")
            else f'<li class="muted">not evaluated: {_e(_rule_text(r))}</li>' for r in others) + "</ul>")
    if not rules:
        out.append('<p class="muted">No rules (no --thresholds given).</p>')
    return "\n".join(out) + "</section>"


def _rule_text(rule: dict) -> str:
    return str(rule.get("message") or rule.get("rule") or "")


def _integrity(integrity: dict) -> str:
    counts = integrity.get("counts") or {}
    totals = [(name.replace("_", " "), integrity.get(name))
              for name in ("parts", "rows", "ok_rows", "error_rows", "rows_checked")]
    count_line, tables = [], []
    for name, columns in FINDINGS:
        items = integrity.get(name) or []
        total = counts.get(name) if _is_number(counts.get(name)) else len(items)
        count_line.append(f'<span class="{"fail" if total else "pass"}">{name}: {_e(total)}</span>')
        if items:
            shown = items[:MAX_TABLE_ROWS]
            tables.append(f"<h3>{name.capitalize()} ({len(shown)} of {_e(total)})</h3>")
            tables.append(_table(columns, [[item.get(c) for c in columns] for item in shown]))
            if total > len(shown):
                tables.append(f'<p class="muted">… and {_e(total - len(shown))} more in summary.json.</p>')
    return "\n".join(['<section id="integrity"><h2>Integrity</h2>', _table(None, totals),
                      "<p>" + " · ".join(count_line) + "</p>", *tables]) + "</section>"


def _sample(sample: dict, rows: list[dict]) -> str:
    info = [(name, sample.get(name)) for name in ("requested", "seed", "drawn", "strata")]
    out = ['<section id="sample"><h2>Sample</h2>', _table(None, info)]
    outcomes = sample.get("outcomes") or {}
    if outcomes:
        out.append(_table(("outcome", "images"), list(outcomes.items())))
    problems = [r for r in rows if r.get("outcome") != "ok"]
    if problems:
        shown = problems[:MAX_TABLE_ROWS]
        out.append(f"<h3>Images not audited ({len(shown)} of {len(problems)})</h3>")
        out.append(_table(("key", "outcome", "reason"), [[r.get("key"), r.get("outcome"), r.get("reason")] for r in shown]))
    return "\n".join(out) + "</section>"


def _headline(summary: dict, baselines: list[str], unavailable: dict) -> str:
    metrics = summary.get("metrics") or {}
    baseline_aggs = summary.get("baselines") or {}
    body = []
    for label, name, stat in HEADLINE:
        agg = metrics.get(name) or {}
        value = _cell(agg, stat, name, unavailable)
        row = [f"{label} {'↓' if name in LOWER_IS_BETTER else '↑'}", value]
        row += [_cell(agg, s, name, unavailable) if stat == "mean" and _is_number(value) else "" for s in ("median", "p05")]
        row += [_cell((baseline_aggs.get(b) or {}).get(name) or {}, stat, name, unavailable) for b in baselines]
        body.append(row)
    body.append(["images", (metrics.get("bpp") or {}).get("n"), "", ""] + [(baseline_aggs.get(b) or {}).get("n") for b in baselines])
    body.append(["at the format's lowest rate", "", "", ""] + [(baseline_aggs.get(b) or {}).get("at_floor") for b in baselines])
    out = ['<section id="headline"><h2>Headline figures</h2>',
           '<p class="muted">↑ higher is better, ↓ lower is better. RDEIC: mean (or pooled / value); '
           "baselines at matched rate: mean. \"at the format's lowest rate\": images where even that is above "
           "the RDEIC bpp.</p>",
           _table(("metric", "RDEIC", "median", "p05", *baselines), body)]
    for name, agg in metrics.items():
        agg = agg or {}
        if agg.get("skipped"):
            out.append(f'<p class="muted">{_e(name)}: {_e(agg["skipped"])} images skipped '
                       f'({_e(agg.get("skipped_reason") or "no reason given")})</p>')
        if agg.get("patches") is not None and name not in unavailable:
            out.append(f'<p class="muted">{_e(name)}: over {_e(agg["patches"])} patches of 256²</p>')
        if agg.get("warning"):
            out.append(f'<p class="fail">{_e(name)}: {_e(agg["warning"])}</p>')
    return "\n".join(out) + "</section>"


def _cell(agg: dict, stat: str, metric: str, unavailable: dict):
    """A number, or why there is none: an unavailable metric is never shown as a value."""
    value = agg.get(stat)
    if _is_number(value):
        return value
    return unavailable.get(metric) or agg.get("skipped_reason") or "n/a"


def _bpp_histogram(rows: list[dict]) -> str:
    values = _values(rows, "bpp")
    out = '<section id="bpp"><h2>Bits per pixel</h2>'
    if not values:
        return out + '<p class="muted">No bpp values.</p></section>'
    fig, ax = _figure()
    ax.hist(values, bins=20, color="C0")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="bpp", ylabel="images", title=f"RDEIC bpp over {len(values)} images")
    return out + _plot(fig, "histogram of bpp") + "</section>"


def _scatters(rows: list[dict], baselines: list[str], unavailable: dict) -> str:
    perceptual = next((m for m in PERCEPTUAL_METRICS if _values(rows, m)), None)
    out, plots = ['<section id="scatter"><h2>Rate and quality</h2>'], []
    if perceptual is None:
        out.append(f'<p class="muted">No perceptual metric has values ({", ".join(PERCEPTUAL_METRICS)}).</p>')
    for metric in ("psnr", perceptual) if perceptual else ("psnr",):
        series = [("RDEIC", _pairs(rows, "bpp", metric))] + [(b, _pairs(rows, f"{b}_bpp", f"{b}_{metric}")) for b in baselines]
        series = [(name, points) for name, points in series if points]
        if not series:
            why = unavailable.get(metric) or "no values"
            out.append(f'<p class="muted">{metric}: {_e(why)}</p>')
            continue
        fig, ax = _figure()
        for i, (name, points) in enumerate(series):
            xs, ys = zip(*points)
            ax.scatter(xs, ys, s=14, marker="osD^v<>"[i % 7], color=f"C{i}", alpha=0.75, label=name)
        ax.set(xlabel="bpp", ylabel=metric, title=f"bpp vs {metric}")
        ax.legend()
        plots.append(_plot(fig, f"bpp against {metric}"))
    return "\n".join(out) + _figs(plots) + "</section>"


def _distributions(rows: list[dict], baselines: list[str], unavailable: dict, metrics: dict) -> str:
    out, plots = ['<section id="distributions"><h2>Metric distributions</h2>'], []
    for metric in PER_IMAGE_METRICS:
        series = [("RDEIC", _values(rows, metric))] + [(b, _values(rows, f"{b}_{metric}")) for b in baselines]
        series = [(name, values) for name, values in series if values]
        if not series:
            why = unavailable.get(metric) or (metrics.get(metric) or {}).get("skipped_reason") or "no values"
            out.append(f'<p class="muted">{metric}: {_e(why)}</p>')
            continue
        fig, ax = _figure(3.2, 2.6)
        ax.boxplot([values for _, values in series], tick_labels=[name for name, _ in series])
        ax.set_title(f"{metric} {'(lower is better)' if metric in LOWER_IS_BETTER else '(higher is better)'}")
        plots.append(_plot(fig, f"distribution of {metric}"))
    return "\n".join(out) + _figs(plots) + "</section>"


def _worst(crops: dict) -> str:
    out = ['<section id="worst"><h2>Worst images</h2>']
    if not crops:
        out.append('<p class="muted">No crops.</p>')
    for key, crop in crops.items():
        name = crop.get("baseline_name")
        panels = [("original", crop.get("original")), ("RDEIC", crop.get("rdeic")),
                  (f"best baseline: {name}" if name else "no baseline", crop.get("baseline"))]
        figures = "".join(
            f"<figure>{_img(png, f'{label}: {key}', 'crop')}<figcaption>{_e(label)}</figcaption></figure>" if png
            else f'<figure><div class="nocrop">{_e(label)}</div></figure>' for label, png in panels)
        out.append(f"<h3>{_e(key)} <span class=\"muted\">{_e(crop.get('why') or '')}</span></h3>"
                   f'<div class="crops">{figures}</div>')
    return "\n".join(out) + "</section>"


def _trend(summary: dict, history: list[dict]) -> str:
    out = ['<section id="trend"><h2>Trend over runs</h2>']
    if len(history) < 2:
        return out[0] + '<p class="muted">No earlier runs under this report root.</p></section>'
    runs = [(run.get("run_id", "?"), run.get("figures") or {}) for run in history]
    names = dict.fromkeys([*(summary.get("figures") or {}), *(n for _, figures in runs for n in figures)])
    plots, too_few = [], []
    for name in names:
        points = [(i, figures[name]) for i, (_, figures) in enumerate(runs) if _is_number(figures.get(name))]
        if len(points) < 2:
            too_few.append(name)
            continue
        xs, ys = zip(*points)
        fig, ax = _figure(3.0, 1.9)
        ax.plot(xs, ys, marker="o", markersize=3)
        ax.set_title(str(name)[:60])
        ax.set_xticks([xs[0], xs[-1]], [str(runs[xs[0]][0])[:24], str(runs[xs[-1]][0])[:24]])
        plots.append(_plot(fig, f"trend of {name}"))
    out.append(f'<p class="muted">{len(runs)} runs, oldest first; this run is the last point: '
               + _e(", ".join(str(run_id) for run_id, _ in runs)) + "</p>")
    if too_few:
        out.append('<p class="muted">Fewer than two values, not plotted: ' + _e(", ".join(map(str, too_few))) + "</p>")
    return "\n".join(out) + _figs(plots) + "</section>"


def _versions(summary: dict) -> str:
    return ('<section id="versions"><h2>Versions and timings</h2>'
            + _table(("package", "version"), list((summary.get("versions") or {}).items()))
            + _table(("timing", "seconds"), list((summary.get("timings") or {}).items()))
            + "</section>")


# --- helpers ----------------------------------------------------------------------------------------


def _values(rows: list[dict], column: str) -> list[float]:
    return [r[column] for r in rows if _is_number(r.get(column))]


def _pairs(rows: list[dict], x: str, y: str) -> list[tuple[float, float]]:
    return [(r[x], r[y]) for r in rows if _is_number(r.get(x)) and _is_number(r.get(y))]
