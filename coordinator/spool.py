"""Verified updates on disk, so memory stays flat and anyone can recompute the aggregate later.

Each accepted update is written as a stored update (protocols.stored: its arrays plus the envelope and
signature its member sent) as soon as it is verified, and dropped from memory. Aggregation then reads them
back one array at a time, in canonical order (protocols.aggregation.canonical_order), as views of the
mapped files.

Writing overlaps verifying: `put` hands the update to the spool's one writer thread and returns, so the
round loop checks the next reply while this one is copied to disk (on 2 cores, the two halves of the
coordinator's work run side by side). At most one write is pending: `put` first waits for the previous
one, so at most two updates are in memory (the one being checked, the one being written), whatever N is.
A failed write raises from the next `put` or from `flush()`.

Files are complete at their final name when their write ends (written to a temporary name and renamed),
but without an fsync per file, which costs milliseconds even for a tiny update. The round's files are
made durable together by `sync()`, which `inputs()` calls, so they are on disk before the round that
aggregates them can be committed (docs/PROTOCOL.md, section 13.3).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coordinator import record as _record
from protocols import SignedBlob
from protocols.aggregation import RoundInput
from protocols.stored import StoredUpdate, stored_name, sync_files, write_stored_update


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
        self._unsynced: list[Path] = []
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    def put(
        self,
        member_id: str,
        update_digest: bytes,
        num_examples: int,
        arrays: Mapping[str, np.ndarray],
        signed: SignedBlob,
        score: float | None = None,
    ) -> SpooledUpdate:
        """Start writing one update and the envelope its member signed (complete after `flush()`, durable
        after `sync()`); first waits for the previous write."""
        self.flush()
        path = self.directory / stored_name(update_digest, member_id)
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="weft-spool")
        self._pending = self._writer.submit(_write, path, arrays, signed)
        self._unsynced.append(path)
        entry = SpooledUpdate(member_id, update_digest, num_examples, path, signed, score)
        self._entries.append(entry)
        return entry

    def flush(self) -> None:
        """Wait until every update put so far is complete on disk (raises what a failed write raised)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Finish the pending write and stop the writer thread."""
        try:
            self.flush()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None

    def entries(self) -> list[SpooledUpdate]:
        """The stored updates, in arrival order."""
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def sync(self) -> None:
        """Make every update stored so far durable (fsync of each new file, then of the folder)."""
        self.flush()
        if self._unsynced:
            sync_files(self._unsynced)
            self._unsynced = []

    def inputs(self) -> list[RoundInput]:
        """Every update as an aggregation input (canonical order is applied by `aggregate_round`); syncs first,
        so no round can be committed on updates that a power loss could still take back."""
        self.close()
        self.sync()
        return [entry.as_input() for entry in self._entries]

    def discard(self) -> None:
        """Delete the round's stored updates (when the record is configured not to keep them)."""
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def _write(path: Path, arrays: Mapping[str, np.ndarray], signed: SignedBlob) -> None:
    write_stored_update(path, arrays, signed, sync=False)
    _record.crash_point("stored")  # crash tests: the n-th update is complete on disk
