"""Server (outer) optimizers: how the round's aggregate moves the global model.

Plain FedAvg (arXiv:1602.05629) takes the aggregate as the next global model. An outer optimizer treats
`pseudo_gradient = global - aggregate` as a gradient instead (Reddi et al., arXiv:2003.00295). DiLoCo
(arXiv:2311.08105) uses Nesterov momentum on it: with few rounds of many local steps, the momentum carries
progress across rounds that a fresh average forgets. The state (one momentum buffer per array) lives at
the coordinator; `state()` exposes it so a later change can checkpoint and audit it.

Arithmetic is float64 per array, cast back to the array's dtype: deterministic for the same inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

import numpy as np


class ServerOptimizer(Protocol):
    """Turns (current global model, this round's aggregate) into the next global model."""

    name: str

    def step(self, current: Mapping[str, np.ndarray], aggregate: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The next global model."""
        ...


class Plain:
    """FedAvg as published: the aggregate is the next global model."""

    name = "fedavg"

    def step(self, current: Mapping[str, np.ndarray], aggregate: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The aggregate itself."""
        return dict(aggregate)


class OuterNesterov:
    """DiLoCo's outer step: Nesterov momentum on the pseudo-gradient `current - aggregate`.

        m     <- momentum * m + g                 (g = current - aggregate)
        next  <- current - lr * (g + momentum * m)

    With lr = 1 and momentum = 0 this is plain FedAvg.
    """

    name = "nesterov"

    def __init__(self, lr: float = 0.7, momentum: float = 0.9) -> None:
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError("server learning rate must be > 0")
        if not 0 <= momentum < 1:
            raise ValueError("server momentum must be in [0, 1)")
        self.lr, self.momentum = lr, momentum
        self._m: dict[str, np.ndarray] = {}

    def step(self, current: Mapping[str, np.ndarray], aggregate: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The next global model; updates the momentum buffers."""
        out: dict[str, np.ndarray] = {}
        for name, now in current.items():
            agg = aggregate[name]
            if now.dtype.kind != "f":  # integer state (counters) is taken from the aggregate as in FedAvg
                out[name] = np.asarray(agg)
                continue
            g = np.asarray(now, np.float64) - np.asarray(agg, np.float64)
            m = self._m.get(name)
            m = g if m is None else self.momentum * m + g
            self._m[name] = m
            out[name] = (np.asarray(now, np.float64) - self.lr * (g + self.momentum * m)).astype(now.dtype)
        return out

    def state(self) -> dict[str, np.ndarray]:
        """The momentum buffers (float64), by array name."""
        return dict(self._m)
