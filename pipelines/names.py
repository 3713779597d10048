"""Sample keys → file names: one rule for every output format (folders and WebDataset tars).

A key is any string (it comes from a stranger's tar or a forged archive row). Its file stem is:

1. the key's UTF-8 bytes split at ``/`` into folders, but only if no part is empty, ``.`` or
   ``..``; otherwise the whole key is one name (so nothing is absolute or climbs out);
2. in each part, every byte outside ``A-Z a-z 0-9 _ -`` is written ``%XX`` (dots too: in a
   WebDataset name the first dot starts the extension); a Windows device name (CON, NUL,
   COM1 …) gets its first letter encoded;
3. a part over 120 bytes, or a stem over 200, becomes one name: the first 100 encoded bytes,
   ``~`` and 16 hex digits of the key's SHA-256 (``~`` is never produced by step 2).

Step 2 is reversible (:func:`key_of`); names cut by step 3 are looked up in the unit's marker
(``renamed_keys``) and the archive row. Extensions (the sidecars' ``json``, ``seg.png``) are
encoded the same way but keep their dots, and are cut at 40 bytes.

Decoded images are ``<stem>.png``. An original sidecar keeps its extension unless that could
collide with the decoded image: an extension that is empty, ``png``, or starts with ``orig``
(any case) is written ``orig.<ext>`` (``orig`` for the empty one), so every output name of a
sample is distinct and every sidecar round-trips byte for byte.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import unquote_to_bytes

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_SAFE_EXT = _SAFE | frozenset(b".")
_RESERVED = re.compile(r"con|prn|aux|nul|com[0-9]|lpt[0-9]", re.IGNORECASE)
MAX_PART, MAX_STEM, KEEP, MAX_EXT = 120, 200, 100, 40
IMAGE_EXT = "png"


def _encode(raw: bytes, safe: frozenset[int]) -> str:
    return "".join(chr(b) if b in safe else f"%{b:02X}" for b in raw)


def _part(raw: bytes) -> str:
    text = _encode(raw, _SAFE)
    if _RESERVED.fullmatch(text):
        text = f"%{ord(text[0]):02X}" + text[1:]
    return text


def _digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


def _cut(text: str, keep: int) -> str:
    text = text[:keep]
    return text[: text.rfind("%")] if "%" in text[-2:] else text  # never half an escape


def stem(key: str) -> str:
    """The file stem of a key (no extension), relative, safe on every common file system."""
    raw = key.encode("utf-8", "surrogateescape")
    parts = raw.split(b"/")
    if any(p in (b"", b".", b"..") for p in parts):
        parts = [raw]
    encoded = [_part(p) for p in parts]
    out = "/".join(encoded)
    if len(out) > MAX_STEM or any(len(p) > MAX_PART for p in encoded):
        out = _cut(_part(raw), KEEP) + "~" + _digest(raw)
    return out


def key_of(name_stem: str) -> str | None:
    """The key of a stem made by :func:`stem`, or None for a cut one (look it up instead)."""
    if "~" in name_stem:
        return None
    return unquote_to_bytes(name_stem).decode("utf-8", "surrogateescape")


def extension(ext: str) -> str:
    raw = ext.encode("utf-8", "surrogateescape")
    text = _encode(raw, _SAFE_EXT)
    return text if len(text) <= MAX_EXT else _cut(text, MAX_EXT - 17) + "~" + _digest(raw)


def sidecar_extension(ext: str) -> str:
    """The written extension of an original sidecar: never the decoded image's, never another's."""
    lowered = ext.lower()
    if lowered in ("", IMAGE_EXT) or lowered.startswith("orig"):
        return "orig." + extension(ext) if ext else "orig"
    return extension(ext)


def sample_files(key: str, sidecar_exts: list[str]) -> tuple[str, dict[str, str]]:
    """(decoded image name, {sidecar ext: name}) of one sample."""
    base = stem(key)
    return f"{base}.{IMAGE_EXT}", {ext: f"{base}.{sidecar_extension(ext)}" for ext in sidecar_exts}
