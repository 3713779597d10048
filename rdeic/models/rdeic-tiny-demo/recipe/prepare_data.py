"""Real photographs that ship inside PyPI packages, split into training and held-out sets.

Training shards: scikit-image's colour photos and grey textures. Held out (never trained on):
scikit-image's ``chelsea`` and ``coffee`` and matplotlib's ``grace_hopper``; they become the
evaluation set and the README's example shards.

    python rdeic/models/rdeic-tiny-demo/recipe/prepare_data.py --out out/demo-data --examples examples/shards
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

TRAIN = [  # (package, name, note)
    ("skimage", "astronaut.png", "NASA, public domain"),
    ("skimage", "rocket.jpg", "NASA, public domain"),
    ("skimage", "hubble_deep_field.jpg", "NASA/ESA, public domain"),
    ("skimage", "motorcycle_left.png", "Middlebury stereo, free for research"),
    ("skimage", "retina.jpg", "Häggström, CC0"),
    ("skimage", "ihc.png", "IHC stain, public domain"),
    ("skimage", "camera.png", "grey, public domain"),
    ("skimage", "brick.png", "grey texture, CC0"),
    ("skimage", "grass.png", "grey texture, CC0"),
    ("skimage", "gravel.png", "grey texture, CC0"),
    ("skimage", "coins.png", "grey, public domain"),
    ("skimage", "moon.png", "grey, public domain"),
]
HELD_OUT = [
    ("skimage", "chelsea.png", "Stefan van der Walt, CC0"),
    ("skimage", "coffee.png", "Rachel Michetti, CC0"),
    ("matplotlib", "grace_hopper.jpg", "US Navy, public domain"),
]


def package_file(package: str, name: str) -> Path:
    if package == "skimage":
        import skimage

        return Path(skimage.__file__).parent / "data" / name
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / name


def write_shard(path: Path, samples: list[tuple[str, bytes, str, dict]]) -> None:
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, data, ext, meta in samples:
            for suffix, payload in ((ext, data), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                tar.addfile(info, io.BytesIO(payload))


def sample(entry: tuple[str, str, str]) -> tuple[str, bytes, str, dict]:
    package, name, note = entry
    path = package_file(package, name)
    key = Path(name).stem
    return key, path.read_bytes(), path.suffix.lstrip("."), {"source": f"{package}:{name}", "license": note}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/demo-data")
    p.add_argument("--examples", default="examples/shards")
    args = p.parse_args()
    out = Path(args.out)
    train = [sample(e) for e in TRAIN]
    for i in range(0, len(train), 3):  # several shards so that two workers can split them
        write_shard(out / "train" / f"train-{i // 3:06d}.tar", train[i:i + 3])
    held = [sample(e) for e in HELD_OUT]
    write_shard(out / "val" / "val-000000.tar", held)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    for key, data, _, _ in held:
        Image.open(io.BytesIO(data)).convert("RGB").save(out / "eval" / f"{key}.png")  # lossless, for rdeic eval
    examples = Path(args.examples)
    write_shard(examples / "photos-000000.tar", held[:2])
    write_shard(examples / "photos-000001.tar", held[2:])
    print(f"{len(train)} training photos in {out / 'train'}, {len(held)} held out in {out / 'eval'} and {examples}")


if __name__ == "__main__":
    main()
