"""A wheel, installed without the source tree, carries the demo model and uses it by default."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import random_image

ROOT = Path(__file__).resolve().parents[2]
# Not part of a build; leaving out .venv and tests keeps the copy small.
SKIP_AT_ROOT = {".git", ".venv", "tests", "build", "dist", "out", "archive", "decoded", ".whl", ".gl", ".pytest_cache", ".benchmarks"}


def _ignore(directory: str, names: list[str]) -> set[str]:
    skip = {n for n in names if n == "__pycache__" or n.endswith((".egg-info", ".pyc"))}
    if Path(directory) == ROOT:
        skip |= SKIP_AT_ROOT & set(names)
    return skip


def _run(*args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_wheel_install_finds_bundled_model(tmp_path, rng):
    pytest.importorskip("setuptools", minversion="68", reason="building the wheel offline (--no-build-isolation) needs "
                        "setuptools>=68 in this environment: pip install -c requirements.lock -e '.[test]'")
    source, wheels, site, work = (tmp_path / n for n in ("src", "wheels", "site", "work"))
    shutil.copytree(ROOT, source, ignore=_ignore)  # a copy, so the build leaves nothing in the shared tree
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", wheels, source)
    [wheel] = wheels.glob("rdeic_archive-*.whl")
    _run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", site, wheel)

    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RDEIC_MODEL", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)  # ahead of the editable install of the source tree in site-packages
    probe = "import rdeic, rdeic.cli; print(rdeic.__file__); print(rdeic.cli.default_model())"
    package, model = _run(sys.executable, "-c", probe, cwd=work, env=env).stdout.splitlines()
    assert Path(package).is_relative_to(site), package
    assert model != "None" and Path(model).is_relative_to(site), model

    Image.fromarray(random_image(rng, 40, 56)).save(work / "in.png")
    rdeic = site / "bin" / "rdeic"
    encoded = _run(rdeic, "encode", "in.png", "in.rdeic", cwd=work, env=env).stdout
    assert "model rdeic-tiny-demo@" in encoded, encoded
    _run(rdeic, "decode", "in.rdeic", "out.png", cwd=work, env=env)
    assert np.asarray(Image.open(work / "out.png")).shape == (40, 56, 3)
