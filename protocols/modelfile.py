"""A signed global model on disk: the arrays plus the coordinator's envelope and signature.

The file is an uncompressed NumPy `.npz` archive. Each parameter is stored under its own name;
two reserved entries, `__weft__.envelope` and `__weft__.signature` (uint8 arrays), hold the signed
`GlobalModelEnvelope`. Reading never unpickles, verifies the signature and checks that the arrays
hash to the envelope's `model_digest`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocols.digest import params_digest
from protocols.envelope import GlobalModelEnvelope, SignedBlob, open_global_model
from protocols.errors import DecodeError
from protocols.identity import PublicKey
from protocols.npz import load_npz, save_npz

RESERVED_PREFIX = "__weft__."
ENVELOPE_ENTRY = RESERVED_PREFIX + "envelope"
SIGNATURE_ENTRY = RESERVED_PREFIX + "signature"
SIGNATURE_BYTES = 64
"""An Ed25519 signature."""


@dataclass(frozen=True)
class SignedModel:
    """A verified global model."""

    envelope: GlobalModelEnvelope
    arrays: dict[str, np.ndarray]


def write_signed_model(path: Path, arrays: Mapping[str, np.ndarray], blob: SignedBlob) -> None:
    """Write `arrays` with their signed envelope, atomically (temp file + rename)."""
    for name in arrays:
        if name.startswith(RESERVED_PREFIX):
            raise ValueError(f"array name {name!r} uses the reserved prefix {RESERVED_PREFIX}")
    entries = dict(arrays)
    entries[ENVELOPE_ENTRY] = np.frombuffer(blob.body, dtype=np.uint8)
    entries[SIGNATURE_ENTRY] = np.frombuffer(blob.signature, dtype=np.uint8)
    save_npz(path, entries)


def _bytes_entry(path: Path, array: np.ndarray, name: str) -> bytes:
    """The bytes of a reserved entry, which must be a 1-D uint8 array."""
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 1:
        got = f"{array.dtype} of shape {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
        raise DecodeError(
            f"{path}: entry {name} must be a 1-D uint8 array, got {got}; "
            "the file was not written by weft or was damaged"
        )
    return array.tobytes()


def read_signed_model(path: Path, coordinator: PublicKey) -> SignedModel:
    """Read, verify the coordinator's signature and the digest; raise ProtocolError otherwise."""
    if path.is_dir():
        raise DecodeError(f"{path} is a folder, not a model file; give the global_model.npz a weft run wrote")
    if not path.is_file():
        raise DecodeError(f"model file {path} does not exist; give the global_model.npz a weft run wrote")
    try:
        entries = load_npz(path)
    except Exception as exc:  # a damaged file may fail in zipfile, numpy or the OS: all mean "not a model file"
        detail = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, DecodeError) and isinstance(exc.__cause__, Exception):  # load_npz's: name the cause once
            detail = " ".join(str(exc.__cause__).split()) or type(exc.__cause__).__name__
        raise DecodeError(f"{path} is not a weft model file: {detail}") from exc
    if ENVELOPE_ENTRY not in entries or SIGNATURE_ENTRY not in entries:
        raise DecodeError(f"{path} carries no signed envelope")
    body = _bytes_entry(path, entries.pop(ENVELOPE_ENTRY), ENVELOPE_ENTRY)
    signature = _bytes_entry(path, entries.pop(SIGNATURE_ENTRY), SIGNATURE_ENTRY)
    if len(signature) != SIGNATURE_BYTES:
        raise DecodeError(
            f"{path}: entry {SIGNATURE_ENTRY} holds {len(signature)} bytes, an Ed25519 signature is {SIGNATURE_BYTES}; "
            "the file was not written by weft or was damaged"
        )
    envelope = open_global_model(SignedBlob(body, signature), coordinator)
    try:
        digest = params_digest(entries)
    except ValueError as exc:  # an array no weft model holds (e.g. complex, text) was added
        raise DecodeError(f"{path}: {exc}") from exc
    if digest != envelope.model_digest:
        raise DecodeError(f"{path}: arrays do not match the signed model digest")
    return SignedModel(envelope, entries)
