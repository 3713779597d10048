"""Codec speed on this machine: RDEIC's relay decode (L = 2, 5) vs a 50-step decode from noise.

Prints one table. Every row is measured in the same run; the baseline ("DiffEIC-style")
decodes the same compressed latent's guide hint but starts from pure noise at t = 999 and
runs 50 respaced DDPM steps over the full 1000-step schedule, one UNet pass per step.

    python bench/codec.py                      # tiny at 256² and 512², plus sd21 at 512² (weights: see --sd21)
    python bench/codec.py --sd21 none          # tiny only (about a minute)
    python bench/codec.py --sd21 random        # sd21 preset with random weights, L = 2 only
    python bench/codec.py --sd21-model DIR     # sd21 rows from an existing model directory

``--sd21 converted`` (the default) builds the real conversion path with random values: an SD
2.1-base diffusers folder and an authors'-layout RDEIC checkpoint with every tensor of
``../shared/fixtures/rdeic_sd21_checkpoint_keys.json``, converted by ``rdeic.convert``; then
L = 2 and 5, λs = 1 and 0.5. It writes several GB of temporary files and took about 10 minutes
on a 2-core CPU.
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
from rdeic.diffusion import RelaySchedule, sample  # noqa: E402
from rdeic.weights import init_model, load_model, save_model  # noqa: E402

KEYS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "rdeic_sd21_checkpoint_keys.json"


def converted_sd21(tmp: Path) -> Path:
    """Random-valued SD 2.1-base (diffusers folder) + authors' checkpoint → rdeic.convert → model dir."""
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file

    from rdeic.compression import ENTROPY_TABLE_KEYS
    from rdeic.config import load_preset
    from rdeic.convert import convert

    cfg = load_preset("sd21")
    torch.manual_seed(0)
    UNet2DConditionModel(**cfg.unet).save_pretrained(tmp / "sd" / "unet")
    AutoencoderKL(**cfg.vae).save_pretrained(tmp / "sd" / "vae")
    (tmp / "sd" / "scheduler").mkdir(parents=True)
    (tmp / "sd" / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "epsilon"}))
    spec = json.loads(KEYS.read_text())["tensors"]
    state = {}
    for key, (shape, dtype) in spec.items():
        if key.rsplit(".", 1)[-1] in ENTROPY_TABLE_KEYS:
            continue  # entropy tables are rebuilt by the converter
        state[key] = torch.randn(shape) * 0.02 if dtype == "float32" else torch.zeros(shape, dtype=getattr(torch, dtype))
    state["control_model.scale_list"] = torch.ones(25)
    state["preprocess_model.gaussian_conditional.scale_bound"] = torch.tensor([0.11])
    state["preprocess_model.gaussian_conditional.likelihood_lower_bound.bound"] = torch.tensor([1e-9])
    state["preprocess_model.gaussian_conditional.lower_bound_scale.bound"] = torch.tensor([0.11])
    save_file(state, str(tmp / "rdeic_2_step2.safetensors"))
    save_file({"text_context": torch.randn(1, 77, 1024)}, str(tmp / "empty_prompt.safetensors"))
    out = tmp / "rdeic-sd21-converted"
    convert(tmp / "sd", tmp / "rdeic_2_step2.safetensors", out, text_embedding=str(tmp / "empty_prompt.safetensors"))
    return out


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
    p.add_argument("--sd21", choices=["converted", "random", "none"], default="converted")
    p.add_argument("--sd21-model", help="an sd21 model directory to time instead")
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
        if args.sd21_model or args.sd21 != "none":
            if args.sd21_model:
                directory, grid = Path(args.sd21_model), ((2, 5), (1.0, 0.5))
            elif args.sd21 == "converted":
                directory, grid = converted_sd21(Path(tmp)), ((2, 5), (1.0, 0.5))
            else:
                directory, grid = Path(tmp) / "sd21", ((2,), (1.0,))
                save_model(init_model("sd21"), directory)
            model, model_id = load_model(directory)
            sd = Codec(model, model_id, deterministic=det)
            label = "sd21" + ("*" if args.sd21 == "converted" and not args.sd21_model else "")
            rows += bench_rows(sd, label, 512, *grid, 1, baseline=False)
    threads = 1 if det else torch.get_num_threads()
    conditions = (f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads available, "
                  f"codec runs on {threads} thread(s) (deterministic={det}), torch {torch.__version__}, CPU, float32, "
                  f"batch 1, random weights; median of {args.repeats} after a warm-up (sd21: one run after a warm-up); "
                  "sd21* = converted from an SD 2.1-base folder and an authors'-layout checkpoint")
    print_table(rows, conditions)


if __name__ == "__main__":
    main()
