"""Figures of one device: codec encode and decode images/s and peak memory at 512², and the time of
one training step of stage 1, stage 2 and the denoiser.

    python bench/gpu.py                           # CUDA, the bundled demo model, 512², a few minutes
    python bench/gpu.py --model sd21              # the paper's sizes, random weights
    python bench/gpu.py --model DIR               # a model directory (e.g. a converted sd21)
    python bench/gpu.py --device cpu --size 64 --batches 1 --dtypes float32 --repeats 1   # smoke check

--model: a model directory (default: the bundled ``rdeic/models/rdeic-tiny-demo``) or a preset name, built
with random weights (speed does not depend on the values). bfloat16 runs the UNet, control module
and VAE decoder in bfloat16; the encoder side (VAE encoder, compression module) stays float32 and
the entropy parameters float64 (see docs/codec.md), so both dtypes write the same bitstreams. Peak memory is the most the device's allocator
held during the run, weights included (CUDA only). Training steps run in float32 on a fresh copy
of the model per stage, crops of the stage's default size (at most --size), without the
perceptual term (LPIPS needs AlexNet weights); the median of --repeats steps after one warm-up.
The float32 batch-1 codec row is the baseline of the same run.

On a machine with torch but not the codec's packages, carry them as wheels (Python 3.12):
``diffusers==0.42.1 compressai==1.2.8 pytorch-msssim==1.0.0 importlib-metadata`` (compressai's
cp312 wheel is ``manylinux_2_34``), install them with ``pip install --no-deps --target`` and put
that folder on PYTHONPATH; numpy, Pillow, PyYAML, fsspec and safetensors must be there already.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)

from rdeic.codec import Codec  # noqa: E402
from rdeic.config import from_dict  # noqa: E402
from rdeic.model import RDEIC  # noqa: E402
from rdeic.modeldir import ModelId  # noqa: E402
from rdeic.training import STAGE_DEFAULTS, Trainer, TrainConfig  # noqa: E402
from rdeic.weights import init_model, load_model  # noqa: E402

STAGES = ("stage1", "stage2", "denoiser")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``repeats`` calls after one warm-up."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Peak:
    """The most memory the CUDA allocator held inside the block, in MiB (None on other devices)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.mib = device, None

    def __enter__(self) -> "Peak":
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20


def load(spec: str) -> tuple[RDEIC, ModelId]:
    """A float32 model on the CPU: a model directory, or a preset with random weights."""
    if Path(spec).is_dir():
        return load_model(spec)
    return init_model(spec), ModelId(f"UNTRAINED-rdeic-{spec}", bytes(8))


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def codec_rows(base: RDEIC, model_id: ModelId, args, device: torch.device) -> list[tuple]:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in range(max(args.batches))]
    rows = []
    for name in args.dtypes:
        model = copy.deepcopy(base).to(device)
        if DTYPES[name] != torch.float32:
            model.set_inference_dtype(DTYPES[name])
        for batch in args.batches:
            codec = Codec(model, model_id, device=device, max_batch=batch)
            with Peak(device) as enc_peak:
                enc = timed(lambda: codec.compress(images[:batch]), args.repeats, device)
            data = codec.compress(images[:batch])
            with Peak(device) as dec_peak:
                dec = timed(lambda: codec.decompress(data, steps=args.steps), args.repeats, device)
            rows.append((name, batch, batch / enc, batch / dec, enc_peak.mib, dec_peak.mib))
        del model, codec
        free(device)
    return rows


def train_rows(base: RDEIC, args, device: torch.device) -> list[tuple]:
    rows = []
    for stage in STAGES:
        crop = min(STAGE_DEFAULTS[stage]["crop"], args.size)
        cfg = from_dict(TrainConfig, {
            "stage": stage, "output": "unused", "init_model": args.model, "perceptual": "none",
            "data": {"shards": ["unused.tar"], "crop": crop, "batch_size": args.train_batch}})
        trainer = Trainer(copy.deepcopy(base), cfg, device)
        batch = torch.rand(args.train_batch, 3, crop, crop, generator=torch.Generator().manual_seed(0)) * 2 - 1
        with Peak(device) as peak:
            seconds = timed(lambda: trainer.step(batch), args.repeats, device)
        rows.append((stage, crop, args.train_batch, seconds, peak.mib))
        del trainer
        free(device)
    return rows


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "rdeic" / "models" / "rdeic-tiny-demo"), help="model directory or preset name")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--size", type=int, default=512, help="image side (and the largest training crop)")
    p.add_argument("--batches", type=_ints, default=[1, 8], help="codec batch sizes, comma-separated")
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["float32", "bfloat16"],
                   help=f"codec compute dtypes, comma-separated: {', '.join(DTYPES)}")
    p.add_argument("--steps", type=int, default=2, help="decode steps L")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--no-train", action="store_true", help="codec figures only")
    args = p.parse_args()
    if unknown := [d for d in args.dtypes if d not in DTYPES]:
        p.error(f"unknown dtype {unknown[0]!r}; choose from {', '.join(DTYPES)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or pass --device cpu for a smoke check")

    base, model_id = load(args.model)
    codec = codec_rows(base, model_id, args, device)
    train = [] if args.no_train else train_rows(base, args, device)

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU {platform.machine()}, {torch.get_num_threads()} threads of {os.cpu_count()}")
    print(f"# {where}, torch {torch.__version__}, model {model_id.name}, median of {args.repeats} after a warm-up")
    single = ", one intra-op thread (the codec's deterministic default on CPU)" if device.type == "cpu" else ""
    print(f"## codec: {args.size}x{args.size}, L = {args.steps}, λs = 1{single}")
    print(f"{'dtype':9} {'batch':>5} {'encode img/s':>13} {'decode img/s':>13} {'encode peak MiB':>16} {'decode peak MiB':>16}")
    for name, batch, enc, dec, enc_mib, dec_mib in codec:
        print(f"{name:9} {batch:>5} {enc:13.2f} {dec:13.2f} {_mib(enc_mib):>16} {_mib(dec_mib):>16}")
    if train:
        print("## one training step: float32, AdamW, no perceptual term (stage 2: through all L = 2 steps)")
        print(f"{'stage':9} {'crop':>5} {'batch':>5} {'step s':>9} {'peak MiB':>9}")
        for stage, crop, batch, seconds, mib in train:
            print(f"{stage:9} {crop:>5} {batch:>5} {seconds:9.3f} {_mib(mib):>9}")


if __name__ == "__main__":
    main()
