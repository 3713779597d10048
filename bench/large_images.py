"""Large images: tiled vs whole-image coding on this machine, the tiles' seams, and sd21's memory on GPUs.

    python bench/large_images.py                        # all three parts (about 20 min on 2 cores)
    python bench/large_images.py --parts seams --photo PHOTO.jpg
    python bench/large_images.py --parts sd21           # the projection only (under a minute)

sizes  Encode and decode seconds, bpp and peak RSS of the demo model (CPU, the codec's deterministic
       1-thread mode) at 512², 1024², 2048², 4096×3072 and 6000×4000: tiled (the plan of --tile and
       --overlap latent pixels, forced at every size) and whole-image, the baseline, up to
       --untiled-max-pixels padded pixels (above it the whole-image self-attention, quadratic in the
       pixels, makes it too slow here). Every (size, mode, direction) runs in a fresh process; its peak is
       ru_maxrss, its "loaded" the RSS after loading the model and a warm-up. Then a least-squares line
       of the tiled peaks against megapixels.
seams  One photo at --seam-size, decoded tiled and whole: each encoder's own stream (the whole
       pipeline), and one whole-image stream decoded both ways (the tiled way by rewriting its header
       with the plan, same payload), which isolates the decoder. PSNRs, and the absolute error
       (tiled vs whole) within ±4 and ±16 px of the start and end lines of the UNet's tiles and of the
       VAE's (TilePlan.vae) vs farther away.
sd21   Projected GPU memory of the sd21 preset, from shapes: the modules are built on the meta device
       and every tensor an op creates is counted while it lives (no arithmetic runs), for a batch of
       tiles and for whole images; plus the whole-image tensors that tiling keeps (analytic), the
       compression module's (measured on CPU with random weights: it needs real numbers) and the weights.

The images are a photo (--photo; by default coffee.png, 600×400, from examples/shards, so upscaled),
centre-cropped to each size's aspect and resized with Lanczos.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)

from rdeic import bitstream as bs  # noqa: E402
from rdeic.codec import Codec  # noqa: E402
from rdeic.config import TilingConfig, load_preset  # noqa: E402
from rdeic.metrics import mse, psnr_from_mse  # noqa: E402
from rdeic.model import RDEIC, _vae_batch  # noqa: E402
from rdeic.tiling import SCALE, TilePlan  # noqa: E402

MODEL = ROOT / "rdeic" / "models" / "rdeic-tiny-demo"
SHARD = ROOT / "examples" / "shards" / "photos-000000.tar"
SIZES = "512x512,1024x1024,2048x2048,4096x3072,6000x4000"
NEVER = 1 << 40  # min_pixels that never tiles
GiB = 1 << 30


def size_arg(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def code_version() -> str:
    """The commit measured, and whether the codec's sources differ from it."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *cmd], capture_output=True, text=True).stdout.strip()

    return (git("rev-parse", "--short", "HEAD") or "unknown") + (" + uncommitted rdeic/ changes" if git("status", "--porcelain", "rdeic") else "")


def conditions(args) -> str:
    return (f"# code {code_version()}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, CPU, "
            f"float32, the codec's deterministic mode (1 torch thread), {datetime.datetime.now():%Y-%m-%d %H:%M}; "
            f"model {Path(args.model).name}, L = 2, λs = 1; tiles {args.tile}/{args.overlap} latent px, {args.batch} per call")


# ---------------------------------------------------------------- images
def load_photo(path: str | None) -> tuple[Image.Image, str]:
    if path:
        return Image.open(path).convert("RGB"), Path(path).name
    with tarfile.open(SHARD) as tar:
        data = tar.extractfile("coffee.png").read()
    return Image.open(io.BytesIO(data)).convert("RGB"), "coffee.png"


def fit(photo: Image.Image, w: int, h: int) -> np.ndarray:
    """The photo centre-cropped to w:h and resized to w x h (Lanczos)."""
    sw, sh = photo.size
    cw, ch = min(sw, round(sh * w / h)), min(sh, round(sw * h / w))
    box = ((sw - cw) // 2, (sh - ch) // 2, (sw - cw) // 2 + cw, (sh - ch) // 2 + ch)
    return np.asarray(photo.resize((w, h), Image.LANCZOS, box=box))


def describe_photo(photo: Image.Image, name: str, w: int, h: int) -> str:
    sw, sh = photo.size
    scale = max(w / min(sw, round(sh * w / h)), h / min(sh, round(sw * h / w)))
    return f"{name} {sw}×{sh}, centre-cropped to {w}:{h} and Lanczos-resized ({'upscaled' if scale > 1 else 'downscaled'} {scale:.2f}×)"


# ---------------------------------------------------------------- part 1: sizes
def tiling(args, mode: str) -> TilingConfig:
    return TilingConfig(min_pixels=4096 if mode == "tiled" else NEVER, tile=args.tile, overlap=args.overlap, batch=args.batch)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def one(args) -> None:
    """Hidden --one: one direction of one (size, mode) in this fresh process; prints a RESULT line."""
    codec = Codec.load(args.model, tiling=tiling(args, args.mode))
    codec.warm_up()
    loaded = rss_mib()
    if args.one == "encode":
        photo, _ = load_photo(args.photo)
        work = [fit(photo, *size_arg(args.size))]
        del photo
        run = codec.compress
    else:
        work = [Path(args.stream).read_bytes()]
        run = lambda streams: codec.decompress(streams, max_pixels=None)  # noqa: E731
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = run(work)
        times.append(time.perf_counter() - t0)
    if args.one == "encode":
        Path(args.stream).write_bytes(out[0])
    print("RESULT " + json.dumps(dict(loaded=loaded, peak=peak_mib(), times=times)), flush=True)


def run_one(args, direction: str, size: str, mode: str, stream: Path) -> dict:
    cmd = [sys.executable, __file__, "--one", direction, "--size", size, "--mode", mode, "--stream", str(stream),
           "--model", str(args.model), "--repeats", str(args.repeats), "--tile", str(args.tile),
           "--overlap", str(args.overlap), "--batch", str(args.batch)] + (["--photo", args.photo] if args.photo else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.1f}" if hi - lo < 0.05 else f"{lo:.1f}–{hi:.1f}"


def part_sizes(args) -> None:
    plan = TilePlan(args.tile, args.overlap)
    photo, name = load_photo(args.photo)
    print(conditions(args))
    largest = max((size_arg(v) for v in args.sizes.split(",")), key=lambda s: s[0] * s[1])
    print(f"# content: {describe_photo(photo, name, *largest)} at the largest size; seconds: "
          f"{'one run' if args.repeats == 1 else f'min–max of {args.repeats} runs'} per fresh process (no warm-up "
          "beyond the codec's 64² warm_up); peak: ru_maxrss of that process (encode includes the input image)")
    print("# tiles: UNet/VAE (the VAE runs on TilePlan.vae(): twice the tile and overlap)")
    head = (f"{'size':>10} {'mode':7} {'tiles':>6} {'bpp':>7} {'encode s':>9} {'decode s':>9} {'loaded MiB':>10} "
            f"{'enc peak MiB':>12} {'dec peak MiB':>12} {'enc +MiB':>8} {'dec +MiB':>8}")
    print(head + "\n" + "-" * len(head), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            w, h = size_arg(size)
            pw, ph = bs.padded(w), bs.padded(h)
            for mode in ("tiled", "untiled"):
                one_piece = mode == "untiled" or max(ph, pw) // SCALE <= args.tile
                tiles = "1" if one_piece else "/".join(str(p.count(ph // SCALE, pw // SCALE)) for p in (plan, plan.vae()))
                label = f"{w}×{h}"
                if mode == "untiled" and pw * ph > args.untiled_max_pixels:
                    print(f"{label:>10} {'whole':7} {1:>6}  not run (padded {pw * ph / 1e6:.1f} MP > --untiled-max-pixels "
                          f"{args.untiled_max_pixels / 1e6:.1f} MP: whole-image self-attention is quadratic in the pixels, "
                          "an estimated 10+ min per decode here)", flush=True)
                    continue
                stream = Path(tmp) / f"{size}-{mode}.rdeic"
                enc = run_one(args, "encode", size, mode, stream)
                dec = run_one(args, "decode", size, mode, stream)
                bpp = stream.stat().st_size * 8 / (w * h)
                r = dict(size=(w, h), mp=w * h / 1e6, mode=mode, tiles=tiles, bpp=bpp, enc=enc, dec=dec)
                rows.append(r)
                print(f"{label:>10} {'tiled' if mode == 'tiled' else 'whole':7} {tiles:>6} {bpp:7.4f} {span(enc['times']):>9} "
                      f"{span(dec['times']):>9} {enc['loaded']:10.0f} {enc['peak']:12.0f} {dec['peak']:12.0f} "
                      f"{enc['peak'] - enc['loaded']:8.0f} {dec['peak'] - dec['loaded']:8.0f}", flush=True)
    for (w, h) in dict.fromkeys(r["size"] for r in rows):
        pair = {r["mode"]: r for r in rows if r["size"] == (w, h)}
        if len(pair) == 2:
            t, u = pair["tiled"], pair["untiled"]
            print(f"whole ÷ tiled at {w}×{h}: encode {min(u['enc']['times']) / min(t['enc']['times']):.2f}× the time, "
                  f"{u['enc']['peak'] / t['enc']['peak']:.2f}× the peak; decode {min(u['dec']['times']) / min(t['dec']['times']):.2f}× "
                  f"the time, {u['dec']['peak'] / t['dec']['peak']:.2f}× the peak")
    tiled = [r for r in rows if r["mode"] == "tiled" and r["tiles"] != "1"]
    if len(tiled) >= 3:
        mp = np.array([r["mp"] for r in tiled])
        names = ", ".join(f"{r['size'][0]}×{r['size'][1]}" for r in tiled)
        print(f"tiled peak RSS vs megapixels, least squares over {names}:")
        for direction in ("enc", "dec"):
            peak = np.array([r[direction]["peak"] for r in tiled])
            slope, intercept = np.polyfit(mp, peak, 1)
            worst = np.abs(peak - (slope * mp + intercept)).max()
            print(f"  {'encode' if direction == 'enc' else 'decode'}: {slope:.1f} MiB/MP + {intercept:.0f} MiB "
                  f"(largest residual {worst:.0f} MiB)")
    print(flush=True)


# ---------------------------------------------------------------- part 2: seams
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return psnr_from_mse(mse(a, b))


def border_distance(plan: TilePlan, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image pixel: the distance of its centre to the nearest start or end line of the plan's tiles
    (image px), and how many tiles cover it."""
    def axis(n: int) -> tuple[np.ndarray, np.ndarray]:
        padded = bs.padded(n)
        starts = plan.starts(padded // SCALE)
        side = min(plan.tile, padded // SCALE) * SCALE
        lines = sorted({SCALE * s for s in starts} | {SCALE * s + side for s in starts} - {0, padded})
        pos = np.arange(n) + 0.5
        dist = np.abs(pos[:, None] - np.array(lines, dtype=float)[None]).min(1) if lines else np.full(n, np.inf)
        cover = sum(((pos >= SCALE * s) & (pos < SCALE * s + side)).astype(int) for s in starts)
        return dist, cover

    (dy, cy), (dx, cx) = axis(h), axis(w)
    return np.minimum(dy[:, None], dx[None, :]), cy[:, None] * cx[None, :]


def regions(plan: TilePlan, w: int, h: int) -> list[tuple[str, np.ndarray]]:
    """The pixels near the tile lines of the UNet's plan and of the VAE's, and the rest."""
    (du, _), (dv, cover) = border_distance(plan, w, h), border_distance(plan.vae(), w, h)
    near = np.minimum(du, dv)
    return [("within ±4 px of a UNet tile line", du <= 4), ("within ±4 px of a VAE tile line", dv <= 4),
            ("within ±16 px of either", near <= 16), ("farther than 16 px from both", near > 16),
            ("covered by ≥2 VAE tiles (blend)", cover >= 2), ("covered by 1 VAE tile", cover == 1)]


def error_rows(a: np.ndarray, b: np.ndarray, masks: list[tuple[str, np.ndarray]]) -> list[tuple[str, float, float, int]]:
    err = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(-1)  # worst channel per pixel
    mean_err = np.abs(a.astype(np.float64) - b.astype(np.float64)).mean(-1)
    return [(name, m.mean() * 100, mean_err[m].mean(), err[m].max()) for name, m in masks if m.any()]


def block_error(a: np.ndarray, b: np.ndarray, k: int = 32) -> float:
    """Mean |difference| of k x k block means: the low-frequency part of the error (tone shifts)."""
    h, w = a.shape[0] // k * k, a.shape[1] // k * k
    diff = a[:h, :w].astype(np.float64) - b[:h, :w].astype(np.float64)
    return float(np.abs(diff.reshape(h // k, k, w // k, k, -1).mean((1, 3))).mean())


def part_seams(args) -> None:
    w, h = size_arg(args.seam_size)
    photo, name = load_photo(args.photo)
    image = fit(photo, w, h)
    plan = TilePlan(args.tile, args.overlap)
    whole = Codec.load(args.model, tiling=tiling(args, "untiled"))
    tiled = Codec(whole.model, whole.model_id, model_dir=args.model, tiling=tiling(args, "tiled"))
    t0 = time.perf_counter()
    s_whole, s_tiled = whole.compress([image])[0], tiled.compress([image])[0]
    parsed = bs.read(s_whole)
    forced = bs.write(replace(parsed.header, tiles=(plan.tile, plan.overlap)), parsed.hyper, parsed.y)
    if bs.read(s_tiled).header.tiles is None:
        raise SystemExit(f"--seam-size {args.seam_size} fits one tile of {plan.tile * SCALE} px: no seams to compare")
    d_whole, d_tiled, d_forced = whole.decompress([s_whole, s_tiled, forced], max_pixels=None)
    seconds = time.perf_counter() - t0
    masks = regions(plan, w, h)
    print(conditions(args))
    print(f"# seams at {w}×{h}: {describe_photo(photo, name, w, h)}; "
          f"{plan.count(bs.padded(h) // SCALE, bs.padded(w) // SCALE)} UNet tiles of {plan.tile}/{plan.overlap}, "
          f"{plan.vae().count(bs.padded(h) // SCALE, bs.padded(w) // SCALE)} VAE tiles of {plan.vae().tile}/{plan.vae().overlap}; {seconds:.0f} s for 2 encodes and 3 decodes")
    print(f"{'':34} {'bpp':>7} {'PSNR vs original':>16} {'PSNR vs whole decode':>20}")
    for label, stream, out in (("whole: whole-image stream", s_whole, d_whole), ("tiled: tiled stream", s_tiled, d_tiled),
                               ("decoder only: whole stream, tiled", forced, d_forced)):
        vs_whole = "-" if out is d_whole else f"{psnr(out, d_whole):.2f} dB"
        print(f"{label:34} {len(stream) * 8 / (w * h):7.4f} {psnr(out, image):13.2f} dB {vs_whole:>20}")
    for label, out in (("whole pipeline (tiled stream+decode vs whole)", d_tiled), ("decoder only (same stream)", d_forced)):
        print(f"abs error, {label}: {'share of pixels':>15} {'mean':>6} {'max':>4}")
        for region, share, mean, worst in error_rows(out, d_whole, masks):
            print(f"  {region:40} {share:14.1f}% {mean:6.2f} {worst:4d}")
        print(f"  {'32×32 block means (low frequencies)':40} {'':15} {block_error(out, d_whole):6.2f}")
    print("(mean: over pixels and channels, in 0–255 levels; max: the worst channel of any pixel)\n", flush=True)


# ---------------------------------------------------------------- part 3: sd21 projection
class LiveBytes(TorchDispatchMode):
    """The bytes of the tensors that ops create while they live (a storage shared by views counted once)
    and their high-water mark. On the meta device only shapes and dtypes exist: nothing is computed."""

    def __init__(self, existing) -> None:
        super().__init__()
        self.skip = {t.untyped_storage()._cdata for t in existing}
        self.live: dict[int, tuple[int, set[int]]] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        key = t.untyped_storage()._cdata
        if key in self.skip:
            return
        if key not in self.live:
            self.live[key] = (t.untyped_storage().nbytes(), set())
            self.now += self.live[key][0]
            self.peak = max(self.peak, self.now)
        users = self.live[key][1]
        if id(t) not in users:  # an in-place op returns its input
            users.add(id(t))
            weakref.finalize(t, self._drop, key, id(t))

    def _drop(self, key: int, tensor_id: int) -> None:
        users = self.live[key][1]
        users.discard(tensor_id)
        if not users:
            self.now -= self.live.pop(key)[0]


@contextlib.contextmanager
def attention(efficient: bool):
    """efficient: SDPA as a fused kernel (flash / memory-efficient: no tokens × tokens scores); otherwise
    the math path that torch takes on meta (and as its fallback): q·kᵀ and its softmax both materialised."""
    if not efficient:
        yield
        return
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, *a, **kw: q.new_empty(q.shape[:-1] + v.shape[-1:])
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def activation_peak(model: torch.nn.Module, fn, *inputs: torch.Tensor) -> int:
    with torch.no_grad(), LiveBytes(list(model.state_dict().values()) + list(inputs)) as live:
        fn(*inputs)
    return live.peak


def meta_model(preset: str, dtype: torch.dtype) -> RDEIC:
    with torch.device("meta"):
        model = RDEIC(load_preset(preset)).eval()
    model.set_inference_dtype(dtype)  # the decoder side; the encoder side stays float32, as in the codec
    return model


def weight_bytes(model: RDEIC) -> int:
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    coding = model.compression._coding_modules()  # the codec's float64 copy of the entropy-parameter nets
    return held + sum(t.numel() * t.element_size() for t in coding.state_dict().values())


def part_peaks(model: RDEIC, h8: int, w8: int, batch: int, dtype: torch.dtype) -> dict[str, int]:
    """Activation high-water marks (inputs excluded) of one call of each part on a batch of h8 x w8 latents."""
    meta = torch.device("meta")
    m_ch = model.config.compression.M
    x = torch.empty(batch, 3, h8 * SCALE, w8 * SCALE, device=meta)
    z = torch.empty(batch, 4, h8, w8, device=meta, dtype=dtype)
    hint = torch.empty(batch, m_ch, h8, w8, device=meta, dtype=dtype)
    return dict(
        enc=activation_peak(model, lambda x: model.vae_features(x)[0], x),
        eps=activation_peak(model, lambda z, hint: model.eps(z, 500, hint, 1.0), z, hint),
        dec=activation_peak(model, model.decode_latent, z),
    )


def tiled_call_peaks(model: RDEIC, plan: TilePlan, batch: int, dtype: torch.dtype) -> dict[str, int]:
    """One call of each part as the tiled codec makes it: the UNet on ``batch`` tiles of the plan, the VAE
    on tiles of ``plan.vae()``, as many as the model takes per call."""
    vae, vae_batch = plan.vae(), _vae_batch(plan, batch)
    return dict(part_peaks(model, vae.tile, vae.tile, vae_batch, dtype),
                eps=part_peaks(model, plan.tile, plan.tile, batch, dtype)["eps"])


def compression_per_px(preset: str) -> tuple[float, float]:
    """Live bytes per pixel of the compression module's compress and decompress (whole image in both
    modes; its entropy steps need real numbers, so it runs on CPU with random weights at two sizes)."""
    from rdeic.compression import LatentCompression

    torch.manual_seed(0)
    comp = LatentCompression(load_preset(preset).compression).eval()
    comp.update()
    peaks = []
    for side in (64, 128):  # latent px
        feat = torch.randn(1, comp.config.in_channels, side, side) * 0.1
        codes = comp.compress(feat)
        peaks.append((activation_peak(comp, comp.compress, feat), activation_peak(comp, lambda: comp.decompress(codes))))
    px = (128 * SCALE) ** 2 - (64 * SCALE) ** 2
    return (peaks[1][0] - peaks[0][0]) / px, (peaks[1][1] - peaks[0][1]) / px


def tiled_check(model: RDEIC, plan: TilePlan, batch: int, w: int, h: int, dtype: torch.dtype) -> dict[str, int]:
    """Activation high-water marks of the codec's own tiled functions (blending included) on meta."""
    h8, w8 = bs.padded(h) // SCALE, bs.padded(w) // SCALE
    x = torch.empty(1, 3, h8 * SCALE, w8 * SCALE, device="meta")
    z = torch.empty(1, 4, h8, w8, device="meta", dtype=dtype)
    hint = torch.empty(1, model.config.compression.M, h8, w8, device="meta", dtype=dtype)
    noise = torch.empty_like(z)
    return dict(
        enc=activation_peak(model, lambda x: model.tiled_features(x, plan, batch), x),
        eps=activation_peak(model, lambda z, c, n: model.relay_decode(z, c, 2, 1.0, n, [n], plan=plan, batch=batch), z, hint, noise),
        dec=activation_peak(model, lambda z: model.decode_latent(z, plan, batch), z),
    )


def part_sd21(args) -> None:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # casting the meta UNet to fp16 warns about from_pretrained
    cfg = load_preset("sd21")
    m_ch, feat_ch = cfg.compression.M, cfg.compression.in_channels
    plan = TilePlan(args.tile, args.overlap)
    t0 = time.perf_counter()
    sizes = [(1024, 1024), (2048, 2048), (4096, 4096), (6000, 4000)]
    print(f"# sd21 preset: PROJECTED from shapes on the meta device, not measured; torch {torch.__version__}; "
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}. GiB = 2^30 bytes.")
    print("# Activations: every tensor an op creates, counted while it lives (torch dispatch on meta); a part's "
          "inputs are counted with the whole-image tensors below. 'fused' attention: no tokens² scores (flash or "
          "memory-efficient SDPA); 'math': q·kᵀ and softmax materialised (torch's fallback). fp16 = the codec's "
          "inference dtype for the UNet, control and VAE decoder; VAE encoder and compression stay float32.")
    results = {}
    for dtype in (torch.float32, torch.float16):
        model = meta_model("sd21", dtype)
        d = torch.finfo(dtype).bits // 8
        wb = weight_bytes(model)
        for efficient in (True, False):
            with attention(efficient):
                tile = {b: tiled_call_peaks(model, plan, b, dtype) for b in sorted({1, args.batch})}
                whole = {s: part_peaks(model, bs.padded(s[1]) // SCALE, bs.padded(s[0]) // SCALE, 1, dtype) for s in sizes}
            results[(dtype, efficient)] = (wb, d, tile, whole)
    comp_enc_px, comp_dec_px = compression_per_px("sd21")
    with attention(True):
        check = tiled_check(model, plan, args.batch, 2048, 2048, torch.float16)

    vae = plan.vae()
    print(f"\nActivation high-water mark of one call, GiB. 'tiled, b': the UNet on b tiles of {plan.tile}² latent "
          f"({plan.tile * SCALE}² px), the VAE on {vae.tile}² tiles ({vae.tile * SCALE}² px), as many per call as the "
          "codec takes (rdeic.model._vae_batch: about the same pixels)")
    head = f"{'call':30} " + " ".join(f"{p + ' ' + a:>12}" for p in ("fp32", "fp16") for a in ("fused", "math"))
    print(head + "  (columns: decoder-side dtype, attention)\n" + "-" * len(head))
    keys = [(f"tiled, b={b}", "tile", b) for b in sorted({1, args.batch})] + [(f"whole {w}×{h}", "whole", (w, h)) for w, h in sizes]
    for part, name in (("enc", "VAE encoder"), ("eps", "UNet+control"), ("dec", "VAE decoder")):
        for label, kind, key in keys:
            vals = [results[(dt, eff)][2 if kind == "tile" else 3][key][part] / GiB
                    for dt in (torch.float32, torch.float16) for eff in (True, False)]
            print(f"{name + ', ' + label:30} " + " ".join(f"{v:12.2f}" for v in vals))

    # Whole-image tensors, bytes per padded pixel (analytic). Encode: the image (float32, 3 ch) and, tiled,
    # the blended VAE features (float32 at 1/8) and their weight map. Decode: the compression output the
    # caller still holds (z_c and the guide hint, float32 at 1/8: see _diffuse's `del latents`), their
    # copies in the decoder dtype, about six 4-ch latents (noise, z_t, x0, eps and its accumulator) and,
    # tiled, the VAE decoder's float32 output accumulator and weight map (or the whole output's float32 copy).
    def per_px(d: int) -> dict[str, float]:
        return dict(image=12, features=4 * feat_ch / 64 + 4 / 64, held=4 * (4 + m_ch) / 64, copies=d * (4 + m_ch) / 64,
                    latents=6 * 4 * 4 / 64, out_acc=16)

    print("\nWhole-image tensors (analytic, MB per megapixel = bytes per pixel): "
          + ", ".join(f"{k} {v:.1f}" for k, v in per_px(4).items()) + " (fp32; fp16 copies "
          + f"{per_px(2)['copies']:.1f}). The compression module runs on the whole image in both modes: measured "
          f"on CPU (random weights, live tensor bytes at 512² and 1024², extrapolated): compress {comp_enc_px:.0f} B/px "
          f"besides its input, decompress {comp_dec_px:.0f} B/px.")
    t16, px = per_px(2), 2048 * 2048
    print("Check, the codec's tiled functions run on meta at 2048², fp16, fused (blending and accumulators included) "
          "vs the projection's sum (accumulators + one call), GiB: "
          + "; ".join(f"{name} {check[part] / GiB:.2f} vs {(px * t16[acc] + results[(torch.float16, True)][2][args.batch][part]) / GiB:.2f}"
                      for part, name, acc in (("enc", "VAE encoder", "features"), ("eps", "2 UNet steps", "latents"),
                                              ("dec", "VAE decoder", "out_acc"))))
    print(f"Weights: fp32 {results[(torch.float32, True)][0] / GiB:.2f} GiB, fp16 decoder side "
          f"{results[(torch.float16, True)][0] / GiB:.2f} GiB (each with the float64 entropy-net copy).")
    gpus = (24, 40, 80, 141)
    print(f"\nProjected peak device memory, GiB (weights + whole-image tensors + the largest call); fits: the "
          f"smallest of {', '.join(map(str, gpus))} GB holding it with 10% to spare (CUDA context, fragmentation):")
    head = f"{'image':10} {'mode':6} {'dtype':5} {'attention':9} {'encode':>8} {'decode':>8}  fits"
    print(head + "\n" + "-" * len(head))
    for w, h in sizes:
        px = bs.padded(w) * bs.padded(h)
        for mode in ("tiled", "whole"):
            for (dtype, efficient), (wb, d, tile, whole) in results.items():
                t = per_px(d)
                comp_enc, comp_dec = px * (t["features"] + comp_enc_px), px * comp_dec_px
                if mode == "tiled":
                    calls = tile[args.batch]
                    enc = max(px * (t["image"] + t["features"]) + calls["enc"], comp_enc)
                    unet = px * (t["held"] + t["copies"] + t["latents"]) + calls["eps"]
                    vae = px * (t["held"] + t["latents"] + t["out_acc"]) + calls["dec"]
                else:
                    calls = whole[(w, h)]
                    enc = max(px * t["image"] + calls["enc"], comp_enc)
                    unet = px * (t["held"] + t["copies"] + t["latents"]) + calls["eps"]
                    vae = px * (t["held"] + t["latents"] + (12 if d != 4 else 0)) + calls["dec"]
                enc, dec = (wb + enc) / GiB, (wb + max(comp_dec, unet, vae)) / GiB
                fits = next((f"{g} GB" for g in gpus if max(enc, dec) <= 0.9 * g), "none of them")
                print(f"{f'{w}×{h}':10} {mode:6} {'fp32' if d == 4 else 'fp16':5} {'fused' if efficient else 'math':9} "
                      f"{enc:8.1f} {dec:8.1f}  {fits}")
    print(f"(tiled: {args.batch} tiles of {plan.tile}/{plan.overlap} per call; projection took "
          f"{time.perf_counter() - t0:.0f} s)\n", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="sizes,seams,sd21", help="comma-separated: sizes, seams, sd21")
    p.add_argument("--sizes", default=SIZES, help="WxH,... for the sizes part")
    p.add_argument("--untiled-max-pixels", type=int, default=2048 * 2048,
                   help="largest padded image the whole-image baseline runs on (default 2048²)")
    p.add_argument("--photo", help="an image file (default: coffee.png from examples/shards, upscaled)")
    p.add_argument("--seam-size", default="2048x1536")
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--tile", type=int, default=64, help="latent px (8 image px each)")
    p.add_argument("--overlap", type=int, default=16, help="latent px")
    p.add_argument("--batch", type=int, default=4, help="tiles per model call")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per process (sizes part)")
    p.add_argument("--one", choices=["encode", "decode"], help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--stream", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        one(args)
        return
    t0 = time.perf_counter()
    parts = args.parts.split(",")
    if "sizes" in parts:
        part_sizes(args)
    if "seams" in parts:
        part_seams(args)
    if "sd21" in parts:
        part_sd21(args)
    print(f"# wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
