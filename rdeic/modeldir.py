"""Model directory names and model ids, without importing torch (job drivers use this).

The id of a model (``ID_ALGORITHM``) is ``<display name>@<16 hex>``; the hex is the first 8 bytes of

    SHA-256( frame(ID_ALGORITHM) + frame(decoding config)
             + for section in ("weights", "entropy_tables"), for each tensor by name (code-point order):
                 frame(JSON [section, name, dtype, shape]) + SHA-256(the tensor's raw bytes) )

where ``frame(b)`` is ``len(b)`` as u32 little-endian followed by ``b``, the decoding config is
config.json without ``name`` and ``trained`` as compact JSON with sorted keys, JSON has no spaces,
and dtype is the safetensors name (``F16``, ``F32``, ``I64``, ...). Tensors are hashed as stored,
so the id ignores the files' layout and metadata but not a change of storage dtype. It is
computed once, when the directory is written, and stored in ``model_id.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from .config import ModelConfig, to_dict
from .errors import ModelFormatError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TABLES_FILE = "entropy_tables.safetensors"
ID_FILE = "model_id.json"
ID_ALGORITHM = "rdeic-model-id/2"
SECTIONS = {"weights": WEIGHTS_FILE, "entropy_tables": TABLES_FILE}

# name -> (safetensors dtype, shape, the raw bytes as an iterable of buffers)
Tensors = Mapping[str, tuple[str, tuple[int, ...], Iterable]]


@dataclass(frozen=True)
class ModelId:
    name: str  # display name, "UNTRAINED-..." for random weights
    digest: bytes  # 8 bytes

    def __str__(self) -> str:
        return f"{self.name}@{self.digest.hex()}"

    @classmethod
    def parse(cls, text: str) -> "ModelId":
        name, _, hexdigest = text.rpartition("@")
        return cls(name, bytes.fromhex(hexdigest))


def display_name(config: ModelConfig) -> str:
    return config.name if config.trained else f"UNTRAINED-{config.name}"


def decoding_config(config: ModelConfig) -> bytes:
    """The canonical JSON of everything in the config that can change decoding."""
    data = {k: v for k, v in to_dict(config).items() if k not in ("name", "trained")}
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _frame(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def canonical_id(config: ModelConfig, sections: Mapping[str, Tensors]) -> ModelId:
    """The model id of a config and its tensors (``sections``: "weights" and "entropy_tables")."""
    h = hashlib.sha256(_frame(ID_ALGORITHM.encode()) + _frame(decoding_config(config)))
    for section in SECTIONS:
        tensors = sections[section]
        for name in sorted(tensors):
            dtype, shape, chunks = tensors[name]
            h.update(_frame(json.dumps([section, name, dtype, list(shape)], separators=(",", ":")).encode()))
            inner = hashlib.sha256()
            for chunk in chunks:
                inner.update(chunk)
            h.update(inner.digest())
    return ModelId(display_name(config), h.digest()[:8])


# ------------------------------------------------------------ safetensors files


def _read_chunks(path: Path, start: int, end: int, size: int = 1 << 24) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        while start < end:
            chunk = f.read(min(size, end - start))
            if not chunk:
                raise ModelFormatError(f"{path} is not a readable safetensors file: it ends early")
            start += len(chunk)
            yield chunk


def safetensors_index(path: Path) -> Tensors:
    """The tensors of a safetensors file, read lazily from its header (no torch, no unpickling)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        try:
            (n,) = struct.unpack("<Q", f.read(8))
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} in a file of {size} bytes")
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            out = {}
            for name, entry in header.items():
                begin, end = entry["data_offsets"]
                if not 0 <= begin <= end <= size - 8 - n:
                    raise ValueError(f"the data of {name} lies outside the file")
                out[name] = (entry["dtype"], tuple(entry["shape"]), _read_chunks(path, 8 + n + begin, 8 + n + end))
        except (struct.error, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelFormatError(f"{path} is not a readable safetensors file: {exc}") from None
    return out


# ------------------------------------------------------------ directories


def read_config(directory: str | os.PathLike) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ModelFormatError(f"{directory} is not a model directory: {CONFIG_FILE} is missing")
    return ModelConfig.from_json(path.read_text())


def check_files(directory: str | os.PathLike) -> None:
    d = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE, TABLES_FILE):
        if not (d / name).is_file():
            raise ModelFormatError(f"{d} is not a complete model directory: {name} is missing")


def compute_model_id(directory: str | os.PathLike) -> ModelId:
    """The id from config.json and every tensor of the directory (reads all weights)."""
    d = Path(directory)
    config = read_config(d)
    check_files(d)
    return canonical_id(config, {section: safetensors_index(d / name) for section, name in SECTIONS.items()})


def stale_id_message(where: str, what: str) -> str:
    return (f"{what} of {where} changed after {ID_FILE} was written: restore them, or if the change is "
            f"intended store the new id with `rdeic model-id {where} --write`")


def id_file_text(model_id: ModelId, config: ModelConfig) -> str:
    config_sha = hashlib.sha256(decoding_config(config)).hexdigest()
    data = {"algorithm": ID_ALGORITHM, "model_id": str(model_id), "config_sha256": config_sha}
    return json.dumps(data, indent=2) + "\n"


def stored_model_id(id_text: str, config: ModelConfig, where: str) -> ModelId:
    """The id in a model_id.json, checked against config.json (name and decoding config)."""
    try:
        data = json.loads(id_text)
        algorithm, model_id = data["algorithm"], ModelId.parse(data["model_id"])
        config_sha = data["config_sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFormatError(f"{where}/{ID_FILE} is malformed ({exc}); rewrite it: `rdeic model-id {where} --write`") from None
    if algorithm != ID_ALGORITHM:
        raise ModelFormatError(f"{where}/{ID_FILE} uses {algorithm!r}, this version knows {ID_ALGORITHM!r}")
    if config_sha != hashlib.sha256(decoding_config(config)).hexdigest() or model_id.name != display_name(config):
        raise ModelFormatError(stale_id_message(where, CONFIG_FILE))
    return model_id


def write_id_file(directory: str | os.PathLike, model_id: ModelId, config: ModelConfig) -> None:
    write_text_atomic(Path(directory) / ID_FILE, id_file_text(model_id, config))


def write_text_atomic(path: Path, text: str) -> None:
    """Written beside its name, then renamed into place (so with the mode of any new file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


_told: set[str] = set()


def model_id_of(directory: str | os.PathLike) -> ModelId:
    """The model's id from model_id.json and config.json; never reads the weights when the id file exists."""
    d = Path(directory)
    config = read_config(d)
    if (d / ID_FILE).is_file():
        return stored_model_id((d / ID_FILE).read_text(), config, str(d))
    model_id = compute_model_id(d)
    if str(d.resolve()) not in _told:
        _told.add(str(d.resolve()))
        log.warning("%s has no %s, so its id was computed from all its weights; store it once with "
                    "`rdeic model-id %s --write`", d, ID_FILE, d)
    return model_id


def legacy_digest(directory: str | os.PathLike) -> bytes:
    """The digest ids had before rdeic-model-id/2 (SHA-256 of the two safetensors files); old bitstreams carry it."""
    h = hashlib.sha256()
    for name in (WEIGHTS_FILE, TABLES_FILE):
        path = Path(directory) / name
        for chunk in _read_chunks(path, 0, path.stat().st_size):
            h.update(chunk)
    return h.digest()[:8]
