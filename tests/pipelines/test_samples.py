"""Every bad-sample case becomes an error with its reason; odd image modes are converted explicitly."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
from PIL import Image

from pipelines import reasons, samples
from pipelines.samples import prepare, sidecars_from_json
from rdeic import shards
from rdeic.shards import Sample
from tests.helpers import encode, random_image

LIMIT = 4096 * 4096


def _sample(**files) -> Sample:
    return Sample(key="k", index=3, files=files)


@pytest.fixture
def rgb(rng):
    return random_image(rng, 20, 30)


@pytest.mark.parametrize(
    "mode, fmt, expected_mode",
    [("CMYK", "JPEG", "CMYK"), ("P", "PNG", "P"), ("L", "PNG", "L"), ("RGBA", "PNG", "RGBA"), ("LA", "PNG", "LA"),
     ("I;16", "PNG", "I;16"), ("1", "PNG", "1"), ("RGB", "WEBP", "RGB")],
)
def test_modes_are_converted_to_rgb_and_recorded(rgb, mode, fmt, expected_mode):
    p = prepare(_sample(img=b"", **{fmt.lower().replace("jpeg", "jpg"): encode(rgb, fmt, mode)}), LIMIT)
    assert p.error is None, p.error
    assert p.mode == expected_mode
    assert p.image.dtype == np.uint8 and p.image.shape == (20, 30, 3)
    assert p.original_format == fmt


def test_sixteen_bit_values_are_scaled_not_clipped():
    arr = np.full((4, 4), 65535, dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    p = prepare(_sample(png=buf.getvalue()), LIMIT)
    assert p.mode.startswith("I") and int(p.image.min()) == 255


def test_alpha_is_composited_over_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)  # fully transparent black
    p = prepare(_sample(png=encode(rgba, "PNG")), LIMIT)
    assert p.image.min() == 255


def test_exif_orientation_is_applied(rgb):
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    p = prepare(_sample(jpg=buf.getvalue()), LIMIT)
    assert (p.height, p.width) == (30, 20)


@pytest.mark.parametrize(
    "files, reason",
    [
        ({"jpg": b"\xff\xd8 definitely not a jpeg"}, "not a recognised image format"),
        ({"jpg": b""}, "empty image file"),
        ({"json": b"{}", "txt": b"hello"}, "no image file in sample (members: json, txt)"),
    ],
)
def test_bad_samples_have_reasons(files, reason):
    p = prepare(_sample(**files), LIMIT)
    assert p.image is None and reason in p.error
    assert json.loads(p.meta_json) == {k: v.decode() for k, v in files.items() if k in ("json", "txt")}


def test_truncated_image_is_an_error(rgb):
    data = encode(rgb, "PNG")
    p = prepare(_sample(png=data[: len(data) // 2]), LIMIT)
    assert p.image is None and "corrupt or truncated" in p.error


def test_pixel_limit_refuses_bombs(rgb):
    p = prepare(_sample(png=encode(rgb, "PNG")), max_pixels=100)
    assert p.image is None and "over the limit of 100" in p.error


def test_sidecars_roundtrip_bytes_exactly():
    files = {"json": '{"a": "é"}'.encode(), "bin": bytes(range(256)), "txt": b"caption"}
    p = prepare(_sample(png=b"x", **files), LIMIT)
    assert sidecars_from_json(p.meta_json) == files


def _exif(*entries: tuple[int, int, int, bytes]) -> bytes:
    """An APP1 EXIF payload: one little-endian IFD of (tag, type, count, 4-byte value) entries."""
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI4s", *e) for e in entries) + bytes(4)
    return b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd


ROTATE = (0x0112, 3, 1, struct.pack("<HH", 6, 0))  # Orientation = 6, a SHORT as it should be


@pytest.mark.parametrize(
    "bad_tag, exc_name",
    [
        ((0x011A, 7, 3, b"abc\0"), "TypeError"),  # XResolution as UNDEFINED bytes
        ((0x0132, 11, 1, struct.pack("<f", 1.5)), "AttributeError"),  # DateTime as a FLOAT
        ((0x0213, 1, 3, b"\1\2\3\0"), "struct.error"),  # YCbCrPositioning as 3 BYTEs
    ],
)
def test_exif_that_breaks_exif_transpose_is_the_samples_error(bad_tag, exc_name):
    # exif_transpose rewrites the EXIF without the orientation; these tags make that raise
    buf = io.BytesIO()
    Image.new("RGB", (6, 4)).save(buf, format="JPEG", exif=_exif(ROTATE, bad_tag))
    p = prepare(_sample(jpg=buf.getvalue()), LIMIT)
    assert p.image is None and p.error_code == "corrupt_image"
    assert p.error.startswith(f"k.jpg: {exc_name} while decoding: ")
    assert p.original_format == "JPEG"


@pytest.mark.parametrize("exc", [MemoryError(), RuntimeError("decoder bug"), KeyError("x")])
def test_any_exception_while_decoding_is_the_samples_error(monkeypatch, rgb, exc):
    def broken(img):
        raise exc

    monkeypatch.setattr(samples, "to_rgb", broken)
    p = prepare(_sample(png=encode(rgb, "PNG")), LIMIT)
    assert p.image is None and p.error_code == "corrupt_image" and type(exc).__name__ in p.error


@pytest.mark.parametrize(
    "sample, max_pixels, code",
    [
        (Sample("k", 0, {"json": b"{}"}), LIMIT, "no_image"),
        (Sample("k", 0, {"jpg": b""}), LIMIT, "empty_image"),
        (Sample("k", 0, {"jpg": b"\xff\xd8 not a jpeg"}), LIMIT, "unrecognised_image"),
        (Sample("k", 0, {"png": b"\x89PNG\r\n\x1a\n" + bytes(40)}), LIMIT, "unrecognised_image"),
        (Sample("k", 0, {"png": encode(random_image(np.random.default_rng(0), 32, 32), "PNG")[:300]}), LIMIT,
         "corrupt_image"),
        (Sample("k", 0, {"png": encode(np.zeros((8, 8, 3), np.uint8), "PNG")}), 10, "too_large"),
    ],
)
def test_every_error_has_a_known_code(sample, max_pixels, code):
    p = prepare(sample, max_pixels)
    assert p.error and p.error_code == code and code in reasons.CODES


def test_the_readers_error_and_code_are_kept():
    sample = Sample("k", 0, {"png": b"x"}, error="duplicate key 'k'", error_code="duplicate_key")
    p = prepare(sample, LIMIT)
    assert (p.error, p.error_code) == ("duplicate key 'k'", "duplicate_key")


def test_decompression_bombs_are_too_large(monkeypatch, rgb):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses over 2x this
    p = prepare(_sample(png=encode(rgb, "PNG")), LIMIT)
    assert p.error_code == "too_large" and "decompression bomb" in p.error


def test_unconvertible_modes_are_unsupported_mode(monkeypatch):
    monkeypatch.setattr(samples, "open_image", lambda data, max_pixels: Image.new("La", (2, 2)))
    p = prepare(_sample(png=b"x"), LIMIT)
    assert p.image is None and p.error_code == "unsupported_mode" and p.mode == "La"


def test_good_samples_have_no_code(rgb):
    p = prepare(_sample(png=encode(rgb, "PNG")), LIMIT)
    assert p.error is None and p.error_code is None


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"jpg": b"garbage"}, "JPEG"),
        ({"jpeg": b""}, "JPEG"),
        ({"TIF": b"garbage"}, "TIFF"),
        ({"jp2": b"garbage"}, "JPEG2000"),
        ({"pgm": b"garbage"}, "PPM"),
        ({"jpg": encode(np.zeros((4, 4, 3), np.uint8), "PNG")}, "PNG"),  # the bytes win over the name
        ({"jpg": encode(random_image(np.random.default_rng(0), 32, 32), "PNG")[:200]}, "PNG"),  # header read, pixels not
        ({"json": b"{}"}, None),
    ],
)
def test_original_format_is_always_a_pil_format_name(files, expected):
    assert prepare(_sample(**files), LIMIT).original_format == expected


def test_original_format_falls_back_to_the_upper_cased_extension(monkeypatch):
    monkeypatch.setattr(shards, "IMAGE_EXTENSIONS", ("xyz",))
    assert prepare(_sample(xyz=b"garbage"), LIMIT).original_format == "XYZ"


def test_float_and_32_bit_images_use_the_range_their_values_span():
    floats = np.linspace(6, 201, 24 * 32, dtype=np.float32).reshape(24, 32)  # a float TIFF holding 8-bit values
    buf = io.BytesIO()
    Image.fromarray(floats, mode="F").save(buf, format="TIFF")
    p = prepare(_sample(tif=buf.getvalue()), LIMIT)
    assert p.error is None and p.mode == "F"
    assert int(p.image.min()) == 6 and int(p.image.max()) == 201  # not clipped to [0, 1] and so all white
    unit = np.full((8, 8), 0.5, dtype=np.float32)
    buf = io.BytesIO()
    Image.fromarray(unit, mode="F").save(buf, format="TIFF")
    assert int(prepare(_sample(tif=buf.getvalue()), LIMIT).image.max()) == 128  # [0, 1] floats
    odd = np.full((8, 8), -3.0, dtype=np.float32)
    buf = io.BytesIO()
    Image.fromarray(odd, mode="F").save(buf, format="TIFF")
    p = prepare(_sample(tif=buf.getvalue()), LIMIT)
    assert p.error_code == "unsupported_mode" and "[-3, -3]" in p.error


def test_animations_record_their_frame_count(rgb):
    frames = [Image.fromarray(np.roll(rgb, k, axis=1)) for k in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    p = prepare(_sample(gif=buf.getvalue()), LIMIT)
    assert p.error is None and p.frames == 3
    assert prepare(_sample(png=encode(rgb, "PNG")), LIMIT).frames == 1


def test_the_image_is_found_by_the_last_part_of_a_compound_extension(rgb):
    p = prepare(_sample(**{"in.name.jpg": encode(rgb, "JPEG"), "json": b"{}"}), LIMIT)
    assert p.error is None and p.original_format == "JPEG" and json.loads(p.meta_json) == {"json": "{}"}
    p = prepare(_sample(png=encode(rgb, "PNG"), **{"seg.png": encode(rgb, "PNG")}), LIMIT)
    assert p.error is None and "seg.png" in json.loads(p.meta_json)  # the plain extension wins; the mask is a sidecar
