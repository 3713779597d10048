"""``rdeic-job audit`` end to end: integrity scan, sampled quality audit, report, gate, resume, lock.

One archive of the bundled-size test model is compressed once per module; each test audits its
own copy. Backbone weights are absent here, so LPIPS/DISTS/FID/KID must be reported unavailable.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from tests.helpers import encode, make_shards
from tests.jobs.test_ownership import _start_stalled, _wait_for
from tests.pipelines.test_audit_report import browser  # noqa: F401  (a fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir, ray_cluster):
    """Three shards of four images, compressed into an archive (local folders)."""
    base = tmp_path_factory.mktemp("audit-src")
    keys = make_shards(base / "in", 3, 4)
    assert main(["compress", "--input", str(base / "in" / "*.tar"), "--output", str(base / "archive"),
                 "--model", str(tiny_model_dir), "--actors", "1", "-q"]) == 0
    return base, keys


@pytest.fixture
def archive(built, tmp_path):
    """This test's copy of the archive and of its source shards (rows name the originals' folder)."""
    base, keys = built
    shutil.copytree(base / "archive", tmp_path / "archive")
    shutil.copytree(base / "in", tmp_path / "in")
    return tmp_path / "archive", keys


def _audit(archive, report, model, *extra) -> int:
    return main(["audit", "--archive", str(archive), "--report", str(report), "--model", str(model),
                 "--actors", "1", "-q", *extra])


def _report(report: Path, run_id: str) -> tuple[dict, list[dict]]:
    summary = json.loads((report / run_id / "summary.json").read_text())
    rows = pq.read_table(report / run_id / "rows.parquet").to_pylist()
    return summary, rows


def _rewrite_part(path: Path, change) -> None:
    table = pq.read_table(path)
    rows = table.to_pylist()
    change(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)


def test_integrity_scan_names_each_planted_fault_and_nothing_else(archive, s3, tiny_model_dir, tmp_path, capsys):
    local, keys = archive
    fs, bucket, _ = s3
    parts = sorted(p.name for p in local.glob("part-*.parquet"))
    assert parts == ["part-shard-000000.parquet", "part-shard-000001.parquet", "part-shard-000002.parquet"]
    corrupt_key = {}

    def flip_a_byte(rows):
        row = rows[1]
        data = bytearray(row["bitstream"])
        data[len(data) // 2] ^= 0x10
        row["bitstream"] = bytes(data)
        corrupt_key["key"] = row["key"]

    _rewrite_part(local / parts[0], flip_a_byte)
    data = (local / parts[1]).read_bytes()
    (local / parts[1]).write_bytes(data[: len(data) // 2])  # truncated
    shutil.copy(local / parts[2], local / "part-shard-000099.parquet")  # a part without a commit marker
    (local / parts[2]).unlink()  # a committed part, deleted
    fs.put(str(local), f"{bucket}/archive", recursive=True)

    rc = _audit(f"s3://{bucket}/archive", f"s3://{bucket}/reports", tiny_model_dir, "--run-id", "night-1",
                "--sample", "4", "--baselines", "none")
    err = capsys.readouterr().err
    assert rc == 3, err  # the default gate: nothing changed, nothing missing
    assert "integrity.changed" in err and "integrity.missing" in err
    summary = json.loads(fs.cat(f"{bucket}/reports/night-1/summary.json"))
    found = summary["integrity"]
    assert found["counts"] == {"changed": 2, "missing": 1, "untracked": 1}
    changed = sorted((c["part"], c["key"], c["check"]) for c in found["changed"])
    assert changed == [("shard-000000", corrupt_key["key"], "crc"), ("shard-000001", None, "readable")]
    assert [(m["part"], m["path"]) for m in found["missing"]] == [("shard-000002", "part-shard-000002.parquet")]
    assert [u["path"] for u in found["untracked"]] == ["part-shard-000099.parquet"]
    assert found["rows_checked"] == 4  # the ok rows of part 0, the corrupt one too; parts 1 and 2 cannot be read
    # the sample is drawn only from rows that passed: none of the corrupt, unreadable or missing ones
    rows = pq.read_table(io.BytesIO(fs.cat(f"{bucket}/reports/night-1/rows.parquet"))).to_pylist()
    assert rows and {r["part"] for r in rows} == {"shard-000000"} and corrupt_key["key"] not in {r["key"] for r in rows}


def test_quality_regression_fails_the_gate_and_a_clean_rerun_passes(built, tmp_path, capsys):
    """Rows rewritten from a worse encoder (the same model fed flattened images): sound bitstreams, worse images.

    The bundled demo model, not the untrained test model, whose decodings are equally far from anything."""
    import numpy as np

    from rdeic.cli import default_model
    from rdeic.codec import Codec
    from rdeic.images import open_image, to_rgb

    demo = default_model()
    local = tmp_path / "archive"
    assert main(["compress", "--input", str(built[0] / "in" / "*.tar"), "--output", str(local), "--model", demo,
                 "--actors", "1", "-q"]) == 0
    codec = Codec.load(demo)
    report = tmp_path / "reports"
    thresholds = tmp_path / "thresholds.yaml"
    thresholds.write_text("absolute:\n  - integrity.changed == 0\nrelative:\n  - psnr.mean: {worse_by_at_most: 0.5}\n")
    common = ["--sample", "12", "--baselines", "none", "--thresholds", str(thresholds)]
    assert _audit(local, report, demo, "--run-id", "day-1", *common) == 0
    clean = {p.name: p.read_bytes() for p in local.glob("part-*.parquet")}

    def worse_encoder(rows):
        for row in rows:
            shard = Path(row["source_shard"].removeprefix("file://"))
            with tarfile.open(shard) as tar:
                original = to_rgb(open_image(tar.extractfile(f"{row['key']}.png").read()))
            row["bitstream"] = codec.compress([np.full_like(original, int(original.mean()))])[0]
            row["num_bytes"] = len(row["bitstream"])
            row["bpp"] = row["num_bytes"] * 8 / (row["width"] * row["height"])

    for part in local.glob("part-*.parquet"):
        _rewrite_part(part, worse_encoder)
    capsys.readouterr()
    assert _audit(local, report, demo, "--run-id", "day-2", *common) == 3
    err = capsys.readouterr().err
    assert "psnr.mean" in err and "integrity" not in err.split("gate failed")[-1]
    day1, _ = _report(report, "day-1")
    day2, _ = _report(report, "day-2")
    assert day2["gate"]["passed"] is False and day2["gate"]["previous_run"] == "day-1"
    assert day2["figures"]["psnr.mean"] < day1["figures"]["psnr.mean"] - 0.5
    assert day2["figures"]["integrity.changed"] == 0  # the bitstreams are sound: only the quality regressed

    for name, data in clean.items():
        (local / name).write_bytes(data)
    assert _audit(local, report, demo, "--run-id", "day-3", *common) == 0
    day3, _ = _report(report, "day-3")
    assert day3["gate"]["passed"] is True and day3["figures"]["psnr.mean"] == pytest.approx(day1["figures"]["psnr.mean"])
    html = (report / "day-3" / "index.html").read_text()
    assert "day-1" in html and "day-2" in html  # the trend over earlier runs under the same report root


def test_a_changed_and_a_missing_original_are_named_outcomes(archive, tiny_model_dir, tmp_path):
    local, keys = archive
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "in", moved)
    (moved / "shard-000002.tar").unlink()  # a source that is gone
    with tarfile.open(moved / "shard-000001.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(moved / "shard-000001.tar", "w") as tar:
        for member, data in members:
            if member.name == "s01_0002.png":
                data = encode(__import__("numpy").zeros((64, 96, 3), "uint8"))  # the original was replaced
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    report = tmp_path / "reports"
    assert _audit(local, report, tiny_model_dir, "--run-id", "r", "--sample", "12", "--baselines", "none",
                  "--source-root", str(moved)) == 0
    summary, rows = _report(report, "r")
    outcome = {r["key"]: r["outcome"] for r in rows}
    assert len(rows) == 12
    assert outcome["s01_0002"] == "source_changed"
    assert {outcome[k] for k in keys if k.startswith("s02_")} == {"source_missing"}
    assert sum(o == "ok" for o in outcome.values()) == 7
    assert summary["sample"]["outcomes"] == {"ok": 7, "source_changed": 1, "source_missing": 4}
    reason = next(r["reason"] for r in rows if r["key"] == "s01_0002")
    assert "sha256" in reason


def test_report_contents_same_seed_same_sample_and_a_repeat_is_a_no_op(archive, tiny_model_dir, tmp_path, monkeypatch,
                                                                      browser):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-backbones"))
    monkeypatch.delenv("RDEIC_BACKBONES", raising=False)
    local, keys = archive
    report = tmp_path / "reports"
    assert _audit(local, report, tiny_model_dir, "--run-id", "a", "--sample", "5", "--seed", "7") == 0
    assert _audit(local, report, tiny_model_dir, "--run-id", "b", "--sample", "5", "--seed", "7", "--baselines", "webp") == 0
    assert _audit(local, report, tiny_model_dir, "--run-id", "c", "--sample", "5", "--seed", "8", "--baselines", "none") == 0
    a, rows_a = _report(report, "a")
    b, rows_b = _report(report, "b")
    c, rows_c = _report(report, "c")
    assert sorted(r["key"] for r in rows_a) == sorted(r["key"] for r in rows_b)  # same seed, same panel
    assert sorted(r["key"] for r in rows_a) != sorted(r["key"] for r in rows_c)
    assert len({r["part"] for r in rows_a}) == 3  # stratified: every part (source shard) is in a sample of 5
    row = rows_a[0]
    assert row["outcome"] == "ok" and row["psnr"] > 0 and 0 < row["ssim"] <= 1 and row["ms_ssim"] is None
    assert row["lpips"] is None and row["dists"] is None
    for fmt in ("jpeg", "webp", "avif"):
        assert row[f"{fmt}_bpp"] >= row["bpp"] or row[f"{fmt}_at_floor"]
        assert row[f"{fmt}_psnr"] > 0
    assert a["unavailable"]["lpips"] == "unavailable (missing alexnet-owt-7be5be79.pth)"
    assert "vgg16-397923af.pth" in a["unavailable"]["dists"] and "fid" in a["unavailable"]
    assert "161" in a["metrics"]["ms_ssim"]["skipped_reason"] and a["metrics"]["ms_ssim"]["skipped"] == 5
    assert a["metrics"]["psnr"]["n"] == 5 and a["metrics"]["psnr"]["pooled"] > 0
    assert len(a["results"]["psnr-rgb"]) == 5 and len(a["results"]["bpp"]) == 5
    assert set(a["baselines"]) == {"jpeg", "webp", "avif"} and set(b["baselines"]) == {"webp"}
    assert a["integrity"]["counts"] == {"changed": 0, "missing": 0, "untracked": 0} and a["integrity"]["rows_checked"] == 12
    assert a["versions"]["torchmetrics"] and a["gate"]["passed"] is True
    browser.get((report / "a" / "index.html").as_uri())  # the job's own page, in headless Chromium
    images = browser.execute_script("return [...document.images].map(i => [i.className, i.complete, i.naturalWidth])")
    assert images and all(done and width > 0 for _, done, width in images)
    assert sum(cls == "crop" for cls, *_ in images) == 5 * 3  # original | RDEIC | best baseline, for each image
    assert sum(cls == "plot" for cls, *_ in images) >= 3
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []

    markers = sorted((report / "a" / "_commits").iterdir())
    before = {p.name: p.read_bytes() for p in markers}
    assert _audit(local, report, tiny_model_dir, "--run-id", "a", "--sample", "5", "--seed", "7") == 0
    assert {p.name: p.read_bytes() for p in sorted((report / "a" / "_commits").iterdir())} == before  # nothing redone
    assert _report(report, "a")[1] == rows_a
    # the same run id with other settings would mix two audits in one report: refused
    assert _audit(local, report, tiny_model_dir, "--run-id", "a", "--sample", "6", "--seed", "7") == 2


def test_killed_mid_run_then_rerun_finishes_one_report_and_a_concurrent_audit_is_refused(archive, tiny_model_dir,
                                                                                        ray_cluster, tmp_path, capsys):
    local, keys = archive
    report = tmp_path / "reports"
    args = ["audit", "--archive", str(local), "--report", str(report), "--model", str(tiny_model_dir),
            "--run-id", "n1", "--sample", "6", "--baselines", "jpeg", "--actors", "1", "--lease-ttl", "4"]
    first = _start_stalled(args + ["--inject-crash", "shard-000001:0:stall"], ray_cluster)
    try:
        _wait_for(report / "n1" / "_commits" / "unit-shard-000000.stats.json", first)
        time.sleep(1.0)
        capsys.readouterr()
        rc = _audit(local, report, tiny_model_dir, "--run-id", "n2", "--sample", "6")
        assert rc == 75 and "in use by run" in capsys.readouterr().err  # one audit at a time per report root
        assert not (report / "n2").exists()
    finally:
        first.kill()
        first.wait()
    assert not (report / "n1" / "summary.json").exists()
    assert main(args + ["-q"]) == 0
    summary, rows = _report(report, "n1")
    assert len(rows) == 6 and len({r["key"] for r in rows}) == 6
    assert sorted(p.name for p in (report / "n1" / "_commits").iterdir()) == [
        "unit-shard-000000.stats.json", "unit-shard-000001.stats.json", "unit-shard-000002.stats.json"]
    assert summary["sample"]["drawn"] == 6 and summary["integrity"]["rows_checked"] == 12
    assert not any((report / "n1" / "_inprogress").iterdir())


def test_bad_arguments_and_a_foreign_report_root_are_refused_in_one_line(archive, tiny_model_dir, tmp_path, capsys):
    local, _ = archive
    bad = tmp_path / "bad.yaml"
    bad.write_text("absolute:\n  - psnr.mean >= twenty\n")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("a user's file")
    cases = [
        (["--thresholds", str(bad)], "threshold 'twenty' is not a number"),
        (["--run-id", "../escape"], "--run-id must be"),
        (["--metrics", "psnr,vmaf"], "--metrics: unknown vmaf"),
        (["--baselines", "jpeg2000"], "--baselines: unknown jpeg2000"),
        (["--sample", "-1"], "--sample must be at least 0"),
        (["--backbones", "s3://bucket/weights"], "--backbones must be a local folder"),
        (["--overwrite"], "--overwrite does not apply to an audit"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert _audit(local, tmp_path / "reports", tiny_model_dir, *extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert _audit(local, foreign, tiny_model_dir) == 2
    assert "not audit reports (notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]  # nothing written into someone else's folder


def test_what_the_audit_reads_back_is_checked_before_it_builds_a_path_or_a_report(archive, tiny_model_dir, tmp_path, capsys):
    """plan.json and the units' files come back from storage: a damaged or forged one is refused in one
    line, nothing is written outside the report, and a lock file that is not ours is never overwritten."""
    local, _ = archive
    report = tmp_path / "reports"
    common = ["--run-id", "r", "--sample", "2", "--baselines", "none"]
    assert _audit(local, report, tiny_model_dir, *common) == 0
    plan_file = report / "r" / "plan.json"
    plan = json.loads(plan_file.read_text())
    forged = {**plan, "parts": plan["parts"] + ["../../escape"]}
    plan_file.write_text(json.dumps(forged))
    capsys.readouterr()
    assert _audit(local, report, tiny_model_dir, *common) == 2
    assert "plan.json is not an audit plan" in capsys.readouterr().err
    assert not (tmp_path / "unit-..").exists() and not list(tmp_path.glob("**/escape*"))
    plan_file.write_text(json.dumps(plan))

    findings = report / "r" / "unit-shard-000001" / "findings.json"
    findings.write_text('{"rows": "many"}')
    assert _audit(local, report, tiny_model_dir, *common) == 2
    err = capsys.readouterr().err
    assert "unit-shard-000001 is damaged" in err and len(err.strip().splitlines()) == 1

    other = tmp_path / "other"
    other.mkdir()
    (other / "_lease.json").write_text("a user's notes, not a lease")
    assert _audit(local, other, tiny_model_dir, *common) == 2
    assert "_lease.json" in capsys.readouterr().err
    assert (other / "_lease.json").read_text() == "a user's notes, not a lease"
