"""Model directory names and model ids, without importing torch (job drivers use this)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .config import ModelConfig
from .errors import ModelFormatError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TABLES_FILE = "entropy_tables.safetensors"


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


def file_digest(paths: list[Path]) -> bytes:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.digest()[:8]


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


def model_id_of(directory: str | os.PathLike) -> ModelId:
    d = Path(directory)
    config = read_config(d)
    check_files(d)
    return ModelId(display_name(config), file_digest([d / WEIGHTS_FILE, d / TABLES_FILE]))
