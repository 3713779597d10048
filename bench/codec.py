"""Codec speed on this machine: RDEIC's relay decode (L = 2, 5) vs a 50-step decode from noise.

Prints one table. Every row is measured in the same run; the baseline ("DiffEIC-style")
decodes the same compressed latent's guide hint but starts from pure noise at t = 999 and
runs 50 respaced DDPM steps over the full 1000-step schedule, one UNet pass per step.

    python bench/codec.py                   # tiny at 256² and 512², plus sd21 once at 512²
    python bench/codec.py --skip-sd21       # tiny only (about a minute)
    python bench/codec.py --sd21-model DIR  # sd21 rows from a converted model directory
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)

from rdeic.codec import Codec  # noqa: E402
from rdeic.config import DiffusionConfig  # noqa: E402
from rdeic.diffusion import RelaySchedule, sample  # noqa: E402
from rdeic.weights import init_model, load_model, save_model  # noqa: E402


def test_image(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    img = np.stack([128 + 90 * np.sin(xx / 17 + c) * np.cos(yy / 23 - c) for c in range(3)], -1)
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (allocations, oneDNN kernel selection)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


@torch.no_grad()
def baseline_decode(codec: Codec, data: bytes, steps: int = 50) -> np.ndarray:
    """Pure-noise start, 50 respaced steps of the full schedule, same noise estimator and VAE."""
    model = codec.model
    stream = codec.parse(data)
    from rdeic.compression import LatentCode

    lat = model.compression.decompress([LatentCode(stream.hyper_indices, stream.y, stream.header.y_shape, 0)])
    full = RelaySchedule(replace(model.config.diffusion, used_timesteps=model.config.diffusion.num_train_timesteps))
    g = torch.Generator().manual_seed(0)
    shape = tuple(lat.z_c.shape)
    x = torch.randn(shape, generator=g)
    noises = [torch.randn(shape, generator=g) for _ in range(steps - 1)]
    with codec._numerics():
        z0 = sample(lambda z, t: model.eps(z, t, lat.guide_hint, 1.0), x, full, steps, noises)
        img = model.decode_latent(z0)
    return img


def bench_rows(codec: Codec, preset: str, size: int, steps_list, details, repeats: int, baseline: bool):
    image = test_image(size)
    enc_s, streams = timed(lambda: codec.compress([image]), repeats)
    data = streams[0]
    bpp = len(data) * 8 / (size * size)
    base_s = timed(lambda: baseline_decode(codec, data), max(1, repeats // 2))[0] if baseline else None
    rows = []
    for steps in steps_list:
        for detail in details:
            dec_s, _ = timed(lambda: codec.decompress([data], steps=steps, detail=detail), repeats)
            rows.append(dict(preset=preset, size=f"{size}²", steps=steps, detail=detail, bpp=bpp, enc=enc_s, dec=dec_s,
                             passes=codec.model.unet_passes(steps, detail), base=base_s))
    return rows


def print_table(rows, conditions: str) -> None:
    print(conditions)
    head = f"{'preset':7} {'size':5} {'L':>2} {'λs':>4} {'bpp':>7} {'encode s':>9} {'decode s':>9} {'UNet passes':>11} {'50-step s':>10} {'speed-up':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        base = f"{r['base']:10.3f}" if r["base"] is not None else f"{'-':>10}"
        ratio = f"{r['base'] / r['dec']:7.1f}x" if r["base"] is not None else f"{'-':>8}"
        print(f"{r['preset']:7} {r['size']:5} {r['steps']:>2} {r['detail']:>4} {r['bpp']:7.4f} {r['enc']:9.3f} {r['dec']:9.3f} "
              f"{r['passes']:>11} {base} {ratio}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-sd21", action="store_true")
    p.add_argument("--sd21-model", help="converted sd21 model directory (default: random weights)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all; the codec's deterministic mode uses 1)")
    p.add_argument("--nondeterministic", action="store_true", help="let the codec use all threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    det = not args.nondeterministic
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        save_model(init_model("tiny"), Path(tmp) / "tiny")
        codec = Codec.load(Path(tmp) / "tiny", deterministic=det)
        for size in (256, 512):
            rows += bench_rows(codec, "tiny", size, (2, 5), (1.0, 0.5), args.repeats, baseline=True)
        if not args.skip_sd21:
            if args.sd21_model:
                model, model_id = load_model(args.sd21_model)
            else:
                save_model(init_model("sd21"), Path(tmp) / "sd21")
                model, model_id = load_model(Path(tmp) / "sd21")
            sd = Codec(model, model_id, deterministic=det)
            rows += bench_rows(sd, "sd21", 512, (2,), (1.0,), 1, baseline=False)
    threads = 1 if det else torch.get_num_threads()
    conditions = (f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads available, "
                  f"codec runs on {threads} thread(s) (deterministic={det}), torch {torch.__version__}, CPU, float32, "
                  f"batch 1, random weights; median of {args.repeats} after a warm-up")
    print_table(rows, conditions)


if __name__ == "__main__":
    main()
