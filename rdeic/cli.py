"""``rdeic``: the one-image codec and model tools.

Errors a user can cause (bad files, wrong model, corrupt bitstream) print one line and
exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from . import bitstream as bs
from .errors import ImageTooLargeError, RdeicError

log = logging.getLogger("rdeic")

DEFAULT_MODEL_ENV = "RDEIC_MODEL"


def default_model() -> str | None:
    """$RDEIC_MODEL, else the demo model shipped inside the package (rdeic/models/rdeic-tiny-demo), if present."""
    if os.environ.get(DEFAULT_MODEL_ENV):
        return os.environ[DEFAULT_MODEL_ENV]
    bundled = Path(__file__).resolve().parent / "models" / "rdeic-tiny-demo"
    return str(bundled) if (bundled / "config.json").is_file() else None


def _model_arg(value: str | None) -> str:
    model = value or default_model()
    if not model:
        raise RdeicError(f"no model given: pass --model DIR or set ${DEFAULT_MODEL_ENV}")
    return model


def _load_codec(args: argparse.Namespace):
    from .codec import Codec

    codec = Codec.load(_model_arg(args.model), device=args.device)
    if codec.model_id.name.startswith("UNTRAINED-"):
        log.warning("model %s has random weights: its output is noise, for tests only", codec.model_id)
    return codec


def cmd_encode(args: argparse.Namespace) -> None:
    from .images import read_image

    image = read_image(args.image)
    codec = _load_codec(args)
    t0 = time.perf_counter()
    data = codec.compress([image], seeds=None if args.seed is None else [args.seed])[0]
    seconds = time.perf_counter() - t0
    Path(args.output).write_bytes(data)
    h, w = image.shape[:2]
    print(f"{args.output}: {len(data)} bytes, {codec.bpp(data, w, h):.4f} bpp, {w}x{h}, "
          f"model {codec.model_id}, {seconds:.2f} s")


def cmd_decode(args: argparse.Namespace) -> None:
    data = Path(args.input).read_bytes()
    stream = bs.read(data)  # refuse a bad or oversized file before loading any model
    try:
        bs.check_size(stream.header, args.max_pixels)
    except ImageTooLargeError as exc:
        raise ImageTooLargeError(f"{exc}; to decode it anyway, pass --max-pixels {stream.header.padded_pixels}") from None
    from .images import write_image

    codec = _load_codec(args)
    t0 = time.perf_counter()
    image = codec.decompress([data], steps=args.steps, detail=args.detail, max_pixels=args.max_pixels)[0]
    seconds = time.perf_counter() - t0
    write_image(args.output, image)
    steps = args.steps or codec.config.diffusion.default_steps
    print(f"{args.output}: {stream.header.width}x{stream.header.height}, {steps} steps, "
          f"detail {args.detail}, {seconds:.2f} s")


def cmd_info(args: argparse.Namespace) -> None:
    """The header, read by the same parser as decode (so refused alike); nothing is decoded."""
    data = Path(args.input).read_bytes()
    stream = bs.read(data)
    h = stream.header
    info = {
        "file": str(args.input),
        "bytes": len(data),
        "bpp": round(len(data) * 8 / (h.width * h.height), 6),
        "format_version": h.version,
        "model_id": h.model_id,  # version 2: the digest's first bytes only (the full id is in the model directory)
        "container_bytes": len(data) - len(stream.hyper) - len(stream.y),
        "size": [h.width, h.height],
        "padded_size": [h.pad_width, h.pad_height],
        "padded_pixels": h.padded_pixels,
        "tiles": None if h.tiles is None else {"tile": h.tiles[0], "overlap": h.tiles[1]},  # latent pixels
        "over_default_max_pixels": h.padded_pixels > bs.size_limit(h, bs.DEFAULT_MAX_PIXELS),
        "y_shape": list(h.y_shape),
        "z_shape": list(h.z_shape),
        "index_bits": h.index_bits,
        "seed": h.seed,
        "symbols_crc32": f"{h.symbols_crc:08x}",
        "sections": {"hyper_indices": len(stream.hyper), "y": len(stream.y)},
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        print(f"{key:23s} {value}")
    if info["over_default_max_pixels"]:
        print(f"note: over the default decode limit of {bs.size_limit(h, bs.DEFAULT_MAX_PIXELS)} padded pixels"
              f"{'' if h.tiles else ' for an untiled stream'}; decode it with --max-pixels {h.padded_pixels} if you "
              f"trust its source")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def cmd_init_model(args: argparse.Namespace) -> None:
    from .weights import init_model, save_model

    model_id = save_model(init_model(args.preset, seed=args.seed), args.out)
    print(f"{args.out}: {model_id} (random weights, for tests and benchmarks only)")


def cmd_train(args: argparse.Namespace) -> None:
    from .training import TrainConfig, train

    logging.getLogger("rdeic").setLevel(logging.INFO)
    cfg = TrainConfig.load(args.config)
    if args.steps:
        from dataclasses import replace

        cfg = replace(cfg, steps=args.steps)
    trainer = train(cfg, device=args.device, resume=not args.restart)
    print(f"{cfg.output}/final: {trainer.cfg.stage} trained to step {trainer.step_count}; "
          + " ".join(f"{k}={v:.4g}" for k, v in trainer.last_metrics.items() if isinstance(v, float)))


def cmd_convert(args: argparse.Namespace) -> None:
    from .convert import convert

    steps = args.default_steps  # checked against the model's schedule by convert, an integer or not
    steps = int(steps) if steps is not None and steps.strip().lstrip("+-").isdigit() else steps
    model_id = convert(args.sd, args.rdeic, args.out, rdeic_config=args.rdeic_config, text_embedding=args.text_embedding,
                       name=args.name, default_steps=steps, ignore_keys=args.ignore_keys, report=print)
    print(f"{args.out}: {model_id}")


def cmd_model_info(args: argparse.Namespace) -> None:
    from .weights import describe

    print(json.dumps(describe(args.model), indent=2))


def cmd_model_id(args: argparse.Namespace) -> None:
    from .modeldir import ID_FILE, compute_model_id, model_id_of, read_config, write_id_file

    if not args.write:
        print(model_id_of(args.model))
        return
    model_id = compute_model_id(args.model)  # from the tensors, whatever model_id.json says
    old = Path(args.model) / ID_FILE
    previous = json.loads(old.read_text()).get("model_id") if old.is_file() else None
    if previous not in (None, str(model_id)):
        log.warning("%s: the id changes from %s; bitstreams and archives of the old id need the old files", args.model, previous)
    write_id_file(args.model, model_id, read_config(args.model))
    print(model_id)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rdeic", description="RDEIC extreme image codec: one image at a time.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress and warnings")
    sub = p.add_subparsers(dest="command", required=True)

    def with_model(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", help=f"model directory (default: ${DEFAULT_MODEL_ENV} or the bundled demo model)")
        sp.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: cpu)")

    e = sub.add_parser("encode", help="compress one image file to an .rdeic bitstream")
    e.add_argument("image")
    e.add_argument("output")
    e.add_argument("--seed", type=int, help="decode seed to store (default: derived from the content)")
    with_model(e)
    e.set_defaults(func=cmd_encode)

    d = sub.add_parser("decode", help="decode an .rdeic bitstream to an image file (PNG)")
    d.add_argument("input")
    d.add_argument("output")
    d.add_argument("--steps", type=int, help="denoising steps L (default: the model's, shown by `rdeic model-info`)")
    d.add_argument("--detail", type=float, default=1.0, help="λs: 0 smooth ... 1 as trained ... >1 sharper (default 1)")
    d.add_argument("--max-pixels", type=_positive_int, default=bs.DEFAULT_MAX_PIXELS, metavar="N",
                   help="refuse, before allocating anything, a bitstream claiming more than N padded pixels (width and "
                        "height rounded up to multiples of 64); default 8192*8192 = %(default)s, as rdeic-job decode "
                        "(4096*4096 for an untiled stream). Raise it to decode larger images: `rdeic info` shows a "
                        "stream's padded pixels")
    with_model(d)
    d.set_defaults(func=cmd_decode)

    i = sub.add_parser("info", help="show a bitstream's header without decoding it")
    i.add_argument("input")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    m = sub.add_parser("init-model", help="write a randomly initialised model directory (UNTRAINED)")
    m.add_argument("--preset", required=True, choices=["tiny", "sd21"])
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_init_model)

    t = sub.add_parser("train", help="train on one device (stage1, stage2, or base models of small presets)")
    t.add_argument("--config", required=True, help="training config (YAML), see docs/training.md")
    t.add_argument("--device", default="cpu")
    t.add_argument("--steps", type=int, help="override the config's number of steps")
    t.add_argument("--restart", action="store_true", help="ignore existing checkpoints in the output")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("convert-weights", help="SD 2.1-base + an authors' RDEIC checkpoint -> a model directory (offline)")
    c.add_argument("--sd", required=True, help="SD 2.1-base: a diffusers folder or the single-file v2-1_512-ema-pruned checkpoint")
    c.add_argument("--rdeic", required=True, help="the authors' checkpoint, e.g. rdeic_2_step2.ckpt (or its state_dict)")
    c.add_argument("--rdeic-config", help="the authors' model YAML (default: their configs/model/rdeic.yaml sizes)")
    c.add_argument("--text-embedding", help="the (1, 77, 1024) empty-prompt embedding, if the SD weights lack a text encoder: a file of one "
                        "tensor (torch.save of the tensor or of a dict holding only it, or safetensors)")
    c.add_argument("--name", help="model name (default: from the checkpoint's file name)")
    c.add_argument("--default-steps", metavar="N", help="the model's default decode steps L, in [1, used_timesteps] "
                   "(default: the checkpoint's file name, e.g. rdeic_2_step5.ckpt -> 5, else the YAML's fixed_step, else 2)")
    c.add_argument("--ignore-keys", metavar="PATTERN", action="append", default=[],
                   help="leave out checkpoint tensors that map to nothing and whose key matches this glob, e.g. "
                        "'preprocess_model.extra.*' (repeatable; by default any such tensor is an error)")
    c.add_argument("--out", required=True)
    c.set_defaults(func=cmd_convert)

    mi = sub.add_parser("model-info", help="show a model directory's id, default decode steps and config")
    mi.add_argument("model")
    mi.set_defaults(func=cmd_model_info)

    mid = sub.add_parser("model-id", help="print a model directory's id (model_id.json, else computed from the tensors)")
    mid.add_argument("model")
    mid.add_argument("--write", action="store_true", help="compute it from config.json and the tensors; store it in model_id.json")
    mid.set_defaults(func=cmd_model_id)

    from .eval_cli import add_eval_parser  # rdeic eval: rdeic/eval_cli.py and rdeic/evaluate.py

    add_eval_parser(sub, f"${DEFAULT_MODEL_ENV} or the bundled demo model")
    return p


def main(argv: list[str] | None = None) -> int:
    # compressai's import-time torch.jit.script call warns on every run; it is not ours to fix
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="rdeic: %(levelname)s: %(message)s")
    try:
        args.func(args)
    except (RdeicError, ValueError, OSError) as exc:
        if args.verbose:
            log.exception("details")
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"rdeic: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
