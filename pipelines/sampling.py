"""The audit's deterministic sample: the same seed draws the same panel of images every time.

A row's place in the draw is a hash of the seed and its key, so the panel does not depend on the
order parts are listed or read, and a date as the seed rotates it through the archive. The
sample is stratified over archive parts (one per source shard): each part's quota is its share
of the ok rows, by largest remainder, so a part of few images is not skipped by chance.
"""

from __future__ import annotations

import hashlib


def score(seed: str, key: str) -> int:
    """The row's rank in the draw for ``seed`` (smaller is drawn first)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "big")


def quotas(ok_rows: dict[str, int], n: int) -> dict[str, int]:
    """How many rows to draw from each part: ``n`` split in proportion to each part's ok rows."""
    total = sum(ok_rows.values())
    if n <= 0 or total == 0:
        return {part: 0 for part in ok_rows}
    if n >= total:
        return dict(ok_rows)
    exact = {part: n * count / total for part, count in ok_rows.items()}
    out = {part: int(share) for part, share in exact.items()}
    left = n - sum(out.values())
    by_remainder = sorted(exact, key=lambda part: (-(exact[part] - out[part]), part))
    for part in by_remainder[:left]:
        out[part] += 1
    return out


def draw(keys: list[str], quota: int, seed: str) -> list[int]:
    """Positions of the ``quota`` keys drawn first for ``seed`` (ties, equal keys, by position)."""
    order = sorted(range(len(keys)), key=lambda i: (score(seed, keys[i]), i))
    return sorted(order[:max(quota, 0)])
