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
