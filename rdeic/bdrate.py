"""Bjøntegaard-delta rate between two rate–quality curves, with the package ``bjontegaard`` (FAU-LMS).

BD-rate is the average difference in log-rate between two curves over the quality interval both
cover, as a percentage: negative means the test curve needs fewer bits than the anchor for the
same quality. :func:`bd_rate` gives it with Akima interpolation (recommended by the package's
authors) and PCHIP (the JVET common-test-conditions sheet's), never extrapolated: the integral
runs over the overlap only, and ``overlap`` (its length over the union of the two quality
ranges, as the package defines it) says how much of the curves that is.

What makes a number doubtful is a note, never an exception: a curve with fewer than 4 points,
a curve whose quality is not monotonic in rate (its dominated points, those with more rate and no
more quality than another point, are left out of the integral and counted in the note), curves
that do not overlap (no number), or non-finite values (left out).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

METHODS = ("akima", "pchip")
MIN_POINTS = 4  # what BD-rate is defined on in VCEG-M33 and the CTC sheets


@dataclass
class BDRate:
    """BD-rate of ``test`` against ``anchor`` in percent (None where it cannot be computed), the overlap, notes."""

    akima: float | None
    pchip: float | None
    overlap: float | None
    notes: list[str] = field(default_factory=list)


def curve_notes(name: str, rates, qualities) -> list[str]:
    """What is doubtful about one curve for BD-rate: too few points, non-finite values, not monotonic."""
    points = _finite(rates, qualities)
    notes = []
    dropped = len(list(rates)) - len(points)
    if dropped:
        notes.append(f"{name}: {dropped} point(s) with a non-finite or non-positive value left out")
    if len(points) < MIN_POINTS:
        notes.append(f"{name}: {len(points)} point{'s' if len(points) != 1 else ''} (BD-rate wants at least {MIN_POINTS})")
    dominated = len(points) - len(_efficient(points))
    if dominated:
        notes.append(f"{name}: quality is not monotonic in rate ({dominated} dominated point(s) left out of BD-rate)")
    return notes


def bd_rate(anchor_rates, anchor_qualities, test_rates, test_qualities,
            anchor_name: str = "anchor", test_name: str = "test") -> BDRate:
    """BD-rate (percent) of the test curve against the anchor, Akima and PCHIP; see the module's docstring."""
    notes = curve_notes(anchor_name, anchor_rates, anchor_qualities) + curve_notes(test_name, test_rates, test_qualities)
    anchor = _efficient(_finite(anchor_rates, anchor_qualities))
    test = _efficient(_finite(test_rates, test_qualities))
    if len(anchor) < 2 or len(test) < 2:
        notes.append("BD-rate needs at least 2 usable points on each curve")
        return BDRate(None, None, None, notes)
    overlap = _overlap([q for _, q in anchor], [q for _, q in test])
    if overlap == 0:
        notes.append("the curves do not overlap in quality: no BD-rate")
        return BDRate(None, None, 0.0, notes)
    values = {method: _bd(anchor, test, method) for method in METHODS}
    return BDRate(values["akima"], values["pchip"], overlap, notes)


def _bd(anchor: list[tuple[float, float]], test: list[tuple[float, float]], method: str) -> float | None:
    import bjontegaard

    (ra, qa), (rt, qt) = zip(*anchor), zip(*test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small overlap is reported as a number beside the value
        value = bjontegaard.bd_rate(np.array(ra), np.array(qa), np.array(rt), np.array(qt), method=method,
                                    require_matching_points=False, min_overlap=0)
    return float(value) if math.isfinite(value) else None


def _finite(rates, qualities) -> list[tuple[float, float]]:
    rates, qualities = list(rates), list(qualities)
    if len(rates) != len(qualities):
        raise ValueError(f"a curve needs as many rates as qualities, got {len(rates)} and {len(qualities)}")
    return sorted((float(r), float(q)) for r, q in zip(rates, qualities)
                  if r is not None and q is not None and math.isfinite(r) and math.isfinite(q) and r > 0)


def _efficient(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points (sorted by rate) whose quality is above that of every point of lower or equal rate."""
    out: list[tuple[float, float]] = []
    for rate, quality in points:
        if out and rate == out[-1][0] and quality > out[-1][1]:
            out[-1] = (rate, quality)  # same rate, better quality: the other one is dominated
        elif not out or quality > out[-1][1]:
            out.append((rate, quality))
    return out


def _overlap(a: list[float], b: list[float]) -> float:
    union = max(max(a), max(b)) - min(min(a), min(b))
    common = min(max(a), max(b)) - max(min(a), min(b))
    return max(common, 0.0) / union if union > 0 else 0.0
