"""Turning a WebDataset sample into an RGB image plus the metadata the archive keeps.

Every outcome is a :class:`PreparedSample`; a sample that cannot be coded carries its
reason in ``error`` and still becomes a row of the archive.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass

import numpy as np

from rdeic.images import ImageReadError, open_image, to_rgb

from .shards import Sample

# Extensions taken as the image, in order of preference.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pbm", "pnm", "jp2", "jpx")


@dataclass
class PreparedSample:
    key: str
    index: int
    image: np.ndarray | None  # RGB uint8, None on error
    width: int | None
    height: int | None
    mode: str | None  # the original PIL mode, before conversion to RGB
    original_format: str | None  # PIL format name (JPEG, PNG, ...) or the member's extension
    original_bytes: int
    original_sha256: str | None
    meta_json: str  # the sample's other files: {ext: text} or {ext: {"base64": ...}}
    error: str | None = None


def sidecars_to_json(files: dict[str, bytes]) -> str:
    out: dict[str, object] = {}
    for ext, data in sorted(files.items()):
        try:
            out[ext] = data.decode("utf-8")
        except UnicodeDecodeError:
            out[ext] = {"base64": base64.b64encode(data).decode()}
    return json.dumps(out, ensure_ascii=False, sort_keys=True)


def sidecars_from_json(text: str) -> dict[str, bytes]:
    """Inverse of :func:`sidecars_to_json`: the original sidecar files, byte for byte."""
    out = {}
    for ext, value in json.loads(text or "{}").items():
        out[ext] = base64.b64decode(value["base64"]) if isinstance(value, dict) else value.encode("utf-8")
    return out


def _pick_image(files: dict[str, bytes]) -> str | None:
    lowered = {ext.lower(): ext for ext in files}
    for ext in IMAGE_EXTENSIONS:
        if ext in lowered:
            return lowered[ext]
    return None


def prepare(sample: Sample, max_pixels: int) -> PreparedSample:
    image_ext = _pick_image(sample.files)
    sidecars = {ext: data for ext, data in sample.files.items() if ext != image_ext}
    data = sample.files.get(image_ext, b"") if image_ext else b""
    result = PreparedSample(
        key=sample.key, index=sample.index, image=None, width=None, height=None, mode=None,
        original_format=image_ext, original_bytes=len(data),
        original_sha256=hashlib.sha256(data).hexdigest() if image_ext else None,
        meta_json=sidecars_to_json(sidecars), error=sample.error,
    )
    if result.error:
        return result
    if image_ext is None:
        members = ", ".join(sorted(sample.files)) or "none"
        result.error = f"no image file in sample (members: {members})"
        return result
    if not data:
        result.error = f"empty image file {sample.key}.{image_ext}"
        return result
    try:
        img = open_image(data, max_pixels=max_pixels)
        result.mode, result.original_format = img.mode, img.format or image_ext
        rgb = to_rgb(img)
    except ImageReadError as exc:
        result.error = f"{sample.key}.{image_ext}: {exc}"
        return result
    except (ValueError, OSError) as exc:  # conversions PIL does not support (e.g. LAB)
        result.error = f"{sample.key}.{image_ext}: unsupported image mode {result.mode}: {exc}"
        return result
    result.image = rgb
    result.height, result.width = rgb.shape[:2]
    return result
