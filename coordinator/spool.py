"""Verified updates on disk, so memory stays flat and anyone can recompute the aggregate later.

Each accepted update is written as a stored update (protocols.stored: its arrays plus the envelope and
signature its member sent) as soon as it is verified, and dropped from memory. Aggregation then reads them
back one array at a time, in canonical order (protocols.aggregation.canonical_order).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocols import SignedBlob
from protocols.aggregation import RoundInput
from protocols.stored import StoredUpdate, stored_name, write_stored_update


@dataclass(frozen=True)
class SpooledUpdate:
    """Where one verified update lives, and what the policy needs to know about it."""

    member_id: str
    update_digest: bytes
    num_examples: int
    path: Path
    signed: SignedBlob
    """The member's envelope bytes and signature, as received (they go into the ledger)."""
    score: float | None = None
    """Quality score on the coordinator's held-out data (only measured under a quality policy)."""

    def load(self) -> dict[str, np.ndarray]:
        """Read the arrays back (without the signed envelope)."""
        return StoredUpdate(self.path).arrays()

    def as_input(self) -> RoundInput:
        """This update as an input of `aggregate_round` (arrays read lazily from disk)."""
        return RoundInput(self.member_id, self.update_digest, self.num_examples, StoredUpdate(self.path), self.score)


class UpdateSpool:
    """The verified updates of one round."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._entries: list[SpooledUpdate] = []

    def put(
        self,
        member_id: str,
        update_digest: bytes,
        num_examples: int,
        arrays: Mapping[str, np.ndarray],
        signed: SignedBlob,
        score: float | None = None,
    ) -> SpooledUpdate:
        """Write one update and the envelope its member signed to disk."""
        path = self.directory / stored_name(update_digest, member_id)
        write_stored_update(path, arrays, signed)
        entry = SpooledUpdate(member_id, update_digest, num_examples, path, signed, score)
        self._entries.append(entry)
        return entry

    def entries(self) -> list[SpooledUpdate]:
        """The stored updates, in arrival order."""
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def inputs(self) -> list[RoundInput]:
        """Every update as an aggregation input (canonical order is applied by `aggregate_round`)."""
        return [entry.as_input() for entry in self._entries]

    def discard(self) -> None:
        """Delete the round's stored updates (when the record is configured not to keep them)."""
        shutil.rmtree(self.directory, ignore_errors=True)
