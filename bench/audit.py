"""The audit's two rates against the codec alone, measured in one run on this machine.

Setup (not timed): ``--images`` photo-like PNGs of ``--size`` in ``--shards`` WebDataset shards,
compressed by the compress worker with the model (default: the bundled demo model). Then, each
``--repeat`` times, on the same device and in one process (no Ray: the worker is what is timed):

* ``entropy decode only``: ``Codec.verify`` over every bitstream — the codec alone, the integrity
  scan's baseline;
* ``integrity scan``: ``PartAuditor`` on every part with a sample of 0 (reads the Parquet part and its
  marker, checks every row, entropy-decodes every bitstream, commits its unit);
* ``full decode``: ``Codec.decompress`` of every bitstream — the sampled audit's baseline;
* ``sampled audit``: ``PartAuditor`` with every row drawn: the scan, reading the originals back from
  the shards, decoding, the metrics (``--metrics``) and JPEG/WebP/AVIF at the matched rate;
* the same without baselines, to show what they cost.

Each audited row carries its decode, metric and baseline seconds; their shares of the audit's time
are printed. LPIPS/DISTS/FID/KID need backbone files (``$RDEIC_BACKBONES``); without them they are
unavailable and cost nothing, which the table says.

Run: ``python bench/audit.py [--images 48] [--size 192x256] [--repeat 3] [--model DIR] [--random-backbones]``;
prints Markdown.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(folder: Path, args) -> list[str]:
    import numpy as np

    from pipelines.compress import CompressSpec, ShardCompressor, ShardTask
    from rdeic.codec import Codec
    from tests.helpers import encode, random_image, write_shard

    h, w = args.size
    rng = np.random.default_rng(0)
    per = -(-args.images // args.shards)
    (folder / "in").mkdir(parents=True)
    for s in range(args.shards):
        samples = [{"__key__": f"s{s}_{i:05d}", "png": encode(random_image(rng, h, w))} for i in range(per)]
        write_shard(folder / "in" / f"shard-{s:04d}.tar", samples)
    codec = Codec.load(args.model, device=args.device, max_batch=args.batch)
    compressor = ShardCompressor(CompressSpec(str(folder / "archive"), args.model, batch_size=args.batch,
                                              settings={"model_id": str(codec.model_id)}), codec)
    parts = []
    for path in sorted((folder / "in").glob("*.tar")):
        parts.append(path.stem)
        compressor(ShardTask(str(path), path.stem))
    return parts


def write_random_backbones(folder: Path) -> None:
    import torch
    import torchvision

    from rdeic.metrics import BACKBONE_FILES

    folder.mkdir()
    for name in ("alexnet", "vgg16"):
        torch.save(getattr(torchvision.models, name)(weights=None).state_dict(), folder / BACKBONE_FILES[name])
    os.environ["RDEIC_BACKBONES"] = str(folder)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--size", type=lambda s: tuple(int(v) for v in s.split("x")), default=(192, 256), help="HxW")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--metrics", default="psnr,ssim,ms_ssim,lpips,dists,fid,kid")
    p.add_argument("--model", default=None)
    p.add_argument("--random-backbones", action="store_true",
                   help="LPIPS and DISTS with random AlexNet/VGG16 weights saved under the real file names "
                        "(the same cost as the real ones, which this machine does not have)")
    args = p.parse_args()
    import pyarrow.parquet as pq
    import torch

    from pipelines.archive import read_part
    from pipelines.audit import AuditSpec, PartAuditor
    from pipelines.compress import ShardTask
    from rdeic.cli import default_model
    from rdeic.codec import Codec

    args.model = args.model or default_model()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.random_backbones:
            write_random_backbones(folder / "backbones")
        parts = build(folder, args)
        codec = Codec.load(args.model, device=args.device, max_batch=args.batch)
        codec.warm_up()
        from pipelines import storage

        fs, root = storage.filesystem(str(folder / "archive"), storage.StorageOptions())
        streams = [r["bitstream"] for p in parts for r in read_part(fs, root, p, columns=["bitstream"]).to_pylist()]
        n = len(streams)
        settings = {"model_id": str(codec.model_id)}
        results: dict[str, list[float]] = {}
        shares: dict[str, list[float]] = {"decode": [], "metrics": [], "baselines": []}
        unavailable = {}
        for r in range(args.repeat):
            def audit(name: str, sample: int, baselines: tuple[str, ...]) -> float:
                spec = AuditSpec(archive=str(folder / "archive"), report=str(folder / f"report-{name}-{r}"), model=args.model,
                                 quotas={p: sample for p in parts}, metrics=tuple(args.metrics.split(",")),
                                 baselines=baselines, batch_size=args.batch, settings=settings)
                auditor = PartAuditor(spec, codec)
                unavailable.update(auditor.suite.unavailable)
                seconds = timed(lambda: [auditor(ShardTask(str(folder / "archive" / f"part-{p}.parquet"), p)) for p in parts])
                if sample:
                    rows = [row for p in parts for row in pq.read_table(
                        folder / f"report-{name}-{r}" / f"unit-{p}" / "samples.parquet").to_pylist()]
                    if baselines:
                        shares["decode"].append(sum(x["decode_seconds"] for x in rows) / seconds)
                        shares["metrics"].append(sum(x["metric_seconds"] for x in rows) / seconds)
                        shares["baselines"].append(sum(x["baseline_seconds"] for x in rows) / seconds)
                return seconds

            results.setdefault("entropy decode only (Codec.verify)", []).append(n / timed(lambda: codec.verify(streams)))
            results.setdefault("integrity scan (sample 0)", []).append(n / audit("scan", 0, ()))
            results.setdefault("full decode (Codec.decompress)", []).append(n / timed(lambda: codec.decompress(streams)))
            results.setdefault("sampled audit, baselines jpeg,webp,avif", []).append(n / audit("full", 10 ** 9, ("jpeg", "webp", "avif")))
            results.setdefault("sampled audit, no baselines", []).append(n / audit("nob", 10 ** 9, ()))
    h, w = args.size
    print(f"\n`bench/audit.py`: {n} images of {w}x{h} in {len(parts)} parts, model {Path(args.model).name}, "
          f"device {args.device}, batch {args.batch}, {args.repeat} repeats; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"metrics asked: {args.metrics}; unavailable here: {', '.join(f'{k} {v}' for k, v in sorted(unavailable.items())) or 'none'}\n")
    print("| what | rows or images / s (min–max) | median | ÷ codec alone (median) |")
    print("|---|---|---|---|")
    base = {"integrity scan (sample 0)": "entropy decode only (Codec.verify)",
            "sampled audit, baselines jpeg,webp,avif": "full decode (Codec.decompress)",
            "sampled audit, no baselines": "full decode (Codec.decompress)"}
    for name, values in results.items():
        med = statistics.median(values)
        ratio = f"{med / statistics.median(results[base[name]]):.2f}" if name in base else "1 (baseline)"
        print(f"| {name} | {min(values):.1f}–{max(values):.1f} | {med:.1f} | {ratio} |")
    print("\nShare of the sampled audit's time (with baselines), per repeat, min–max:\n")
    print("| part | share |")
    print("|---|---|")
    for name, values in shares.items():
        print(f"| {name} | {min(values):.0%}–{max(values):.0%} |")
    print("| the rest (reading parts and originals, integrity checks, crops, writing) | "
          f"{1 - max(sum(v) for v in zip(*shares.values())):.0%}–{1 - min(sum(v) for v in zip(*shares.values())):.0%} |")


if __name__ == "__main__":
    main()
