"""Sending instructions and pulling replies through Flower's Grid."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from coordinator.arrays import to_record
from protocols import SignedBlob, wire

log = logging.getLogger("weft.coordinator")

PULL_INTERVAL_S = 0.1
"""The longest wait between two sweeps that found nothing."""
PULL_INTERVAL_PER_ID_S = 0.0002
"""The wait grows with the ids still pending (a sweep costs about that much per id), from `MIN_PULL_INTERVAL_S`:
the last replies of a round are seen within about 10 ms, a thousand pending ids are not swept 100 times a second."""
MIN_PULL_INTERVAL_S = 0.01
PULL_BUDGET_BYTES = 32 << 20
"""At most this many bytes of replies are pulled in one call (a batch is in memory together)."""
MAX_PULL_IDS = 256
"""At most this many message ids in one pull."""
EVALUATION_REPLY_BYTES = 64 << 10
"""A bound on an evaluation reply (signed envelope and scalar metrics): no arrays."""


def instructions(
    node_ids: Iterable[int], kind: str, arrays: Mapping[str, np.ndarray], signed: SignedBlob
) -> list[Message]:
    record = to_record(arrays)
    global_record = ConfigRecord({wire.ENVELOPE: signed.body, wire.SIGNATURE: signed.signature})
    return [
        Message(
            RecordDict({wire.ARRAYS: record, wire.GLOBAL_RECORD: global_record}), dst_node_id=nid, message_type=kind
        )
        for nid in node_ids
    ]


def collect(
    grid: Grid,
    messages: list[Message],
    timeout_s: float,
    reply_bytes: int | None = None,
    idle: Callable[[], object] | None = None,
) -> Iterator[Message]:
    """Push `messages`; yield each reply as soon as it is pulled, until all arrive or the deadline passes.

    Linear in the replies: each sweep pulls the pending ids in batches (`pull_batch`) of at most
    `PULL_BUDGET_BYTES` of replies, so at most one batch is held at a time (one reply when the model is
    big: invariant 6), and the loop waits (`pull_wait`) only after a sweep that found nothing; `idle`, if
    given, runs then first (the spool makes its new files durable while the nodes still work).
    `reply_bytes` bounds one reply's size; by default the size of the arrays the instructions carry.
    """
    pending = dict.fromkeys(grid.push_messages(messages))
    size = _arrays_bytes(messages[0]) if reply_bytes is None and messages else int(reply_bytes or 0)
    batch = pull_batch(size)
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        arrived = False
        ids = list(pending)
        for start in range(0, len(ids), batch):
            replies = list(grid.pull_messages(ids[start : start + batch]))
            replies.reverse()
            while replies:
                reply = replies.pop()  # drop each reply from the batch as it is handed out
                pending.pop(reply.metadata.reply_to_message_id, None)
                arrived = True
                yield reply
                del reply
        if not arrived:
            started = time.monotonic()
            if idle is not None:
                idle()
            time.sleep(max(0.0, pull_wait(len(pending)) - (time.monotonic() - started)))
    if pending:
        log.warning("%d node(s) did not reply within %.0f s", len(pending), timeout_s)


def pull_wait(pending: int) -> float:
    """Seconds to wait after an empty sweep with `pending` ids left."""
    return min(PULL_INTERVAL_S, max(MIN_PULL_INTERVAL_S, pending * PULL_INTERVAL_PER_ID_S))


def pull_batch(reply_bytes: int) -> int:
    """Ids pulled per call: as many replies of `reply_bytes` as fit `PULL_BUDGET_BYTES`, 1 to `MAX_PULL_IDS`."""
    if reply_bytes <= 0:
        return MAX_PULL_IDS
    return max(1, min(MAX_PULL_IDS, PULL_BUDGET_BYTES // reply_bytes))


def _arrays_bytes(message: Message) -> int:
    """Bytes of the arrays a message carries (what a reply of the same model carries back, at most)."""
    return sum(len(array.data) for record in message.content.array_records.values() for array in record.values())
