"""A 6000x4000 camera-size test photo and a watcher of peak memory, shared by the large-image tests."""

from __future__ import annotations

import io
import tarfile
import threading
from pathlib import Path

import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def camera_photo(path: Path, size=(6000, 4000)) -> Path:
    """A held-out photo (coffee.png from the example shards) resized with Lanczos to ``size``, as JPEG."""
    with tarfile.open(ROOT / "examples" / "shards" / "photos-000000.tar") as tar:
        data = tar.extractfile("coffee.png").read()
    Image.open(io.BytesIO(data)).convert("RGB").resize(size, Image.LANCZOS).save(path, quality=92)
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
