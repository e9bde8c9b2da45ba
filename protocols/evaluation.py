"""What makes a node's evaluation count, and how counted evaluations become the federated figure.

The coordinator applies these as replies arrive (coordinator/evaluation.py); the offline audit applies the very
same functions to the signed evaluations in the ledger (protocols/audit.py), so both agree to the bit
(docs/PROTOCOL.md, section 6.3).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from protocols.text import printable

METRIC_NAME = re.compile(r"(eval|personal)_[a-z0-9_]{1,48}")
"""The only names an evaluation reply may carry."""
MAX_ABS_METRIC = 1e9
"""No evaluation metric of a weft task comes near this; anything beyond it is refused."""


def metric_problem(name: str, value: float) -> str | None:
    """Why the metric `name = value` may not count (allowlisted name, finite, bounded, accuracy in [0, 1]), or None."""
    if not METRIC_NAME.fullmatch(name):
        return f"metric name {printable(name, 60)!r} is not allowed"
    if not math.isfinite(value) or abs(value) > MAX_ABS_METRIC:
        return f"metric {name} = {value!r} is out of bounds"
    if name.endswith("accuracy") and not 0.0 <= value <= 1.0:
        return f"metric {name} = {value!r} is not in [0, 1]"
    return None


def federated_means(counted: Iterable[tuple[int, Mapping[str, float]]]) -> dict[str, float]:
    """The weighted mean of each metric over the (weight, metrics) of the counted evaluations, in the order given.

    Each metric is averaged over the evaluations that carry it; an evaluation of weight < 1 does not count.
    float64, accumulated left to right (the ledger's order: sorted by member, then node).
    """
    sums: dict[str, float] = {}
    totals: dict[str, int] = {}
    for weight, metrics in counted:
        if weight < 1:
            continue
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + float(value) * weight
            totals[name] = totals.get(name, 0) + weight
    return {name: value / totals[name] for name, value in sums.items()}
