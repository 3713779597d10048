"""Every bad-sample case becomes an error with its reason; odd image modes are converted explicitly."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipelines.samples import prepare, sidecars_from_json
from pipelines.shards import Sample
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
