"""Our model directory format: config JSON + safetensors weights + safetensors entropy tables + id.

::

    model_dir/
      config.json                  ModelConfig (see rdeic.config)
      model.safetensors            every weight and buffer except the entropy tables
      entropy_tables.safetensors   CDFs, offsets, lengths and scale table of the Gaussian conditional
      model_id.json                the model id, written last (see rdeic.modeldir for its definition)

The model id is ``<name>@<16 hex digits>``: the name from the config, prefixed with
``UNTRAINED-`` for randomly initialised models, and a digest of the decoding config and every
tensor as stored. Bitstreams carry it; a decoder refuses streams of another model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .compression import ENTROPY_TABLE_KEYS, check_entropy_tables
from .config import ModelConfig, load_preset
from .errors import ModelFormatError
from .model import RDEIC
from .modeldir import (
    CONFIG_FILE,
    ID_FILE,
    TABLES_FILE,
    WEIGHTS_FILE,
    ModelId,
    Tensors,
    canonical_id,
    check_files,
    model_id_of,
    read_config,
    safetensors_header,
    stale_id_message,
    stored_model_id,
    write_id_file,
    write_text_atomic,
)

__all__ = ["ModelId", "load_model", "save_model", "init_model", "model_id_of", "read_config", "load_state_strict",
           "describe", "tensor_index"]

_TABLE_PREFIX = "compression.gaussian_conditional."
# torch dtype -> its name in safetensors headers, which the model id hashes
_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}


def tensor_index(tensors: dict[str, torch.Tensor]) -> Tensors:
    """Tensors in the form :func:`rdeic.modeldir.canonical_id` hashes: dtype name, shape, raw bytes as held."""
    out = {}
    for name, t in tensors.items():
        if t.dtype not in _DTYPE_NAMES:
            raise ModelFormatError(f"tensor {name} has dtype {t.dtype}, which a model directory cannot store")
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        out[name] = (_DTYPE_NAMES[t.dtype], tuple(t.shape), [raw])
    return out


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
    on the encoder and the decoder alike. model_id.json is removed first and written last, so a
    directory interrupted mid-write has no id that could vouch for its files.
    """
    if not model.compression.has_entropy_tables():
        model.compression.update()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / ID_FILE).unlink(missing_ok=True)
    weights, tables = _split_state(model)
    if storage_dtype is not None:
        weights = {k: v.to(storage_dtype) if v.is_floating_point() else v for k, v in weights.items()}
    write_text_atomic(out / CONFIG_FILE, model.config.to_json() + "\n")
    for name, payload in ((WEIGHTS_FILE, weights), (TABLES_FILE, tables)):
        tmp = out / f".{name}.tmp"
        save_file(payload, str(tmp), metadata={"format": "rdeic-archive"})
        shutil.copymode(out / CONFIG_FILE, tmp)  # safetensors creates its files 0600; give them the usual mode
        os.replace(tmp, out / name)
    model_id = canonical_id(model.config, {"weights": tensor_index(weights), "entropy_tables": tensor_index(tables)})
    write_id_file(out, model_id, model.config)
    return model_id


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


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    safetensors_header(path)  # a one-line error saying what the file is, if not safetensors
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise ModelFormatError(f"{path} is not a readable safetensors file: {exc}") from None


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> tuple[RDEIC, ModelId]:
    """Load a model directory and the id of what was loaded; the weights are never unpickled (safetensors only).

    The id is computed from the tensors as loaded (before any cast) and must equal model_id.json's.
    """
    d = Path(directory)
    config = read_config(d)
    check_files(d)
    stored = stored_model_id((d / ID_FILE).read_text(), config, str(d)) if (d / ID_FILE).is_file() else None
    tables = _read_tensors(d / TABLES_FILE)
    check_entropy_tables(tables, config.compression, where=str(d / TABLES_FILE))
    with torch.device("meta"):
        model = RDEIC(config)
    weights = _read_tensors(d / WEIGHTS_FILE)
    # the table buffers are empty until built; give them the stored sizes before the strict load
    for key in ENTROPY_TABLE_KEYS:
        setattr(model.compression.gaussian_conditional, key, torch.empty_like(tables[key], device="meta"))
    state = {**weights, **{_TABLE_PREFIX + k: tables[k] for k in ENTROPY_TABLE_KEYS}}
    load_state_strict(model, state, str(d / WEIGHTS_FILE))
    model_id = canonical_id(config, {"weights": tensor_index(weights), "entropy_tables": tensor_index(tables)})
    if stored is not None and stored != model_id:
        raise ModelFormatError(stale_id_message(str(d), "the weights"))
    model.to(device).float()  # weights stored in float16 compute in float32
    if dtype is not None:
        model.set_inference_dtype(dtype)
    model.eval().requires_grad_(False)
    return model, model_id


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
    return {"model_id": str(model_id_of(directory)), "default_steps": config.diffusion.default_steps,
            "config": json.loads(config.to_json())}
