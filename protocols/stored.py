"""Stored updates: each accepted update, exactly as its member signed it, beside the ledger.

`rounds/NNNN/updates/<update digest hex>-<member id>.npz` (docs/PROTOCOL.md, "Stored updates") holds the
update's arrays under their own names plus two reserved entries, `__weft__.envelope` and
`__weft__.signature` (uint8 vectors): the member's signed envelope bytes and its Ed25519 signature. Anyone
holding the file can check the signature against the manifest, the arrays against the signed digest, and
recompute the round's aggregate from these files alone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocols.envelope import SignedBlob
from protocols.errors import DecodeError
from protocols.modelfile import ENVELOPE_ENTRY, RESERVED_PREFIX, SIGNATURE_ENTRY
from protocols.npz import save_npz

NAME = re.compile(r"(?P<digest>[0-9a-f]{64})-(?P<member>[0-9a-f]{16})\.npz")


def stored_name(update_digest: bytes, member_id: str) -> str:
    """The file name of a stored update."""
    return f"{update_digest.hex()}-{member_id}.npz"


def write_stored_update(path: Path, arrays: Mapping[str, np.ndarray], signed: SignedBlob) -> None:
    """Write one update with its member's signed envelope (atomic, owner-only)."""
    entries = dict(arrays)
    entries[ENVELOPE_ENTRY] = np.frombuffer(signed.body, dtype=np.uint8)
    entries[SIGNATURE_ENTRY] = np.frombuffer(signed.signature, dtype=np.uint8)
    save_npz(path, entries)


@dataclass(frozen=True)
class StoredUpdate:
    """A stored update on disk, read one array at a time (an `UpdateSource`)."""

    path: Path

    def array(self, name: str) -> np.ndarray:
        """The update's array `name` (never one of the reserved entries)."""
        if name.startswith(RESERVED_PREFIX):
            raise KeyError(name)
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                return np.asarray(npz[name])
        except KeyError:
            raise
        except Exception as exc:  # a damaged file fails in zipfile or numpy: report it as such
            raise DecodeError(f"{self.path}: cannot read array {name!r} ({type(exc).__name__})") from exc

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array of the update (without the signed envelope)."""
        return {name: value for name, value in self._entries().items() if not name.startswith(RESERVED_PREFIX)}

    def signed(self) -> SignedBlob:
        """The member's envelope bytes and signature, as received."""
        entries = self._entries()
        try:
            body, signature = entries[ENVELOPE_ENTRY], entries[SIGNATURE_ENTRY]
        except KeyError as exc:
            raise DecodeError(f"{self.path}: no signed envelope") from exc
        if body.dtype != np.uint8 or signature.dtype != np.uint8 or body.ndim != 1 or signature.ndim != 1:
            raise DecodeError(f"{self.path}: the envelope and signature entries must be uint8 vectors")
        return SignedBlob(body.tobytes(), signature.tobytes())

    def _entries(self) -> dict[str, np.ndarray]:
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                return {name: np.asarray(npz[name]) for name in npz.files}
        except Exception as exc:
            raise DecodeError(f"{self.path}: not a stored update ({type(exc).__name__})") from exc
