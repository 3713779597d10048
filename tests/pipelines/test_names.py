"""The one key → file-name rule (pipelines/names.py)."""

from __future__ import annotations

import pytest

from pipelines import names


@pytest.mark.parametrize(
    "key, stem",
    [
        ("000123", "000123"),
        ("a/b/000123", "a/b/000123"),
        ("../escape", "%2E%2E%2Fescape"),
        ("/etc/passwd", "%2Fetc%2Fpasswd"),
        ("a//b", "a%2F%2Fb"),
        ("a/./b", "a%2F%2E%2Fb"),
        ("new\nline", "new%0Aline"),
        ("nul\x00", "nul%00"),
        ("dot.in.key", "dot%2Ein%2Ekey"),
        (".hidden", "%2Ehidden"),
        ("CON", "%43ON"),
        ("dir/lpt1", "dir/%6Cpt1"),
        ("café", "caf%C3%A9"),
        ("100%", "100%25"),
        ("tilde~", "tilde%7E"),
    ],
)
def test_stems_are_safe_and_reversible(key, stem):
    assert names.stem(key) == stem
    assert names.key_of(stem) == key


def test_long_keys_are_cut_with_a_hash():
    key = "x" * 300
    stem = names.stem(key)
    assert len(stem) == 100 + 1 + 16 and "~" in stem and names.key_of(stem) is None
    assert names.stem("x" * 299 + "y") != stem
    deep = "/".join(["d" * 50] * 5)
    assert len(names.stem(deep)) <= 200 and "/" not in names.stem(deep)
    assert names.stem("%" * 100).endswith("~" + names._digest(b"%" * 100))  # never half an escape before the cut
    assert "%" not in names.stem("%" * 100).split("~")[0][-2:]


def test_sidecars_never_take_the_decoded_images_name():
    image, sidecars = names.sample_files("k", ["png", "PNG", "orig", "orig.png", "", "json", "seg.png"])
    assert image == "k.png"
    assert sidecars == {"png": "k.orig.png", "PNG": "k.orig.PNG", "orig": "k.orig.orig", "orig.png": "k.orig.orig.png",
                        "": "k.orig", "json": "k.json", "seg.png": "k.seg.png"}
    assert len(set(sidecars.values()) | {image}) == 8
