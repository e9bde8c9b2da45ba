"""Conversions between numpy parameter vectors and Flower ArrayRecords (coordinator side)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """numpy arrays -> ArrayRecord (keys kept)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> numpy arrays."""
    return {name: record[name].numpy() for name in record}
