"""What the codec spends besides the model: today, the container's bytes (issue 11's first figure).

For 512² and 768×512 images at 0.02, 0.05 and 0.1 bpp, streams of both container versions are
written by ``rdeic.bitstream.write`` around the same payload (the hyper indices of the sd21
preset's 14-bit codebook, and a y section filling the rest of the rate), and the container's
bytes (everything but the payload) are printed, and their share of the rate. The model name of
version 1 is ``--name`` (the README's converted model, ``rdeic-2-step2``, by default). Nothing
here is timed, so the figures do not depend on the machine.

Run: ``python bench/throughput.py [--name rdeic-2-step2]``; prints a Markdown table.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", default="rdeic-2-step2", help="model name carried by version 1 streams")
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


if __name__ == "__main__":
    main()
