"""GPU throughput of the codec at 512²: encode and decode images/s, batch 1 and 8, fp32 and bf16.

    python bench/gpu.py [--model DIR] [--steps 2] [--repeats 5]

Without --model the `sd21` preset is built with random weights (speed does not depend on the
values). bf16 runs the VAE, UNet and control module in bfloat16; the compression module and
its entropy coding stay in float32/float64 (see docs/codec.md), so bitstreams are identical.
Prints one table; the fp32 batch-1 row is the baseline of the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)

from rdeic.codec import Codec  # noqa: E402
from rdeic.modeldir import ModelId  # noqa: E402
from rdeic.weights import init_model, load_model  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA device")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(8)]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        if args.model:
            model, model_id = load_model(args.model, device="cuda", dtype=dtype)
        else:
            model, model_id = init_model("sd21"), ModelId("UNTRAINED-rdeic-sd21", bytes(8))
            model.to("cuda").set_inference_dtype(dtype)
        for batch in (1, 8):
            codec = Codec(model, model_id, device="cuda", max_batch=batch)
            data = codec.compress(images[:batch])
            enc = timed(lambda: codec.compress(images[:batch]), args.repeats)
            dec = timed(lambda: codec.decompress(data, steps=args.steps), args.repeats)
            rows.append((str(dtype).split(".")[-1], batch, batch / enc, batch / dec))
        del model
        torch.cuda.empty_cache()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, 512x512, L = {args.steps}, λs = 1, "
          f"median of {args.repeats} after a warm-up")
    print(f"{'dtype':9} {'batch':>5} {'encode img/s':>13} {'decode img/s':>13}")
    for dtype, batch, enc, dec in rows:
        print(f"{dtype:9} {batch:>5} {enc:13.2f} {dec:13.2f}")


if __name__ == "__main__":
    main()
