"""The audit's HTML page (pipelines/audit_report.py), rendered by a real browser: headless Chromium."""

from __future__ import annotations

import html
import os
import re
import shutil

import numpy as np
import pytest

from pipelines import audit_report
from tests.helpers import encode, random_image

SCRIPT = "<script>alert(1)</script>"
ATTRIBUTE = '"><img src=x onerror="document.title=\'pwned\'">'
BASELINES = ("jpeg", "webp")


@pytest.fixture
def browser():
    """Debian's headless Chromium through its own chromedriver (Selenium Manager never runs: no downloads)."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        reason = "needs Debian's chromium and chromium-driver on PATH (apt-get install chromium chromium-driver)"
        if os.environ.get("RDEIC_REQUIRE_BROWSER") == "1":
            pytest.fail(f"RDEIC_REQUIRE_BROWSER=1 but the browser test {reason}")
        pytest.skip(f"browser test {reason}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    yield driver
    driver.quit()


def _row(rng, key, outcome="ok", reason=None):
    ok = outcome == "ok"
    row = {"key": key, "part": "00001", "source_shard": "shard-000000.tar", "source_index": 0, "width": 96,
           "height": 64, "outcome": outcome, "reason": reason, "bpp": float(rng.uniform(0.02, 0.1)),
           "num_bytes": 50, "mse": float(rng.uniform(20, 80)) if ok else None,
           "decode_seconds": 0.1, "metric_seconds": 0.05, "baseline_seconds": 0.2}
    values = {"psnr": rng.uniform(20, 30), "ssim": rng.uniform(0.5, 0.9), "ms_ssim": rng.uniform(0.7, 0.95),
              "dists": rng.uniform(0.1, 0.3)}
    for metric in audit_report.PER_IMAGE_METRICS:  # lpips and niqe: unavailable, so None everywhere
        row[metric] = float(values[metric]) if ok and metric in values else None
    for b in BASELINES:
        row |= {f"{b}_quality": 5 if ok else None, f"{b}_bpp": float(rng.uniform(0.08, 0.2)) if ok else None,
                f"{b}_at_floor": (b == "jpeg") if ok else None, f"{b}_mse": None, f"{b}_lpips": None}
        for metric in ("psnr", "ssim", "ms_ssim", "dists"):
            row[f"{b}_{metric}"] = float(values[metric] * 0.9) if ok else None
    return row


def _agg(mean):
    return {"mean": mean, "median": mean, "p05": mean * 0.9, "min": mean * 0.8, "max": mean * 1.1, "n": 6}


def _inputs():
    """Per the audit data contract: six ok rows, two problem rows, hostile keys and paths, a failed rule."""
    rng = np.random.default_rng(0)
    rows = [_row(rng, f"img{i:03d}") for i in range(6)]
    rows += [_row(rng, SCRIPT, "source_missing", "the source shard is gone"),
             _row(rng, "k2", "decode_failed", ATTRIBUTE)]
    unavailable = {"lpips": "unavailable (missing alexnet-owt-7be5be79.pth)", "niqe": "unavailable (no package)"}
    figures = {"integrity.changed": 60, "psnr.mean": 25.0, "lpips.mean": None, "bpp.mean": 0.06, "fid": 30.0}
    summary = {
        "format": "rdeic-audit-report", "format_version": 1, "run_id": "2026-11-29", "archive": "s3://b/archive",
        "report": "s3://b/reports/2026-11-29", "model_id": "rdeic-tiny-demo@abcd", "started_at": "2026-11-29T02:00:00Z",
        "finished_at": "2026-11-29T02:10:00Z",
        "settings": {"sample": 8, "seed": "0", "steps": 2, "detail": 1.0, "metrics": ["psnr", "lpips"],
                     "baselines": list(BASELINES)},
        "integrity": {
            "parts": 3, "rows": 100, "ok_rows": 98, "error_rows": 2, "rows_checked": 98,
            "counts": {"changed": 60, "missing": 1, "untracked": 1},
            "changed": [{"key": SCRIPT if i == 0 else f"c{i}", "part": "00001", "check": "crc",
                         "expected": "0x1", "actual": "0x2"} for i in range(60)],
            "missing": [{"part": "00002", "path": ATTRIBUTE, "expected": "a part of 40 rows"}],
            "untracked": [{"path": SCRIPT + ".parquet", "reason": "a part file without a commit marker"}],
        },
        "sample": {"requested": 8, "seed": "0", "drawn": 8, "strata": 2,
                   "outcomes": {"ok": 6, "source_missing": 1, "decode_failed": 1}},
        "metrics": {"psnr": _agg(25.0) | {"pooled": 24.5}, "ssim": _agg(0.7),
                    "ms_ssim": _agg(0.8) | {"skipped": 1, "skipped_reason": "below 161 px"},
                    "lpips": {"mean": None, "n": 0}, "dists": _agg(0.2), "niqe": {"mean": None, "n": 0},
                    "bpp": _agg(0.06),
                    "fid": {"value": 30.0, "patches": 12, "warning": "12 patches < 2048 (the feature dimension): FID is biased"},
                    "kid": {"value": 0.01, "patches": 12}},
        "unavailable": unavailable,
        "baselines": {b: {"bpp": _agg(0.12), "psnr": _agg(22.5), "ssim": _agg(0.63), "at_floor": 6 if b == "jpeg" else 0,
                          "n": 6} for b in BASELINES},
        "figures": figures,
        "gate": {"passed": False, "thresholds": "thresholds.yaml", "previous_run": "2026-11-28",
                 "rules": [{"rule": "psnr.mean >= 20", "kind": "absolute", "figure": "psnr.mean", "value": 25.0,
                            "previous": None, "passed": True, "message": "psnr.mean = 25 >= 20"},
                           {"rule": "integrity.changed == 0", "kind": "absolute", "figure": "integrity.changed",
                            "value": 60, "previous": None, "passed": False, "message": "integrity.changed = 60, not == 0"}]},
        "versions": {"rdeic-archive": "0.1.0", "torch": "2.14.1"},
        "timings": {"seconds": 12.0, "decode_seconds": 3.0},
    }
    png = encode(random_image(rng, 64, 96))
    crops = {SCRIPT: {"original": png, "rdeic": png, "baseline": png, "baseline_name": "webp", "why": "dists 0.3"},
             "img001": {"original": png, "rdeic": png, "baseline": None, "baseline_name": None, "why": "dists 0.28"}}
    hostile_figure = "$\\frac{" + SCRIPT  # would raise in matplotlib's mathtext parser if parsed
    history = [
        {"run_id": "2026-11-27", "finished_at": "2026-11-27T02:10:00Z",
         "figures": {"integrity.changed": 0, "psnr.mean": 25.5, "lpips.mean": None, hostile_figure: 1.0}},
        {"run_id": "2026-11-28", "finished_at": "2026-11-28T02:10:00Z",
         "figures": {"integrity.changed": 0, "psnr.mean": 25.2, "lpips.mean": None, "fid": 29.0, hostile_figure: 2.0}},
        {"run_id": "2026-11-29", "finished_at": "2026-11-29T02:10:00Z", "figures": figures},
    ]
    return summary, rows, crops, history


# One bpp histogram; bpp against psnr and against dists (lpips is unavailable); box plots of psnr, ssim,
# ms_ssim and dists; trends of integrity.changed, psnr.mean, fid and the hostile figure (lpips.mean has no
# numbers, bpp.mean only one).
EXPECTED_PLOTS = 1 + 2 + 4 + 4
EXPECTED_CROPS = 3 + 2  # the second crop has no baseline


def test_page_escapes_input_and_keeps_no_network_references():
    page = audit_report.render(*_inputs())
    assert "<script" not in page.lower() and "<img src=x" not in page
    assert html.escape(SCRIPT) in page and html.escape(ATTRIBUTE) in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "(50 of 60)" in page and "and 10 more" in page
    assert page.count("unavailable (missing alexnet-owt-7be5be79.pth)") >= 3  # never a 0 in its place
    assert page.count('class="plot"') == EXPECTED_PLOTS and page.count('class="crop"') == EXPECTED_CROPS


def test_page_renders_in_headless_chromium(browser, tmp_path):
    path = tmp_path / "index.html"
    path.write_text(audit_report.render(*_inputs()), encoding="utf-8")
    browser.get(path.as_uri())

    images = browser.execute_script(
        "return [...document.images].map(i => [i.className, i.complete, i.naturalWidth, i.src.slice(0, 22)])")
    assert [i for i in images if not (i[1] and i[2] > 0)] == []
    assert {src for *_, src in images} == {"data:image/png;base64,"}
    assert sum(cls == "plot" for cls, *_ in images) == EXPECTED_PLOTS
    assert sum(cls == "crop" for cls, *_ in images) == EXPECTED_CROPS
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []

    assert browser.execute_script("return document.querySelectorAll('script').length") == 0
    assert browser.title == "RDEIC audit 2026-11-29"  # the onerror handler in ATTRIBUTE would have changed it
    text = browser.execute_script("return document.body.innerText")
    assert SCRIPT in text and ATTRIBUTE in text

    failed_first = browser.execute_script("""
        const rule = document.querySelector('#gate ul.fail li');
        const integrity = document.getElementById('integrity');
        return rule !== null && rule.textContent.includes('integrity.changed = 60')
            && Boolean(rule.compareDocumentPosition(integrity) & Node.DOCUMENT_POSITION_FOLLOWING);""")
    assert failed_first


def test_empty_inputs_render_without_figures():
    assert "<img" not in audit_report.render({}, [], {}, [])

    metrics = {m: {"mean": None, "n": 0} for m in (*audit_report.PER_IMAGE_METRICS, "bpp")}
    unavailable = {m: f"unavailable (missing {m}.pth)" for m in audit_report.PER_IMAGE_METRICS}
    rows = [{"key": "a", "outcome": "source_changed", "reason": "sha256 differs", "bpp": None}]
    history = [{"run_id": "r1", "finished_at": "t", "figures": {"psnr.mean": None}}]
    page = audit_report.render({"run_id": "r1", "metrics": metrics, "unavailable": unavailable,
                                "gate": {"passed": None, "rules": []}}, rows, {}, history)
    assert "<img" not in page
    assert "No earlier runs" in page and "No bpp values" in page and "No crops" in page
    assert "unavailable (missing lpips.pth)" in page and "sha256 differs" in page
