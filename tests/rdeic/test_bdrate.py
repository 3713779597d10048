"""BD-rate (rdeic/bdrate.py): the bjontegaard package's Akima and PCHIP, with overlap and notes."""

from __future__ import annotations

import math

import pytest

from rdeic.bdrate import bd_rate, curve_notes

RATES = [0.1, 0.2, 0.4, 0.8, 1.6]
PSNR = [26.0, 28.5, 31.0, 33.2, 35.0]


def test_a_curve_against_itself_is_zero():
    result = bd_rate(RATES, PSNR, RATES, PSNR)
    assert result.akima == pytest.approx(0.0, abs=1e-9)
    assert result.pchip == pytest.approx(0.0, abs=1e-9)
    assert result.overlap == pytest.approx(1.0)
    assert result.notes == []


def test_ten_percent_more_rate_at_every_quality_is_plus_ten_percent():
    result = bd_rate(RATES, PSNR, [r * 1.1 for r in RATES], PSNR)
    assert result.akima == pytest.approx(10.0, abs=0.1)
    assert result.pchip == pytest.approx(10.0, abs=0.1)
    assert bd_rate([r * 1.1 for r in RATES], PSNR, RATES, PSNR).akima == pytest.approx(100 / 1.1 - 100, abs=0.1)


def test_a_non_monotonic_curve_is_reported_not_crashed_on():
    bumpy = [26.0, 29.0, 28.0, 33.2, 35.0]  # quality falls between the 2nd and 3rd points
    result = bd_rate(RATES, PSNR, RATES, bumpy, anchor_name="jpeg", test_name="bumpy")
    assert any("bumpy" in note and "not monotonic" in note for note in result.notes)
    assert result.akima is None or math.isfinite(result.akima)
    assert [n for n in curve_notes("bumpy", RATES, bumpy) if n.startswith("bumpy: quality is not monotonic in rate")]


def test_few_points_and_no_overlap_are_notes_not_numbers():
    few = bd_rate(RATES, PSNR, RATES[:3], PSNR[:3], test_name="short")
    assert any("short" in note and "3 points" in note for note in few.notes)
    apart = bd_rate(RATES, PSNR, RATES, [q + 20 for q in PSNR], test_name="far")
    assert apart.akima is None and apart.pchip is None and apart.overlap == 0
    assert any("do not overlap" in note for note in apart.notes)
    single = bd_rate(RATES, PSNR, [0.3], [30.0], test_name="one")
    assert single.akima is None and any("1 point" in note for note in single.notes)
