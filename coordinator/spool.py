"""Verified updates on disk, so memory stays flat and the aggregate can be recomputed later.

Each accepted update is written to `<dir>/<update digest>-<member>.npz` as soon as it is verified
and dropped from memory, together with the member's signed envelope (reserved entries
`__weft__.envelope` / `__weft__.signature`), so anyone holding the record can re-check every
signature and recompute the aggregate. `in_order()` yields them sorted by (update digest, member id): an order
that depends only on the updates themselves, never on arrival order, node ids or keys.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocols import SignedBlob
from protocols.modelfile import ENVELOPE_ENTRY, RESERVED_PREFIX, SIGNATURE_ENTRY
from protocols.npz import load_npz, save_npz


@dataclass(frozen=True)
class SpooledUpdate:
    """Where one verified update lives, and its weight."""

    member_id: str
    update_digest: bytes
    weight: int
    path: Path

    def load(self) -> dict[str, np.ndarray]:
        """Read the arrays back (without the signed envelope)."""
        return {k: v for k, v in load_npz(self.path).items() if not k.startswith(RESERVED_PREFIX)}


class UpdateSpool:
    """The verified updates of one round."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._entries: list[SpooledUpdate] = []

    def put(
        self, member_id: str, update_digest: bytes, weight: int, arrays: Mapping[str, np.ndarray], signed: SignedBlob
    ) -> None:
        """Write one update and the envelope its member signed to disk."""
        path = self.directory / f"{update_digest.hex()}-{member_id}.npz"
        entries = dict(arrays)
        entries[ENVELOPE_ENTRY] = np.frombuffer(signed.body, dtype=np.uint8)
        entries[SIGNATURE_ENTRY] = np.frombuffer(signed.signature, dtype=np.uint8)
        save_npz(path, entries)
        self._entries.append(SpooledUpdate(member_id, update_digest, weight, path))

    def __len__(self) -> int:
        return len(self._entries)

    def in_order(self) -> Iterator[SpooledUpdate]:
        """The updates in canonical order."""
        yield from sorted(self._entries, key=lambda e: (e.update_digest, e.member_id))
