"""What the codec spends besides the model: the container's bytes, and the entropy coders' time.

For 512² and 768×512 images at 0.02, 0.05 and 0.1 bpp, streams of both container versions are
written by ``rdeic.bitstream.write`` around the same payload (the hyper indices of the sd21
preset's 14-bit codebook, and a y section filling the rest of the rate), and the container's
bytes (everything but the payload) are printed, and their share of the rate. The model name of
version 1 is ``--name`` (the README's converted model, ``rdeic-2-step2``, by default). Nothing
here is timed, so the figures do not depend on the machine.

``--coders`` adds the entropy coders, measured in one run on the same symbols: compressai's rANS
as the codec calls it (``tolist()`` of the arrays included) and constriction's ANS stack coder
with a quantized Gaussian per symbol (optional: ``pip install constriction==0.5.0``; it writes
other bytes, so it could only come with a new format version). The symbols are the bundled model's,
coding a 512² crop of an example photo (48 channels: 49,152 symbols), and the same repeated to
the sd21 size (320 channels: 327,680 symbols).
Per image: encode and decode milliseconds (median of ``--repeat``), the bytes, and the speed-up of
coding two images in two threads (about 1: the coder holds the GIL) and in two processes.

``--simulate`` runs one actor's coding schedule (``rdeic.coders``: the codec's own
``run_pipelined`` for encode and ``run_lockstep`` for decode, two batches in flight) against a
stand-in for the device: it holds each batch of ``--batch`` images for the FLOP floor of an H100
(sleeping, the GIL released; encode ``--encode-floor-ms`` per image, decode ``--decode-floor-ms``,
of which ``--loop-share`` falls between the checkerboard loop's 2 × 10 chunks and the rest after
it), with the sd21-size symbols above and real compressai coding, inline and in 1 and 2 coder
processes. It prints images/s, their ratio to the stand-in's own rate, and to the goal
min(device rate, processes × one process's coding rate), that rate measured in the same run.

Run: ``python bench/throughput.py [--name rdeic-2-step2] [--coders] [--simulate] [--repeat 5]``;
prints Markdown tables.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rdeic import bitstream as bs  # noqa: E402

SIZES = ((512, 512), (768, 512))
RATES = (0.02, 0.05, 0.1)
INDEX_BITS = 14  # the sd21 preset: 16384 codes


def stream(version: int, width: int, height: int, bpp: float, name: str) -> tuple[int, int]:
    """(stream bytes, container bytes) of one image at about ``bpp``."""
    pw, ph = bs.padded(width), bs.padded(height)
    z = (ph // 64, pw // 64)
    hyper = bytes(-(-z[0] * z[1] * INDEX_BITS // 8))
    y = bytes(max(round(bpp * width * height / 8) - len(hyper), 8))
    header = bs.Header(name if version == 1 else "", bytes(8 if version == 1 else bs.V2_HASH_BYTES), width, height, pw, ph,
                       (ph // 16, pw // 16), z, INDEX_BITS, 1234, 1234, version=version)
    data = bs.write(header, hyper, y)
    return len(data), len(data) - len(hyper) - len(y)


def symbols(n: int):
    """``n`` y symbols and their scale indexes, as the bundled model codes a photo (the example shards'
    first, cropped to 512²; repeated to fill the sd21 size), and the coder's tables."""
    import io
    import tarfile

    import numpy as np
    import torch
    from PIL import Image

    from rdeic.cli import default_model
    from rdeic.codec import Codec

    with tarfile.open(Path(__file__).resolve().parent.parent / "examples" / "shards" / "photos-000000.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith((".jpg", ".png")))
        photo = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))[:512, :512]
    codec = Codec.load(default_model())
    x = codec._to_tensor(photo, 512, 512)[None]
    with torch.no_grad(), codec._numerics():
        feat, _ = codec.model.vae_features(x)
        latent = codec.model.compression.analyse(feat.float())[0]  # the codec's own model side
    sym, idx, tables = latent.symbols, latent.indexes, codec.model.compression.cdf_tables()
    reps = -(-n // len(sym))
    scales = codec.model.compression.gaussian_conditional.scale_table.double().numpy()
    return np.tile(sym, reps)[:n], np.tile(idx, reps)[:n], scales, tables


def compressai_coder(sym, idx, tables):
    from rdeic.entropy import BufferedRansEncoder, RansDecoder

    def encode() -> bytes:
        encoder = BufferedRansEncoder()
        encoder.encode_with_indexes(sym.tolist(), idx.tolist(), *tables)
        return encoder.flush()

    def decode(data: bytes):
        decoder = RansDecoder()
        decoder.set_stream(data)
        return decoder.decode_stream(idx.tolist(), *tables)

    return encode, decode


def constriction_coder(sym, idx, scales):
    import constriction
    import numpy as np

    family = constriction.stream.model.QuantizedGaussian(-1000, 1000)
    means, stds = np.zeros(len(sym)), scales[idx]

    def encode():
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(sym, family, means, stds)
        return coder.get_compressed()

    def decode(data):
        return constriction.stream.stack.AnsCoder(data).decode(family, means, stds)

    return encode, decode


def _median_ms(fn, repeat: int) -> float:
    import statistics
    import time

    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _parallel_speedup(fn, repeat: int) -> tuple[float, float]:
    """Time of 2 images one after the other ÷ time of 2 at once, in 2 threads and in 2 processes."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    one = _median_ms(lambda: (fn(), fn()), repeat)
    with ThreadPoolExecutor(2) as pool:
        threads = _median_ms(lambda: list(pool.map(lambda _: fn(), range(2))), repeat)
    import multiprocessing

    global _JOB
    _JOB = fn  # forked workers inherit it (closures do not pickle)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(_run_job, range(2))  # started and warm
        t0 = time.perf_counter()
        for _ in range(repeat):
            pool.map(_run_job, range(2))
        processes = 1000 * (time.perf_counter() - t0) / repeat
    return one / threads, one / processes


_JOB = None


def _run_job(_: int) -> int:
    _JOB()
    return 0


def coders(repeat: int) -> None:
    import constriction  # noqa: F401  (say early that the optional coder is missing)
    import torch

    print(f"\nEntropy coders, one image's y symbols; median of {repeat}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads available\n")
    print("| coder | symbols | encode ms | decode ms | bytes | 2 threads ÷ 1 (encode) | 2 processes ÷ 1 (encode) |")
    print("|---|---|---|---|---|---|---|")
    for label, n in (("tiny 512²", 32 * 32 * 48), ("sd21 512²", 32 * 32 * 320)):
        sym, idx, scales, tables = symbols(n)
        for name, (encode, decode) in (("compressai rANS", compressai_coder(sym, idx, tables)),
                                       ("constriction ANS", constriction_coder(sym, idx, scales))):
            data = encode()
            assert list(decode(data)) == sym.tolist(), f"{name} did not round-trip"
            enc, dec = _median_ms(encode, repeat), _median_ms(lambda: decode(data), repeat)
            size = len(data) if isinstance(data, bytes) else data.nbytes
            threads, processes = _parallel_speedup(encode, max(repeat // 2, 2))
            print(f"| {name} | {label}: {n:,} | {enc:.1f} | {dec:.1f} | {size:,} | {threads:.2f} | {processes:.2f} |")


CHUNKS = 20  # the sd21 preset's 10 slices × (anchor, non-anchor): one coder round trip each


def simulate(args) -> None:
    import time

    import numpy as np

    from rdeic.coders import InlineCoder, YStream, make_coder, run_lockstep, run_pipelined

    n = 32 * 32 * 320
    sym, idx, _, tables = symbols(n)
    chunks = np.array_split(idx, CHUNKS)
    data = InlineCoder(tables).encode([(sym, idx)]).result()[0]
    batch, count = args.batch, args.batches
    enc_floor, dec_floor = args.encode_floor_ms / 1000, args.decode_floor_ms / 1000
    loop_step = dec_floor * args.loop_share / CHUNKS

    def one_encode() -> None:
        InlineCoder(tables).encode([(sym, idx)]).result()

    def one_decode() -> None:
        session = InlineCoder(tables).open([data])
        for chunk in chunks:
            session.decode([chunk]).result()

    per_process = {"encode": 1000 / _median_ms(one_encode, args.repeat), "decode": 1000 / _median_ms(one_decode, args.repeat)}

    def encode_run(coder) -> float:
        def analyse(_):
            time.sleep(batch * enc_floor)  # the device
            return [(sym, idx)] * batch, None

        t0 = time.perf_counter()
        run_pipelined(range(count), analyse, coder, lambda *_: None)
        return batch * count / (time.perf_counter() - t0)

    def steps():
        for chunk in chunks:
            time.sleep(batch * loop_step)
            values = yield [chunk] * batch
            assert len(values) == batch
        return None

    def decode_run(coder) -> float:
        def done(_):
            time.sleep(batch * dec_floor * (1 - args.loop_share))  # diffusion and the VAE decoder

        t0 = time.perf_counter()
        stream = YStream(data, 4 * n + (64 << 10))  # the codec's safety margin, added by the coder
        run_lockstep((([stream] * batch, steps(), done) for _ in range(count)), coder, finish_in_thread=True)
        return batch * count / (time.perf_counter() - t0)

    device = {"encode": 1 / enc_floor, "decode": 1 / dec_floor}
    print(f"\nOne actor against a stand-in device; {count} batches of {batch} sd21-size images ({n:,} y symbols each); "
          f"encode floor {args.encode_floor_ms} ms/image, decode floor {args.decode_floor_ms} ms/image "
          f"({args.loop_share:.0%} between the {CHUNKS} coder round trips); one process codes "
          f"{per_process['encode']:.1f} encodes/s, {per_process['decode']:.1f} decodes/s (median of {args.repeat})\n")
    print("| direction | coder processes | images/s | ÷ stand-in rate | goal: min(device, processes × one) | ÷ goal |")
    print("|---|---|---|---|---|---|")
    for direction, run in (("encode", encode_run), ("decode", decode_run)):
        for processes in (0, 1, 2):
            coder = make_coder(tables, processes)
            try:
                run(coder) if processes else None  # start the processes and warm them up
                rates = [run(coder) for _ in range(args.rounds)]
            finally:
                coder.close()
            goal = min(device[direction], max(processes, 1) * per_process[direction])
            label = "inline (in the model's thread)" if processes == 0 else str(processes)
            lo, hi = min(rates), max(rates)
            print(f"| {direction} | {label} | {lo:.1f}–{hi:.1f} | {lo / device[direction]:.3f}–{hi / device[direction]:.3f} "
                  f"| {goal:.1f} | {lo / goal:.2f}–{hi / goal:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", default="rdeic-2-step2", help="model name carried by version 1 streams")
    p.add_argument("--coders", action="store_true", help="also time the entropy coders (needs constriction)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--simulate", action="store_true", help="one actor's coding against a stand-in device")
    p.add_argument("--batch", type=int, default=8, help="images per batch of the stand-in (default 8)")
    p.add_argument("--batches", type=int, default=30, help="batches per measured run (default 30)")
    p.add_argument("--rounds", type=int, default=3, help="measured runs per setting; the table gives their range")
    p.add_argument("--encode-floor-ms", type=float, default=1.4, help="H100 FLOP floor of one 512² encode")
    p.add_argument("--decode-floor-ms", type=float, default=4.9, help="H100 FLOP floor of one RDEIC-2 decode")
    p.add_argument("--loop-share", type=float, default=0.1, help="share of the decode floor inside the entropy loop")
    args = p.parse_args()
    print(f"\n`bench/throughput.py`: container bytes around the payload; version 1 with the model name {args.name!r} "
          f"({len(args.name)} bytes), the default seed (the symbols CRC), {INDEX_BITS}-bit hyper indices\n")
    print("| image | bpp | stream bytes | v1 container | v1 % of the rate | v2 container | v2 % of the rate |")
    print("|---|---|---|---|---|---|---|")
    for width, height in SIZES:
        for bpp in RATES:
            total1, c1 = stream(1, width, height, bpp, args.name)
            total2, c2 = stream(2, width, height, bpp, args.name)
            print(f"| {width}×{height} | {bpp} | {total2} | {c1} B | {100 * c1 / total1:.1f} % | {c2} B | {100 * c2 / total2:.1f} % |")
    if args.coders:
        coders(args.repeat)
    if args.simulate:
        simulate(args)


if __name__ == "__main__":
    main()
