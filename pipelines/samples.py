"""Turning a WebDataset sample into an RGB image plus the metadata the archive keeps.

Every outcome is a :class:`PreparedSample`; a sample that cannot be coded carries its
reason in ``error`` (a message) and ``error_code`` (from :data:`pipelines.reasons.CODES`) and
still becomes a row of the archive. Nothing in the sample's bytes makes :func:`prepare` raise.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass

import numpy as np

from rdeic.images import ImageReadError, format_name, open_image, to_rgb
from rdeic.shards import MAX_SIDECAR_BYTES, Sample, pick_image

from . import reasons


@dataclass
class PreparedSample:
    key: str
    index: int
    image: np.ndarray | None  # RGB uint8, None on error
    width: int | None
    height: int | None
    mode: str | None  # the original PIL mode, before conversion to RGB
    # PIL's format name (JPEG, PNG, ...): of the opened image, else guessed from the extension; None without an image
    original_format: str | None
    original_bytes: int
    original_sha256: str | None
    meta_json: str  # the sample's other files: {ext: text} or {ext: {"base64": ...}}
    error: str | None = None
    error_code: str | None = None  # a key of reasons.CODES, set with error
    frames: int | None = None  # frames in the image file (animated GIF/WebP/PNG, multi-page TIFF): the first is archived

    def fail(self, code: str, message: str) -> PreparedSample:
        """Record why this sample cannot be coded; returns it, for ``return result.fail(...)``."""
        self.error_code, self.error, self.image = reasons.check(code), message, None
        return self


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


def _type_name(exc: BaseException) -> str:
    """``TypeError``, ``struct.error``, ``PIL.Image.DecompressionBombError``: a name that says what raised."""
    kind = type(exc)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def prepare(sample: Sample, max_pixels: int, max_sidecar_bytes: int | None = MAX_SIDECAR_BYTES) -> PreparedSample:
    image_ext = pick_image(sample.files)
    sidecars = {ext: data for ext, data in sample.files.items() if ext != image_ext}
    sidecar_bytes = sum(len(d) for d in sidecars.values())
    if max_sidecar_bytes is not None and sidecar_bytes > max_sidecar_bytes:
        # kept out of the row: in Parquet a sidecar costs tens of times its size in memory
        message = f"the sample's other files hold {sidecar_bytes} bytes, over the limit of {max_sidecar_bytes}"
        sample.fail("too_large", message)
        sidecars = {}
    data = sample.files.get(image_ext, b"") if image_ext else b""
    result = PreparedSample(
        key=sample.key, index=sample.index, image=None, width=None, height=None, mode=None,
        original_format=format_name(image_ext) if image_ext else None, original_bytes=len(data),
        original_sha256=hashlib.sha256(data).hexdigest() if image_ext else None,
        meta_json=sidecars_to_json(sidecars),
    )
    if sample.error:
        return result.fail(sample.error_code or "bad_member", sample.error)  # the reader's error
    if image_ext is None:
        members = ", ".join(sorted(sample.files)) or "none"
        return result.fail("no_image", f"no image file in sample (members: {members})")
    if not data:
        return result.fail("empty_image", f"empty image file {sample.key}.{image_ext}")
    name = f"{sample.key}.{image_ext}"
    try:
        img = open_image(data, max_pixels=max_pixels)
        result.mode, result.original_format = img.mode, img.format or result.original_format
        result.frames = getattr(img, "n_frames", 1)  # an animation is archived as its first frame
        rgb = to_rgb(img)
    except ImageReadError as exc:
        result.original_format = exc.image_format or result.original_format
        return result.fail(exc.code, f"{name}: {exc}")
    except Exception as exc:  # recorded: whatever PIL raises on these bytes (MemoryError too) is this sample's error
        return result.fail("corrupt_image", f"{name}: {_type_name(exc)} while decoding: {str(exc)[:200]}")
    result.image = rgb
    result.height, result.width = rgb.shape[:2]
    return result
