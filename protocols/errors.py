"""Errors raised at the border. Each names what was wrong, so a caller can report it as is."""


class ProtocolError(Exception):
    """Base class for every error raised by `protocols`."""


class DecodeError(ProtocolError):
    """Bytes that are not a valid encoding of the expected structure."""


class SignatureError(ProtocolError):
    """A signature that does not verify under the expected key and domain."""


class KeyFileError(ProtocolError):
    """A key file that is missing, unreadable, of the wrong kind or too widely readable."""


class ManifestError(ProtocolError):
    """A federation manifest that is malformed; the message names the field."""


class WeakKeyError(ProtocolError, ValueError):
    """An Ed25519 public key encoding that weft refuses: small-order, non-canonical or not on the curve."""


class ManifestDecodeError(ManifestError, DecodeError):
    """Manifest bytes that cannot be read as one: not UTF-8, not JSON, nested too deep, too large, not an object."""
