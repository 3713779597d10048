"""`rdeic eval` (rdeic/evaluate.py, rdeic/eval_report.py): RD points and curves, BD-rate, the report."""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from rdeic import eval_report
from rdeic.cli import default_model, main
from rdeic.evaluate import Measure
from rdeic.metrics import MetricSuite, psnr_from_mse
from tests.helpers import random_image
from tests.pipelines.test_audit_report import browser  # noqa: F401 (the headless Chromium fixture)

SCRIPT = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    """One run of the CLI on the bundled demo model, two 64×64 PNGs, JPEG and WebP (shared by the tests below)."""
    root = tmp_path_factory.mktemp("eval")
    images = root / "kodak-style"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("kodim01", "kodim02"):
        Image.fromarray(random_image(rng, 64, 64)).save(images / f"{name}.png")
    (images / "README.txt").write_text("not an image: ignored")
    out = root / "out"
    backbones = root / "no-backbones"
    backbones.mkdir()
    argv = ["eval", "--images", str(images), "--model", default_model(), "--steps", "1,2", "--detail", "1,0.5",
            "--baselines", "jpeg,webp", "--points", "4", "--metrics", "psnr,ssim,ms_ssim,fid",
            "--backbones", str(backbones), "--out", str(out)]
    with pytest.MonkeyPatch.context() as mp:  # no backbone anywhere: fid must say which file is missing
        mp.setenv("TORCH_HOME", str(backbones))
        mp.delenv("RDEIC_BACKBONES", raising=False)
        assert main(argv) == 0
    return out


def test_cli_writes_compressai_curves_parquet_rows_and_a_summary(evaluation):
    curves = {json.loads(p.read_text())["name"]: json.loads(p.read_text()) for p in (evaluation / "curves").glob("*.json")}
    assert set(curves) == {"rdeic steps=1 detail=1", "rdeic steps=1 detail=0.5", "rdeic steps=2 detail=1",
                           "rdeic steps=2 detail=0.5", "jpeg", "webp"}
    for curve in curves.values():
        results = curve["results"]
        assert {"bpp", "psnr-rgb", "psnr-rgb-pooled", "ms-ssim-rgb", "ssim-rgb", "encoding_time", "decoding_time"} <= set(results)
        assert len({len(v) for v in results.values()}) == 1 and curve["description"]
    assert len(curves["rdeic steps=2 detail=1"]["results"]["bpp"]) == 1  # one model: one point per setting
    jpeg = curves["jpeg"]["results"]
    assert len(jpeg["bpp"]) >= 4 and jpeg["bpp"] == sorted(jpeg["bpp"])
    assert all(v is None for v in jpeg["ms-ssim-rgb"])  # 64 px images: MS-SSIM is skipped, never faked

    summary = json.loads((evaluation / "summary.json").read_text())
    assert summary["anchor"] == "jpeg"
    assert summary["unavailable"]["fid"] == "unavailable (missing weights-inception-2015-12-05-6726825d.pth)"
    assert {"torch", "pillow", "bjontegaard", "rdeic-archive"} <= set(summary["versions"])
    rows = {(r["curve"], r["metric"]) for r in summary["bd_rate"]}
    assert ("webp", "psnr-rgb") in rows and ("jpeg", "psnr-rgb") not in rows

    table = pq.read_table(evaluation / "images.parquet").to_pylist()
    rdeic = [r for r in table if r["curve"] == "rdeic steps=2 detail=0.5"]
    assert sorted(r["image"] for r in rdeic) == ["kodim01.png", "kodim02.png"]
    assert all(r["width"] == 64 and r["bpp"] > 0 and r["psnr"] > 0 and r["model_id"] for r in rdeic)
    assert len([r for r in table if r["curve"] == "jpeg"]) == 2 * len(jpeg["bpp"])


def test_a_rerun_gives_the_same_curve_and_a_foreign_folder_is_refused(evaluation, tmp_path, capsys):
    first = json.loads((evaluation / "curves" / "webp.json").read_text())["results"]
    low, high = json.loads((evaluation / "summary.json").read_text())["interval"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("someone else's")
    images = evaluation.parent / "kodak-style"
    assert main(["eval", "--images", str(images), "--out", str(foreign), "--baselines", "webp", "--points", "4"]) == 2
    assert "not empty" in capsys.readouterr().err and (foreign / "keep.txt").exists()
    assert main(["eval", "--images", str(images), "--out", str(tmp_path / "x"), "--anchor", "png"]) == 2
    assert "--anchor: no curve named 'png'" in capsys.readouterr().err
    again = tmp_path / "again"
    assert main(["eval", "--images", str(images), "--model", default_model(), "--steps", "1", "--baselines", "webp",
                 "--points", "4", "--metrics", "psnr", "--bpp-range", f"{low!r},{high!r}", "--out", str(again)]) == 0
    second = json.loads((again / "curves" / "webp.json").read_text())["results"]
    assert (second["bpp"], second["psnr-rgb"]) == (first["bpp"], first["psnr-rgb"])
    if min(second["bpp"]) > low:  # out of the format's reach: said so
        notes = json.loads((again / "curves" / "webp.json").read_text())["notes"]
        assert [n for n in notes if n.startswith("webp: its lowest quality (0) gives")]
    assert main(["eval", "--images", str(images), "--model", default_model(), "--steps", "1", "--baselines", "webp",
                 "--points", "4", "--metrics", "psnr", "--bpp-range", "0.6,2", "--out", str(again)]) == 0  # ours: reused
    assert sorted(p.name for p in (again / "curves").iterdir()) == ["rdeic_steps_1_detail_1.json", "webp.json"]
    assert main(["eval", "--images", str(images), "--model", default_model(), "--steps", "2", "--baselines", "webp",
                 "--points", "4", "--metrics", "psnr", "--bpp-range", "0.6,2", "--out", str(again)]) == 0  # ours: reused
    assert sorted(p.name for p in (again / "curves").iterdir()) == ["rdeic_steps_2_detail_1.json", "webp.json"]
    third = json.loads((again / "curves" / "webp.json").read_text())
    assert min(third["results"]["bpp"]) <= 0.6 and max(third["results"]["bpp"]) >= 2 and third["notes"] == []


def test_report_renders_in_headless_chromium_with_every_figure_loaded(evaluation, browser):  # noqa: F811
    browser.get((evaluation / "index.html").as_uri())
    images = browser.execute_script("return [...document.images].map(i => [i.complete, i.naturalWidth, i.alt])")
    assert len(images) >= 3 and [i for i in images if not (i[0] and i[1] > 0)] == []
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    text = browser.execute_script("return document.body.innerText")
    assert "BD-rate against jpeg" in text and "unavailable (missing weights-inception" in text
    assert "psnr-rgb (mean of images)" in text and "psnr-rgb-pooled (pooled MSE)" in text


def test_report_escapes_names_and_shows_non_monotonic_and_short_curves():
    curves = [
        _curve("jpeg", [0.2, 0.4, 0.8, 1.6], [25, 28, 31, 34]),
        _curve(SCRIPT, [0.2, 0.4, 0.8, 1.6], [26, 30, 29, 35]),  # not monotonic
        _curve("rdeic steps=2 detail=1", [0.3], [27]),
    ]
    page = eval_report.render(eval_report.summarize(curves, anchor="jpeg", interval=(0.2, 1.6), unavailable={}), curves)
    assert "<script" not in page.lower() and html.escape(SCRIPT) in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "not monotonic" in page and "1 point (BD-rate wants at least 4)" in page
    assert page.count('class="plot"') >= 2  # PSNR and MS-SSIM in dB at least


def _curve(name, bpp, psnr):
    ms = [1 - 10 ** (-p / 20) for p in psnr]
    n = len(bpp)
    return {"name": name, "description": name, "kind": "baseline",
            "results": {"bpp": bpp, "psnr-rgb": psnr, "psnr-rgb-pooled": psnr, "ms-ssim-rgb": ms, "ssim-rgb": ms,
                        "encoding_time": [0.1] * n, "decoding_time": [0.1] * n},
            "points": [{"label": str(i), "notes": []} for i in range(n)], "notes": []}


class _Features(torch.nn.Module):
    """A stand-in for Inception: uint8 (B, 3, 256, 256) → 8 features per patch (random but fixed)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 16, stride=16)

    def forward(self, x):
        return self.conv(x.float() / 255).mean((2, 3))


def test_fid_and_kid_of_a_point_are_over_256_patches_with_the_count():
    rng = np.random.default_rng(1)
    images = {"a.png": random_image(rng, 384, 384), "b.png": random_image(rng, 300, 300)}
    suite = MetricSuite(["psnr", "fid", "kid"], modules={"inception": _Features()})
    measure = Measure(images, suite)
    rows: list[dict] = []
    decoded = [np.clip(im.astype(int) + 8, 0, 255).astype(np.uint8) for im in images.values()]
    info = {"curve": "x", "per_image": [{"num_bytes": 100, "encode_seconds": 0.0, "decode_seconds": 0.0}] * 2}
    point = measure.point(decoded, info, rows)
    assert point["patches"] == 2 + 1  # 384²: one patch plus one shifted by 128; 300²: one (no room for the shift)
    assert point["fid"] > 0 and point["kid"] is not None and "FID is biased" in point["warning"]
    assert [r["image"] for r in rows] == ["a.png", "b.png"] and rows[0]["bpp"] == pytest.approx(800 / 384**2)
    pixels = [384 * 384, 300 * 300]
    pooled = sum(r["mse"] * p for r, p in zip(rows, pixels)) / sum(pixels)
    assert point["psnr-pooled"] == pytest.approx(psnr_from_mse(pooled))
    assert point["psnr"] == pytest.approx(np.mean([r["psnr"] for r in rows]))


def test_images_come_from_any_fsspec_url_recursively_and_sorted():
    import fsspec

    from rdeic.evaluate import load_images
    from tests.helpers import encode

    fs = fsspec.filesystem("memory")
    rng = np.random.default_rng(2)
    fs.pipe({"/evalset/b/two.png": encode(random_image(rng, 20, 30)), "/evalset/one.jpg": encode(random_image(rng, 10, 12), "JPEG"),
             "/evalset/notes.txt": b"ignored"})
    try:
        images = load_images("memory://evalset")
        assert list(images) == ["b/two.png", "one.jpg"] and images["b/two.png"].shape == (20, 30, 3)
    finally:
        fs.rm("/evalset", recursive=True)


def test_an_image_over_the_pixel_limit_is_a_one_line_error_before_any_model_runs(tmp_path, capsys):
    """Eval's default limit (4096² padded: its metrics run on whole images) holds for --images; --max-pixels raises it."""
    from rdeic.evaluate import load_images

    (tmp_path / "in").mkdir()
    Image.new("RGB", (4200, 4100), (120, 30, 200)).save(tmp_path / "in" / "huge.png")
    with pytest.raises(ValueError, match="huge.png: image is 4200x4100: .* over the limit of 16777216"):
        load_images(str(tmp_path / "in"))
    assert load_images(str(tmp_path / "in"), max_pixels=4224 * 4160)["huge.png"].shape == (4100, 4200, 3)
    assert main(["eval", "--images", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--baselines", "jpeg"]) == 2
    err = capsys.readouterr().err
    assert "over the limit of 16777216" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_an_image_file_over_the_byte_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from rdeic import evaluate

    (tmp_path / "in").mkdir()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "b.ppm").write_bytes(b"P6\n64 64\n255\n" + bytes(64 * 64 * 3))
    monkeypatch.setattr(evaluate, "MAX_MEMBER_BYTES", 1000)
    with pytest.raises(ValueError, match=r"b.ppm: the file has 12301 bytes, over the limit of 1000"):
        evaluate.load_images(str(tmp_path / "in"))
