"""Model directory names and model ids, without importing torch (job drivers use this).

The id of a model (``ID_ALGORITHM``) is ``<display name>@<16 hex>``; the hex is the first 8 bytes of

    SHA-256( frame(ID_ALGORITHM) + frame(decoding config)
             + for section in ("weights", "entropy_tables"), for each tensor by name (code-point order):
                 frame(JSON [section, name, dtype, shape]) + SHA-256(the tensor's raw bytes) )

where ``frame(b)`` is ``len(b)`` as u32 little-endian followed by ``b``, the decoding config is
config.json without ``name``, ``trained`` and ``tiling`` as compact JSON with sorted keys, JSON has no spaces,
and dtype is the safetensors name (``F16``, ``F32``, ``I64``, ...). Tensors are hashed as stored,
so the id ignores the files' layout and metadata but not a change of storage dtype. It is
computed once, when the directory is written, and stored in ``model_id.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
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
    """The canonical JSON of everything in the config that can change decoding (not ``tiling``: a tiled
    bitstream carries its own tile plan)."""
    data = {k: v for k, v in to_dict(config).items() if k not in ("name", "trained", "tiling")}
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
    start, header = safetensors_header(path)
    return {name: (dtype, shape, _read_chunks(path, start + begin, start + end))
            for name, (dtype, shape, begin, end) in header.items()}


# bytes per element of each safetensors dtype
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_MAX_HEADER = 100 << 20  # the limit of the safetensors library itself
# pickle protocols 2-5 start with PROTO; torch.save writes a zip archive holding a pickle
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def safetensors_header(path: Path) -> tuple[int, dict[str, tuple[str, tuple[int, ...], int, int]]]:
    """(where the data starts, {name: (dtype, shape, begin, end)}) of a safetensors file.

    Checks what the safetensors library checks (sizes matching shapes, contiguous data covering the
    rest of the file), so that ids and loading agree on which files are valid, and says what a file
    is instead when it is not one: empty, truncated, a pickle, other bytes.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)  # the header's length, u64 little-endian, then its first byte, "{"
        n = int.from_bytes(head[:8], "little")
        f.seek(8)
        text = f.read(n) if len(head) == 9 and 0 < n <= min(size - 8, _MAX_HEADER) else b""
    if size == 0:
        raise ModelFormatError(f"{path} is empty (0 bytes), not a safetensors file")
    if not text and head.startswith(_PICKLE_MAGIC):  # (a valid header of 640 bytes starts with 80 02 too)
        raise ModelFormatError(f"{path} holds a pickle, not safetensors: convert it with `rdeic convert-weights`")
    if not text:
        cut = len(head) < 9 or (0 < n <= _MAX_HEADER and head[8:] == b"{")
        what = f"truncated? {size} bytes" if cut else f"{size} bytes without a safetensors header"
        raise ModelFormatError(f"{path} is not a safetensors file ({what})")
    try:
        header = json.loads(text)
        if not isinstance(header, dict):
            raise ValueError(f"a JSON {type(header).__name__}, not an object")
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ModelFormatError(f"{path} is not a safetensors file (its header is not JSON: {exc})") from None
    header.pop("__metadata__", None)
    return 8 + n, _tensor_entries(path, header, size, 8 + n)


def _tensor_entries(path: Path, header: dict, size: int, start: int) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    out = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if dtype not in DTYPE_SIZES or not all(type(d) is int and d >= 0 for d in shape + (begin, end)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise ModelFormatError(f"{path} is not a safetensors file (tensor {name}: malformed entry {entry!r:.200})") from None
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != nbytes:
            raise ModelFormatError(f"{path} is not a safetensors file (tensor {name}: shape {list(shape)} of {dtype} "
                                   f"is {nbytes} bytes, its offsets say {end - begin})")
        out[name] = (dtype, shape, begin, end)
    spans = sorted((begin, end) for _, _, begin, end in out.values())
    ends = [0] + [end for _, end in spans]
    if start + ends[-1] > size:
        raise ModelFormatError(f"{path} is not a safetensors file (truncated? {size} bytes, its header needs {start + ends[-1]})")
    if ends[-1] != size - start or any(begin != previous_end for (begin, _), previous_end in zip(spans, ends)):
        raise ModelFormatError(f"{path} is not a safetensors file (its tensors do not cover its data exactly)")
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
