"""Error types. Every error a user can cause has its own class and a one-line message."""


class RdeicError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(RdeicError, ValueError):
    """A configuration is malformed: unknown or missing keys, or values out of range."""


class ModelFormatError(RdeicError, ValueError):
    """A model directory is missing files or holds tensors that do not match its config."""


class BitstreamError(RdeicError, ValueError):
    """Base class of every reason a bitstream is refused."""


class BadMagicError(BitstreamError):
    """The data does not start with the RDEIC magic bytes."""


class UnsupportedVersionError(BitstreamError):
    """The container's format version is newer (or older) than this decoder supports."""


class TruncatedError(BitstreamError):
    """The data ends before the container says it should."""


class ChecksumError(BitstreamError):
    """The CRC32 over header and payload does not match: the bytes were altered."""


class ModelMismatchError(BitstreamError):
    """The bitstream was written by a model other than the one decoding it."""


class EntropyDesyncError(BitstreamError):
    """The decoded symbols do not match the encoder's: decoding would give a wrong image."""


class ImageTooLargeError(BitstreamError):
    """The bitstream claims an image over the decoder's pixel limit: refused before any allocation."""


class SectionTableError(BitstreamError):
    """The section table is not the format's: a wrong count, an unknown, repeated or misplaced tag."""


class HeaderError(BitstreamError):
    """A header field holds a value the format does not allow, or one that contradicts another field."""


class PayloadError(BitstreamError):
    """A section holds values the model cannot have written, e.g. a codebook index past the codebook's end."""
