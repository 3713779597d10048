"""Our model directory format: config JSON + safetensors weights + safetensors entropy tables.

::

    model_dir/
      config.json                  ModelConfig (see rdeic.config)
      model.safetensors            every weight and buffer except the entropy tables
      entropy_tables.safetensors   CDFs, offsets, lengths and scale table of the Gaussian conditional

The model id is ``<name>@<16 hex digits>``: the name from the config, prefixed with
``UNTRAINED-`` for randomly initialised models, and the first 8 bytes of the SHA-256 of the
two safetensors files. Bitstreams carry it; a decoder refuses streams of another model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .compression import ENTROPY_TABLE_KEYS
from .config import ModelConfig, load_preset
from .errors import ModelFormatError
from .model import RDEIC
from .modeldir import (
    CONFIG_FILE,
    TABLES_FILE,
    WEIGHTS_FILE,
    ModelId,
    check_files,
    display_name,
    file_digest,
    model_id_of,
    read_config,
)

__all__ = ["ModelId", "load_model", "save_model", "init_model", "model_id_of", "read_config", "load_state_strict", "describe"]

_TABLE_PREFIX = "compression.gaussian_conditional."


def _split_state(model: RDEIC) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    weights, tables = {}, {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        if key.startswith(_TABLE_PREFIX) and key[len(_TABLE_PREFIX):] in ENTROPY_TABLE_KEYS:
            tables[key[len(_TABLE_PREFIX):]] = value
        else:
            weights[key] = value
    return weights, tables


def save_model(model: RDEIC, directory: str | os.PathLike, storage_dtype: torch.dtype | None = None) -> ModelId:
    """Write a model directory; each file is written beside its name, then renamed into place.

    ``storage_dtype=torch.float16`` halves the files (for bundling); loading casts back to float32,
    on the encoder and the decoder alike.
    """
    if not model.compression.has_entropy_tables():
        model.compression.update()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    weights, tables = _split_state(model)
    if storage_dtype is not None:
        weights = {k: v.to(storage_dtype) if v.is_floating_point() else v for k, v in weights.items()}
    for name, payload in ((WEIGHTS_FILE, weights), (TABLES_FILE, tables)):
        tmp = out / f".{name}.tmp"
        save_file(payload, str(tmp), metadata={"format": "rdeic-archive"})
        os.replace(tmp, out / name)
    (out / CONFIG_FILE).write_text(model.config.to_json() + "\n")
    return ModelId(display_name(model.config), file_digest([out / WEIGHTS_FILE, out / TABLES_FILE]))


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True, assign=True) with a readable error naming the bad keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or bad_shape:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = [f"{len(missing)} missing: {few(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected: {few(unexpected)}" if unexpected else "",
                 f"{len(bad_shape)} with wrong shape: {few(bad_shape)}" if bad_shape else ""]
        raise ModelFormatError(f"{what} does not match the model: " + "; ".join(p for p in parts if p))
    model.load_state_dict(state, strict=True, assign=True)


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> tuple[RDEIC, ModelId]:
    """Load a model directory; the weights are never unpickled (safetensors only)."""
    d = Path(directory)
    config = read_config(d)
    check_files(d)
    with torch.device("meta"):
        model = RDEIC(config)
    state = load_file(str(d / WEIGHTS_FILE), device=str(device))
    tables = load_file(str(d / TABLES_FILE), device=str(device))
    missing = [k for k in ENTROPY_TABLE_KEYS if k not in tables]
    if missing:
        raise ModelFormatError(f"{d / TABLES_FILE} lacks entropy tables {missing}")
    # the table buffers are empty until built; give them the stored sizes before the strict load
    for key in ENTROPY_TABLE_KEYS:
        state[_TABLE_PREFIX + key] = tables[key]
        setattr(model.compression.gaussian_conditional, key, torch.empty_like(tables[key], device="meta"))
    load_state_strict(model, state, str(d / WEIGHTS_FILE))
    model.float()  # weights stored in float16 compute in float32
    if dtype is not None:
        model.set_inference_dtype(dtype)
    model.eval().requires_grad_(False)
    return model, ModelId(display_name(config), file_digest([d / WEIGHTS_FILE, d / TABLES_FILE]))


def init_model(preset_or_config: str | ModelConfig, seed: int = 0) -> RDEIC:
    """A randomly initialised model (UNTRAINED in its id) with entropy tables built."""
    config = load_preset(preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
    torch.manual_seed(seed)
    model = RDEIC(config)
    generator = torch.Generator().manual_seed(seed)
    model.text_context.copy_(torch.randn(model.text_context.shape, generator=generator))
    model.compression.update()
    return model.eval()


def describe(directory: str | os.PathLike) -> dict:
    config = read_config(directory)
    return {"model_id": str(model_id_of(directory)), "config": json.loads(config.to_json())}
