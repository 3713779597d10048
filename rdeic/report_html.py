"""The one HTML report writer: self-contained pages (no scripts, no network) for the audit and ``rdeic eval``.

A page is a skeleton with a Content-Security-Policy that allows only inline styles and ``data:``
images, so a report opens offline and nothing in it can run. Figures are PNGs drawn with
matplotlib's object API (no pyplot: no global backend or figure registry is touched) inside
:func:`figure_context`, and embedded as data URIs. Every string is HTML-escaped by :func:`e`;
callers build sections from :func:`table`, :func:`plot`, :func:`img` and :func:`figs`.
"""

from __future__ import annotations

import base64
import html
import io
import math
import numbers

import matplotlib
from matplotlib.figure import Figure

DPI = 80
# Labels come from the input: a "$" must not switch matplotlib into mathtext (which can raise).
RC = {"text.parse_math": False, "font.size": 8, "axes.titlesize": 9, "legend.fontsize": 7}
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
CSS = """
body{font:14px/1.45 sans-serif;color:#222;max-width:1150px;margin:1.5em auto;padding:0 1em}
h2{border-bottom:1px solid #ddd;margin-top:1.6em}
table{border-collapse:collapse;margin:.4em 0}
th,td{border:1px solid #ccc;padding:2px 7px;text-align:left;vertical-align:top;overflow-wrap:anywhere}
th{background:#f3f3f3} td.n{text-align:right;font-variant-numeric:tabular-nums}
.fail{color:#b00020;font-weight:600} .pass{color:#1b6e2a} .muted{color:#666}
.figs{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
figure{margin:0} figcaption{font-size:12px;color:#444}
"""


def page(title: str, sections: list[str], css: str = "") -> str:
    """The whole document: the skeleton, the CSP, the shared style plus ``css``, then the sections (HTML)."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>{e(title)}</title><style>{CSS}{css}</style></head>\n<body>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


def figure_context():
    """The matplotlib settings every figure is drawn under (``with figure_context(): ...``)."""
    return matplotlib.rc_context(RC)


def e(value) -> str:
    return html.escape(str(value))


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return f"{value:.4g}"
    return str(value)


def table(header, body) -> str:
    """A table of escaped cells (numbers right-aligned, floats to 4 significant digits, None as n/a)."""
    head = "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>" if header else ""
    cells = ("".join(f'<td class="n">{e(fmt(v))}</td>' if is_number(v) else f"<td>{e(fmt(v))}</td>" for v in row)
             for row in body)
    return f"<table>{head}" + "".join(f"<tr>{c}</tr>" for c in cells) + "</table>"


def figure(width: float = 4.0, height: float = 2.8):
    """A new (figure, axes) pair, not registered anywhere."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    return fig, fig.add_subplot()


def plot(fig: Figure, alt: str) -> str:
    """The figure as an inline PNG ``<img class="plot">``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return img(buf.getvalue(), alt, "plot")


def img(png: bytes, alt: str, cls: str) -> str:
    return f'<img class="{cls}" alt="{e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def figs(images: list[str]) -> str:
    return f'<div class="figs">{"".join(images)}</div>' if images else ""
