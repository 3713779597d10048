"""Entropy tables are checked on load, before compressai's rANS coder (which checks nothing) ever sees them."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from rdeic.compression import ENTROPY_TABLE_KEYS, check_entropy_tables, entropy_buffers
from rdeic.config import load_preset
from rdeic.errors import ModelFormatError
from rdeic.modeldir import compute_model_id, read_config, write_id_file
from rdeic.weights import TABLES_FILE, init_model, load_model
from tests.helpers import random_image

DEMO = Path(__file__).resolve().parents[2] / "rdeic" / "models" / "rdeic-tiny-demo"


def _set(key: str, index, value):
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[key][index] = value
    return edit


def _replace(key: str, make):
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[key] = make(t[key])
    return edit


def _cut_all(rows: int):
    def edit(t: dict[str, torch.Tensor]) -> None:
        for k in t:
            t[k] = t[k][:rows].clone()
    return edit


# (edit of the stored tables, what the one-line error says); row 3 of the tiny tables has length 5
CORRUPTIONS = {
    "all_zero_cdf": (_replace("_quantized_cdf", torch.zeros_like), "row 0 of _quantized_cdf ends at 0"),
    "two_row_cdf": (_replace("_quantized_cdf", lambda v: v[:2].clone()), "_quantized_cdf has shape (2, 3133)"),
    "two_rows_everywhere": (_cut_all(2), "scale_table has shape (2,), but the config's scale table has 64"),
    "offsets_minus_1e9": (_replace("_offset", lambda v: torch.full_like(v, -10**9)), "_offset[0] is -1000000000"),
    "nan_scale_table": (_set("scale_table", 5, math.nan), "scale_table is not finite"),
    "decreasing_scale_table": (_set("scale_table", 5, 0.01), "scale_table is not the one the config implies"),
    "other_scale_table": (_replace("scale_table", lambda v: v * 2), "scale_table is not the one the config implies"),
    "non_monotone_row": (_set("_quantized_cdf", (3, 2), 0), "row 3 of _quantized_cdf is not increasing"),
    "flat_row": (_set("_quantized_cdf", (3, 2), 1), "row 3 of _quantized_cdf is not increasing"),
    "row_not_starting_at_0": (_set("_quantized_cdf", (3, 0), 1), "row 3 of _quantized_cdf starts at 1, not 0"),
    "wrong_final_value": (_set("_quantized_cdf", (3, 4), 65535), "row 3 of _quantized_cdf ends at 65535"),
    "length_1": (_set("_cdf_length", 3, 1), "_cdf_length[3] is 1, outside [2, 3133]"),
    "length_past_width": (_set("_cdf_length", 3, 3134), "_cdf_length[3] is 3134, outside [2, 3133]"),
    "negative_length": (_set("_cdf_length", 3, -7), "_cdf_length[3] is -7"),
    "short_offsets": (_replace("_offset", lambda v: v[:63].clone()), "_offset has shape (63,), expected (64,)"),
    "2d_lengths": (_replace("_cdf_length", lambda v: v.reshape(8, 8).clone()), "_cdf_length has shape (8, 8)"),
    "float_cdf": (_replace("_quantized_cdf", lambda v: v.float()), "_quantized_cdf has dtype float32, expected int32"),
    "int64_offsets": (_replace("_offset", lambda v: v.long()), "_offset has dtype int64, expected int32"),
    "narrow_cdf": (_replace("_quantized_cdf", lambda v: v[:, :4].clone()), "_cdf_length[0] is 5, outside [2, 4]"),
    "missing_key": (lambda t: t.pop("_offset"), "lacks _offset"),
    "extra_key": (lambda t: t.update(extra=torch.zeros(1)), "holds unexpected tensors ['extra']"),
}


def corrupt(directory: Path, edit) -> None:
    """Edit the stored tables and store a matching id, as a hostile directory would."""
    tables = load_file(str(directory / TABLES_FILE))
    edit(tables)
    save_file(tables, str(directory / TABLES_FILE))
    write_id_file(directory, compute_model_id(directory), read_config(directory))


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, out)
    return out


def test_tables_the_model_builds_pass():
    model = init_model("tiny")
    check_entropy_tables(model.compression.entropy_tables(), model.config.compression)
    config = load_preset("sd21").compression
    built = entropy_buffers(config)
    check_entropy_tables({k: built[k] for k in ENTROPY_TABLE_KEYS}, config)


def test_bundled_demo_tables_pass():
    tables = load_file(str(DEMO / TABLES_FILE))
    t0 = time.perf_counter()
    check_entropy_tables(tables, read_config(DEMO).compression)
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_tables_are_refused_in_one_line(model_copy, name):
    edit, message = CORRUPTIONS[name]
    corrupt(model_copy, edit)
    t0 = time.perf_counter()
    with pytest.raises(ModelFormatError) as info:
        load_model(model_copy)
    assert time.perf_counter() - t0 < 1.0
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"{model_copy / TABLES_FILE}: "), text
    assert message in text, text


def test_tables_loaded_into_a_module_are_checked_too(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    tables = model.compression.entropy_tables()
    tables["_quantized_cdf"] = torch.zeros_like(tables["_quantized_cdf"])
    with pytest.raises(ModelFormatError, match="row 0 of _quantized_cdf ends at 0"):
        model.compression.load_entropy_tables(tables)


def test_tables_changed_in_memory_never_reach_the_coder(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    model.compression.gaussian_conditional._quantized_cdf[3, 4] = 65535  # wrong, but would not crash the coder
    model.compression._cdf_lists = None
    feat = torch.randn(1, model.config.compression.in_channels, 8, 8)
    with pytest.raises(ModelFormatError, match="row 3 of _quantized_cdf ends at 65535"):
        model.compression.compress(feat)


@pytest.mark.parametrize("name", ["all_zero_cdf", "two_row_cdf", "offsets_minus_1e9"])
def test_cli_on_corrupt_tables_exits_2_without_a_signal_or_a_hang(model_copy, tmp_path, rng, name):
    edit, message = CORRUPTIONS[name]
    corrupt(model_copy, edit)
    image = tmp_path / "in.png"
    Image.fromarray(random_image(rng, 64, 64)).save(image)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "rdeic.cli", "encode", str(image), str(tmp_path / "o.rdeic"), "--model", str(model_copy)]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("rdeic encode hung for 60 s")
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


_HUGE_LATENTS = """
import sys, torch
from rdeic.weights import init_model
module = init_model("tiny").compression
with torch.no_grad():
    for p in module.g_a.parameters():
        p.mul_(float(sys.argv[1]))
module.compress(torch.randn(1, module.config.in_channels, 8, 8))
"""


@pytest.mark.parametrize("factor", ["nan", "1e6"])
def test_latents_beyond_the_coders_range_are_refused_without_a_hang(factor):
    """The coder's escape code never ends on values of 2**27 or more (NaN becomes -2**31)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([sys.executable, "-c", _HUGE_LATENTS, factor], capture_output=True, text=True, env=env,
                              timeout=60, cwd=Path(__file__).resolve().parents[2])
    except subprocess.TimeoutExpired:
        pytest.fail("compress hung for 60 s")
    assert proc.returncode == 1 and "ModelFormatError: the model's latents are NaN or beyond" in proc.stderr, proc.stderr
