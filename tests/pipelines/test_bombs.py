"""Resource bombs in input shards, each read under a memory cap: a row with its reason, never an allocation.

Each case runs the reader and ``prepare`` (what a compress worker does before the model) in a
child process whose address space is capped at 1 GiB, with the library defaults.
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
from PIL import Image

from tests.helpers import write_shard

CAP = 1 << 30

READ_ALL = textwrap.dedent("""
    import json, sys
    from pipelines.samples import prepare
    from rdeic.shards import ShardReader
    with open(sys.argv[1], "rb") as f:
        out = [(p.key, getattr(p, "error_code", None), p.error) for p in (prepare(s, 4096 * 4096) for s in ShardReader(f))]
    print(json.dumps(out))
""")


def _under_cap(shard) -> list:
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))

    done = subprocess.run([sys.executable, "-c", READ_ALL, str(shard)], capture_output=True, text=True, timeout=120,
                          preexec_fn=cap, cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def _png(size, mode="L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def test_a_strip_of_sixteen_million_pixels_is_refused_by_its_padded_size(tmp_path):
    strip = _png((16_000_000, 1))  # 47 KB, but 16,000,000 x 64 pixels once padded: 12 GB of floats
    write_shard(tmp_path / "s.tar", [{"__key__": "strip", "png": strip}, {"__key__": "ok", "png": _png((64, 48), "RGB")}])
    (key, code, error), ok = _under_cap(tmp_path / "s.tar")
    assert (key, code) == ("strip", "too_large") and "padded" in error
    assert ok[1] is None


def test_an_extreme_aspect_ratio_is_refused(tmp_path):
    write_shard(tmp_path / "s.tar", [{"__key__": "line", "png": _png((4000, 2))}])
    [(key, code, error)] = _under_cap(tmp_path / "s.tar")
    assert code == "too_large" and "aspect ratio" in error


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar to write a sparse member")
def test_a_sparse_member_claiming_gigabytes_is_never_read(tmp_path):
    big = tmp_path / "big.jpg"
    with open(big, "wb") as f:
        f.truncate(3 << 30)  # 3 GiB of holes
    (tmp_path / "big.json").write_text('{"caption": "a bomb"}')
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(tmp_path / "s.tar"), "-C", str(tmp_path), "big.jpg", "big.json"],
                   check=True)
    assert (tmp_path / "s.tar").stat().st_size < 100_000
    [(key, code, error)] = _under_cap(tmp_path / "s.tar")
    assert (key, code) == ("big", "too_large") and str(3 << 30) in error


def test_a_huge_sidecar_is_refused_and_kept_out_of_the_row(tmp_path):
    sidecar = json.dumps({"caption": "x" * (20 << 20)}).encode()  # 20 MiB of JSON: ~40x that once in Parquet
    write_shard(tmp_path / "s.tar", [{"__key__": "k", "png": _png((64, 64), "RGB"), "json": sidecar}])
    [(key, code, error)] = _under_cap(tmp_path / "s.tar")
    assert code == "too_large" and "other files hold" in error


def test_a_huge_member_is_refused_from_its_header(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("k.png")
        info.size = 300 << 20
        tar.addfile(info, io.BytesIO(bytes(np.zeros(300 << 20, dtype=np.uint8))))
    (tmp_path / "s.tar").write_bytes(buf.getvalue())
    del buf
    [(key, code, error)] = _under_cap(tmp_path / "s.tar")
    assert code == "too_large" and "over the limit of" in error
