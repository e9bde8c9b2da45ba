"""The only way content leaves a node: arrays, the example count and allowlisted scalar metrics.

Every reply a node sends is built here, so a partner's auditor can read one short file to know
what crosses the border (docs/ARCHITECTURE.md, invariant 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from node.arrays import to_record
from protocols import SignedBlob, wire


def declared_metrics(values: Mapping[str, float], allowlist: frozenset[str]) -> dict[str, float]:
    """Keep only allowlisted names with finite values, as plain floats."""
    return {name: float(value) for name, value in values.items() if name in allowlist and math.isfinite(float(value))}


def train_reply(
    arrays: Mapping[str, np.ndarray], signed: SignedBlob, num_examples: int, metrics: Mapping[str, float]
) -> RecordDict:
    """Reply to a train instruction: the update, its signed envelope and the declared metrics.

    `metrics` must already be filtered by `declared_metrics`; they are the same values the
    envelope signs.
    """
    return RecordDict(
        {
            wire.ARRAYS: to_record(arrays),
            wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: int(num_examples), **metrics}),
            wire.UPDATE_RECORD: ConfigRecord({wire.ENVELOPE: signed.body, wire.SIGNATURE: signed.signature}),
        }
    )


def evaluate_reply(num_examples: int, metrics: Mapping[str, float], signed: SignedBlob) -> RecordDict:
    """Reply to an evaluate instruction: the example count, the declared metrics and the envelope signing them."""
    return RecordDict(
        {
            wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: int(num_examples), **metrics}),
            wire.EVALUATION_RECORD: ConfigRecord({wire.ENVELOPE: signed.body, wire.SIGNATURE: signed.signature}),
        }
    )
