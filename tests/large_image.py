"""Held-out photos (one also at 6000x4000 camera size) and a watcher of peak memory, for the tiling and demo-model tests."""

from __future__ import annotations

import io
import tarfile
import threading
from pathlib import Path

import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


HELD_OUT = ("chelsea.png", "coffee.png", "grace_hopper.jpg")  # in the example shards; never trained on


def held_out_photo(name: str = "coffee.png") -> Image.Image:
    """One of the example shards' photos (default coffee.png, 600x400), which the demo model never trained on, as RGB."""
    for shard in sorted((ROOT / "examples" / "shards").glob("photos-*.tar")):
        with tarfile.open(shard) as tar:
            if name in tar.getnames():
                return Image.open(io.BytesIO(tar.extractfile(name).read())).convert("RGB")
    raise FileNotFoundError(f"{name} is not in examples/shards")


def camera_photo(path: Path, size=(6000, 4000)) -> Path:
    """The held-out photo resized with Lanczos to ``size``, as JPEG."""
    held_out_photo().resize(size, Image.LANCZOS).save(path, quality=92)
    return path


class PeakRSS:
    """The largest resident set of any process below this one (Ray workers included), sampled every 0.2 s."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.2):
            for child in me.children(recursive=True):
                try:
                    self.peak = max(self.peak, child.memory_info().rss)
                except psutil.Error:
                    pass

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
