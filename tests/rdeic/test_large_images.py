"""A 6000x4000 photo through the CLI on the bundled tiny demo model: tiled, in bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.large_image import PeakRSS, camera_photo

pytestmark = pytest.mark.slow

# Tiled, the tiny model's encode grows by ~40 MiB per megapixel above ~1.1 GiB (docs/performance.md):
# 6000x4000 peaks near 2.1 GiB. Untiled, 2048x2048 alone took 3.0 GiB to decode, and a 6000x4000
# encode before tiling peaked at 7.3 GiB.
MEMORY_BOUND = 3 << 30


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rdeic.cli", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)


def test_a_camera_photo_encodes_tiled_through_the_cli_in_bounded_memory(tmp_path):
    photo = camera_photo(tmp_path / "camera.jpg")
    with PeakRSS() as memory:
        proc = _cli("encode", photo, tmp_path / "camera.rdeic")
    assert proc.returncode == 0, proc.stderr
    assert "6000x4000" in proc.stdout
    assert 0 < memory.peak < MEMORY_BOUND, f"peak RSS {memory.peak / 2**30:.2f} GiB"
    info = json.loads(_cli("info", tmp_path / "camera.rdeic", "--json").stdout)
    assert info["size"] == [6000, 4000] and info["tiles"] == {"tile": 64, "overlap": 16}
    assert info["over_default_max_pixels"] is False  # decoders take it by default
