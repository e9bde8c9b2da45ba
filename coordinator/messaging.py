"""Sending instructions and pulling replies through Flower's Grid."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from coordinator.arrays import to_record
from protocols import SignedBlob, wire

log = logging.getLogger("weft.coordinator")

PULL_INTERVAL_S = 0.1


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


def collect(grid: Grid, messages: list[Message], timeout_s: float) -> Iterator[Message]:
    """Push `messages`; yield each reply as soon as it is pulled, until all arrive or the deadline passes."""
    pending = list(grid.push_messages(messages))
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        arrived = False
        # One id per pull: at most one reply (one update) is in memory at a time (invariant 6).
        for message_id in list(pending):
            for reply in grid.pull_messages([message_id]):
                pending.remove(message_id)
                arrived = True
                yield reply
                del reply
        if not arrived:
            time.sleep(PULL_INTERVAL_S)
    if pending:
        log.warning("%d node(s) did not reply within %.0f s", len(pending), timeout_s)
