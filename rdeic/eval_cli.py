"""The ``rdeic eval`` subcommand's arguments; the work is rdeic/evaluate.py's (imported only when it runs)."""

from __future__ import annotations

import argparse


def _grid(kind):
    def parse(text: str) -> list:
        try:
            items = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            items = []
        if not items or (kind is int and min(items) < 1) or (kind is float and min(items) < 0):
            allowed = "integers >= 1" if kind is int else "numbers >= 0"
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {allowed}, got {text!r}")
        return list(dict.fromkeys(items))
    return parse


def _names(text: str) -> list[str]:
    return list(dict.fromkeys(part.strip().lower() for part in text.split(",") if part.strip()))


def _bpp_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        low = high = 0.0
    if not 0 < low < high:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH with 0 < LOW < HIGH, got {text!r}")
    return low, high


def _points(text: str) -> int:
    value = int(text) if text.strip().isdigit() else 0
    if not 2 <= value <= 40:
        raise argparse.ArgumentTypeError(f"expected an integer from 2 to 40, got {text!r}")
    return value


def _max_pixels(text: str) -> int:
    value = int(text) if text.strip().isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_eval_parser(sub, default_model_help: str) -> None:
    from .baselines import FORMATS

    p = sub.add_parser("eval", help="rate-distortion curves of models and JPEG/WebP/AVIF on a folder; BD-rate; HTML report",
                       description="Every model x decode setting is one point; a setting's points over several models form "
                                   "one curve. Baselines sweep their quality to cover the models' bpp interval. Writes "
                                   "curves/*.json (CompressAI eval_model layout), images.parquet, summary.json and "
                                   "index.html into --out. See docs/eval.md.")
    p.add_argument("--images", required=True, help="folder or fsspec URL of images (PNG, JPEG, WebP, ...), e.g. Kodak")
    p.add_argument("--model", action="append", default=[], metavar="DIR",
                   help=f"a model directory; repeat for several rate points (default: {default_model_help})")
    p.add_argument("--steps", type=_grid(int), default=[None], metavar="L[,L...]",
                   help="denoising steps to decode with (default: each model's own)")
    p.add_argument("--detail", type=_grid(float), default=[1.0], metavar="λs[,λs...]", help="detail λs values (default: 1)")
    p.add_argument("--baselines", type=_names, default=["jpeg", "webp", "avif"], metavar="FMT[,FMT...]",
                   help=f"classical codecs to sweep, of {', '.join(FORMATS)}; '' for none (default: all)")
    p.add_argument("--anchor", help="the curve BD-rates are against: a baseline name or 'rdeic steps=L detail=λs' "
                                    "(default: the first baseline, else the first curve)")
    p.add_argument("--metrics", type=_names, metavar="M[,M...]",
                   help="of psnr, ssim, ms_ssim, delta_e, lpips, dists, niqe, fid, kid (default: all; a missing backbone "
                        "makes its metric 'unavailable (missing FILE)')")
    p.add_argument("--backbones", metavar="DIR", help="folder of the metrics' backbone weights (else $RDEIC_BACKBONES, "
                                                      "else $TORCH_HOME/hub/checkpoints); never downloaded")
    p.add_argument("--points", type=_points, default=6, help="rates per baseline curve (default: 6)")
    p.add_argument("--bpp-range", type=_bpp_range, metavar="LOW,HIGH",
                   help="the bpp interval the baselines cover (default: the models' points, widened to span x4)")
    p.add_argument("--seed", type=int, help="decode seed of every image (default: derived from each image's content)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--max-pixels", type=_max_pixels, default=None, metavar="N",
                   help="refuse an image over N pixels once padded to multiples of 64 (default: 16777216 = 4096²)")
    p.add_argument("--out", required=True, help="output folder: new, empty, or an earlier rdeic eval output")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> None:
    from .cli import _model_arg
    from .evaluate import EvalSpec, Setting, run

    models = tuple(args.model) or (_model_arg(None),)
    settings = tuple(Setting(steps, detail) for steps in args.steps for detail in args.detail)
    spec = EvalSpec(images=args.images, out=args.out, models=models, settings=settings, baselines=tuple(args.baselines),
                    anchor=args.anchor, points=args.points, bpp_range=args.bpp_range,
                    backbones=args.backbones, device=args.device, seed=args.seed,
                    **({"max_pixels": args.max_pixels} if args.max_pixels else {}),
                    **({"metrics": tuple(args.metrics)} if args.metrics else {}))
    summary = run(spec)
    print(f"{args.out}/index.html: {summary['image_count']} images, {len(settings) * len(models)} RDEIC points, "
          f"baselines {', '.join(spec.baselines) or 'none'}, {summary['timings']['seconds']:.1f} s")
    for row in summary["bd_rate"]:
        if row["metric"] == "psnr-rgb":
            value = "n/a" if row["akima"] is None else f"{row['akima']:+.2f}%"
            print(f"BD-rate (psnr-rgb, Akima) of {row['curve']} against {summary['anchor']}: {value}")
