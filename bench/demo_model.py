"""Quality of a model on held-out images against Pillow's JPEG and WebP at their nearest bpp.

For each image: RDEIC's bpp (whole bitstream, header included), PSNR and MS-SSIM; then
JPEG and WebP at the quality whose bpp is closest to RDEIC's (their lowest quality when
they cannot go that low, which is the usual case at these rates).

    python bench/demo_model.py --model rdeic/models/rdeic-tiny-demo --eval out/demo-data/eval [--save-dir out/demo-eval]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)

from rdeic.codec import Codec  # noqa: E402
from rdeic.metrics import ms_ssim, psnr  # noqa: E402


def load_images(folder: Path) -> dict[str, np.ndarray]:
    images = {}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".npy":
            images[path.stem] = np.load(path)
        elif path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
            images[path.stem] = np.asarray(Image.open(path).convert("RGB"))
    return images


def pillow_at_bpp(image: np.ndarray, fmt: str, target_bpp: float) -> tuple[int, float, np.ndarray]:
    """(quality, bpp, decoded) of the quality whose bpp is nearest to the target."""
    best = None
    h, w = image.shape[:2]
    for q in range(1, 101):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format=fmt, quality=q)
        bpp = len(buf.getvalue()) * 8 / (h * w)
        if best is None or abs(bpp - target_bpp) < abs(best[1] - target_bpp):
            best = (q, bpp, np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
        if bpp > target_bpp:
            break
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="rdeic/models/rdeic-tiny-demo")
    p.add_argument("--eval", default="out/demo-data/eval", help="folder of held-out images (.png/.jpg or .npy)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--save-dir", help="write the decoded images here")
    args = p.parse_args()
    codec = Codec.load(args.model)
    images = load_images(Path(args.eval))
    rows = []
    for name, image in images.items():
        t0 = time.perf_counter()
        data = codec.compress([image])[0]
        t1 = time.perf_counter()
        decoded = codec.decompress([data], steps=args.steps)[0]
        t2 = time.perf_counter()
        h, w = image.shape[:2]
        bpp = len(data) * 8 / (h * w)
        row = {"image": f"{name} {w}x{h}", "bpp": bpp, "psnr": psnr(image, decoded), "msssim": ms_ssim(image, decoded),
               "enc": t1 - t0, "dec": t2 - t1}
        for fmt in ("JPEG", "WEBP"):
            q, fbpp, fdec = pillow_at_bpp(image, fmt, bpp)
            row[fmt] = (q, fbpp, psnr(image, fdec), ms_ssim(image, fdec))
        rows.append(row)
        if args.save_dir:
            out = Path(args.save_dir)
            out.mkdir(parents=True, exist_ok=True)
            Image.fromarray(decoded).save(out / f"{name}.rdeic.png")
            Image.fromarray(image).save(out / f"{name}.original.png")
    print(f"# model {codec.model_id}, CPU, deterministic (1 thread), L = {args.steps or codec.config.diffusion.default_steps}, "
          "bpp over the original pixels with the whole bitstream; JPEG/WebP: Pillow at the quality nearest that bpp")
    head = (f"{'image':22} {'RDEIC bpp':>9} {'PSNR':>6} {'MS-SSIM':>7} | {'JPEG q':>6} {'bpp':>6} {'PSNR':>6} {'MS-SSIM':>7} | "
            f"{'WebP q':>6} {'bpp':>6} {'PSNR':>6} {'MS-SSIM':>7} | {'enc s':>5} {'dec s':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        j, wp = r["JPEG"], r["WEBP"]
        print(f"{r['image']:22} {r['bpp']:9.4f} {r['psnr']:6.2f} {r['msssim']:7.4f} | {j[0]:6d} {j[1]:6.3f} {j[2]:6.2f} {j[3]:7.4f} | "
              f"{wp[0]:6d} {wp[1]:6.3f} {wp[2]:6.2f} {wp[3]:7.4f} | {r['enc']:5.2f} {r['dec']:5.2f}")
    mean = lambda k: float(np.mean([r[k] for r in rows]))  # noqa: E731
    print(f"{'mean':22} {mean('bpp'):9.4f} {mean('psnr'):6.2f} {mean('msssim'):7.4f} | "
          f"{'':6} {np.mean([r['JPEG'][1] for r in rows]):6.3f} {np.mean([r['JPEG'][2] for r in rows]):6.2f} "
          f"{np.mean([r['JPEG'][3] for r in rows]):7.4f} | {'':6} {np.mean([r['WEBP'][1] for r in rows]):6.3f} "
          f"{np.mean([r['WEBP'][2] for r in rows]):6.2f} {np.mean([r['WEBP'][3] for r in rows]):7.4f} |")


if __name__ == "__main__":
    main()
