"""Aggregation rules that fold verified updates one at a time into a running result.

An aggregator never holds more than its accumulator and the update being folded, so coordinator
memory does not grow with the number of nodes (docs/ARCHITECTURE.md, invariant 6). The round loop folds
updates in a canonical order (`coordinator.spool`), which makes the result bit-for-bit
deterministic whatever order replies arrived in (invariant 5).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from protocols import ArraySpec


class Aggregator(Protocol):
    """A rule that folds weighted updates into the next global model."""

    def begin(self, template: Mapping[str, ArraySpec]) -> None:
        """Start a round; `template` is the global model's structure."""

    def fold(self, arrays: Mapping[str, np.ndarray], weight: int) -> None:
        """Add one verified update with its weight (example count)."""

    def finish(self) -> dict[str, np.ndarray]:
        """The aggregate, in the template's dtypes."""


class FedAvg:
    """Example-weighted mean of the updates (McMahan et al., arXiv:1602.05629).

    Accumulates `sum(w_i * x_i)` and `sum(w_i)` in float64 and divides once at the end; the
    result is cast back to each array's dtype (integer arrays are rounded to nearest).
    """

    def __init__(self) -> None:
        self._template: dict[str, ArraySpec] = {}
        self._sums: dict[str, np.ndarray] = {}
        self._total = 0

    def begin(self, template: Mapping[str, ArraySpec]) -> None:
        """Reset the accumulator for a model of this structure."""
        self._template = dict(template)
        self._sums = {name: np.zeros(spec.shape, dtype=np.float64) for name, spec in template.items()}
        self._total = 0

    def fold(self, arrays: Mapping[str, np.ndarray], weight: int) -> None:
        """sum += weight * arrays (in float64)."""
        if weight < 1:
            raise ValueError(f"weight must be >= 1, got {weight}")
        with np.errstate(over="ignore"):  # overflow is caught by finish(), which refuses a non-finite model
            for name, acc in self._sums.items():
                acc += np.asarray(arrays[name], dtype=np.float64) * float(weight)
        self._total += weight

    def finish(self) -> dict[str, np.ndarray]:
        """sum / total, cast to the template's dtypes."""
        if self._total == 0:
            raise ValueError("no update was folded; refusing to produce an empty model")
        out: dict[str, np.ndarray] = {}
        for name, acc in self._sums.items():
            mean = acc / float(self._total)
            dtype = np.dtype(self._template[name].dtype)
            if dtype.kind in "iub":
                mean = np.rint(mean)
            out[name] = mean.astype(dtype)
            if dtype.kind == "f" and not np.isfinite(out[name]).all():
                # finite updates can still overflow when summed; never sign such a model
                raise ValueError(f"aggregate of {name!r} is not finite (overflow in {dtype})")
        return out

    @property
    def total_weight(self) -> int:
        """Sum of the weights folded so far."""
        return self._total
