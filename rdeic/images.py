"""Reading and writing image files for the CLI (the codec itself takes RGB uint8 arrays)."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .bitstream import padded
from .errors import RdeicError


class ImageReadError(RdeicError, ValueError):
    """An input file is not a readable image.

    ``code`` says why, in words shared with the job's reason codes: ``unrecognised_image``,
    ``corrupt_image``, ``too_large`` or ``unsupported_mode``. ``image_format`` is PIL's format name
    when the header was read before the failure, else None.
    """

    def __init__(self, message: str, code: str = "corrupt_image", image_format: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.image_format = image_format


def to_rgb(img: Image.Image) -> np.ndarray:
    """Apply EXIF orientation and convert any mode (L, P, RGBA, CMYK, I;16 ...) to RGB uint8.

    Alpha is composited over white; 16-bit, 32-bit and float modes are scaled to 8 bits from the
    range their values use (see :func:`_peak`), or refused (``unsupported_mode``).
    """
    img = ImageOps.exif_transpose(img)
    try:
        return _convert(img)
    except ValueError as exc:  # PIL has no conversion for this mode
        raise ImageReadError(f"cannot convert mode {img.mode} to RGB: {exc}", "unsupported_mode") from None


def _convert(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") else _peak(arr, img.mode)
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _peak(arr: np.ndarray, mode: str) -> float:
    """The white of a 32-bit integer or float image, from the range its values actually use:
    [0, 1] (float), [0, 255] or [0, 65535]. Anything else has no meaning we can know: refused."""
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 65535:
        raise ValueError(f"its values span [{lo:g}, {hi:g}], not a range of 8-bit, 16-bit or [0, 1] samples")
    for peak in ((1.0,) if mode == "F" else ()) + (255.0, 65535.0):
        if hi <= peak:
            return peak
    return 65535.0


MAX_ASPECT = 256  # long side : short side; beyond, a "photo" is a line, and padding multiplies its cost


def check_size(width: int, height: int, max_pixels: int | None) -> None:
    """Refuse sizes the codec would pay too much for: it computes on sides padded to multiples of 64."""
    pixels = padded(width) * padded(height)
    if max_pixels is not None and pixels > max_pixels:
        raise ImageReadError(f"image is {width}x{height}: {pixels} pixels once padded to multiples of 64, over the "
                             f"limit of {max_pixels}", "too_large")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageReadError(f"image is {width}x{height}: its aspect ratio is over {MAX_ASPECT}:1", "too_large")


def open_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Open image bytes, refusing anything over ``max_pixels`` (padded, see :func:`check_size`) or of an
    extreme aspect ratio before decoding pixels."""
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageReadError("not a recognised image format", "unrecognised_image") from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"refused as a decompression bomb: {exc}", "too_large") from None
    try:
        check_size(*img.size, max_pixels)
    except ImageReadError as exc:
        exc.image_format = img.format
        raise
    try:
        img.load()
    except Image.DecompressionBombError as exc:  # GIF frames and a few other formats are checked here
        raise ImageReadError(f"refused as a decompression bomb: {exc}", "too_large", img.format) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"image data is corrupt or truncated: {exc}", "corrupt_image", img.format) from None
    return img


def format_name(extension: str) -> str:
    """PIL's format name for a file extension (``jpg`` → ``JPEG``); unknown ones upper-cased."""
    return Image.registered_extensions().get("." + extension.lower(), extension.upper())


def read_image(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return to_rgb(open_image(data, max_pixels))
    except ImageReadError as exc:
        raise ImageReadError(f"{path}: {exc}") from None


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def write_image(path: str | os.PathLike, image: np.ndarray) -> None:
    Image.fromarray(image, "RGB").save(path)
