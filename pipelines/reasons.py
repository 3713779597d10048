"""Why a sample, a row or a unit did not succeed: stable reason codes, and which failures are whose.

Two kinds of failure, handled differently everywhere in the jobs:

* **sample failures** belong to one input (bad image bytes, a forged bitstream, a duplicate key):
  they become that sample's row (compress) or that key's entry in ``failed_keys`` (decode), with
  a code from :data:`CODES` and a message, and the unit is committed;
* **infrastructure failures** belong to the worker or the storage (device errors, out of memory
  on a sane input, storage I/O, a wrong model): they fail the unit's *attempt*, which is retried
  on another worker and never committed half-done. :class:`InfraError` carries them.

Histograms and summaries group by code, never by message text (messages hold keys and numbers).
"""

from __future__ import annotations

CODES: dict[str, str] = {
    # compress: one input sample
    "no_image": "the sample has no image file",
    "empty_image": "the image file is empty",
    "unrecognised_image": "the image bytes are not a format Pillow recognises",
    "corrupt_image": "the image is truncated, corrupt, or its decoder raised",
    "too_large": "over a limit: pixels (padded), aspect ratio, bytes of a member or of a sample's sidecars, "
                 "or the size a bitstream claims",
    "unsupported_mode": "the image's mode cannot be converted to RGB",
    "duplicate_key": "a second sample with the same key in one shard",
    "bad_member": "a tar member of the sample is truncated or corrupt",
    "bad_name": "a tar member is not named <key>.<extension> (no extension, or a name starting with a dot)",
    "not_a_file": "a tar member of the sample is a link, FIFO or device, not a regular file",
    "encode_failed": "the codec refused the image",
    # decode: one archive row
    "error_row": "the archive row is itself an error from compress time",
    "bad_row": "the archive row's other fields are malformed (e.g. meta_json)",
    "bitstream_refused": "the bitstream fails its checks (magic, version, length, CRC)",
    "model_mismatch": "the bitstream was written by another model",
    "entropy_desync": "entropy decoding gave other symbols than the encoder's",
}


def check(code: str) -> str:
    if code not in CODES:
        raise ValueError(f"unknown reason code {code!r}; known: {sorted(CODES)}")
    return code


class InfraError(RuntimeError):
    """A failure of the worker, device, storage or model: retry the unit elsewhere, never commit it."""


_DEVICE_WORDS = ("cuda", "cudnn", "cublas", "nccl", "device-side", "hip error", "xpu", "mps")


def is_device_error(exc: BaseException) -> bool:
    """A failure of the accelerator or its driver, whatever the input: never a sample's fault."""
    return is_out_of_memory(exc) or (isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in _DEVICE_WORDS))


def is_out_of_memory(exc: BaseException) -> bool:
    """CPU MemoryError or a CUDA/accelerator allocation failure (torch raises RuntimeError subclasses)."""
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
