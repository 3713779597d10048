"""Helpers shared by tests."""

from __future__ import annotations

import numpy as np


def random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth image with some texture, so the codec sees structure rather than pure noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    freq = rng.uniform(0.01, 0.2, size=3)
    base = np.stack([127 + 100 * np.sin(freq[c] * (xx + yy * (c + 1)) + phase[c]) for c in range(3)], axis=-1)
    noise = rng.normal(0, 20, size=(h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None, **save) -> bytes:
    """Image bytes in a given format (and PIL mode)."""
    import io

    from PIL import Image

    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def write_shard(path, samples: list[dict]) -> None:
    """A WebDataset shard written by the webdataset library itself (samples: {"__key__": ..., ext: bytes})."""
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def make_shards(folder, n_shards: int, per_shard: int, seed: int = 0, size=(64, 96)) -> list[str]:
    """Shards of small photos-like PNGs with a JSON sidecar each; returns all keys."""
    import json
    from pathlib import Path

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            key = f"s{s:02d}_{i:04d}"
            keys.append(key)
            samples.append({"__key__": key, "png": encode(random_image(rng, *size)),
                            "json": json.dumps({"caption": f"sample {key}", "i": i}).encode()})
        write_shard(folder / f"shard-{s:06d}.tar", samples)
    return keys
