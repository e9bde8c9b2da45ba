"""Server (outer) optimizers: how the round's aggregate moves the global model.

Plain FedAvg (arXiv:1602.05629) takes the aggregate as the next global model. An outer optimizer treats
`pseudo_gradient = global - aggregate` as a gradient instead (Reddi et al., arXiv:2003.00295). DiLoCo
(arXiv:2311.08105) uses Nesterov momentum on it: with few rounds of many local steps, the momentum carries
progress across rounds that a fresh average forgets. The state (one momentum buffer per array) lives at
the coordinator: it is checkpointed after every round (`state()` / `load_state()`) so a resumed run carries
on exactly, and `weft audit verify` rebuilds it from round 1 with `optimizer_from_description`.

Arithmetic is float64 per array, cast back to the array's dtype: deterministic for the same inputs.
Pure numpy: the auditor runs it without flwr or torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np


class ServerOptimizer(Protocol):
    """Turns (current global model, this round's aggregate) into the next global model."""

    name: str

    def step(self, current: Mapping[str, np.ndarray], aggregate: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The next global model."""
        ...

    def describe(self) -> dict[str, Any]:
        """`{"optimizer": name, **hyperparameters}` for the ledger."""
        ...

    def state(self) -> dict[str, np.ndarray]:
        """The state to checkpoint after a round (empty when there is none)."""
        ...

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore `state()` from a checkpoint."""
        ...


class Plain:
    """FedAvg as published: the aggregate is the next global model."""

    name = "fedavg"

    def step(self, current: Mapping[str, np.ndarray], aggregate: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The aggregate itself."""
        return dict(aggregate)

    def describe(self) -> dict[str, Any]:
        """`{"optimizer": "fedavg"}`."""
        return {"optimizer": self.name}

    def state(self) -> dict[str, np.ndarray]:
        """No state."""
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Nothing to restore; a non-empty state is refused."""
        if state:
            raise ValueError("plain FedAvg has no server optimizer state")


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
            with np.errstate(over="ignore", invalid="ignore"):
                out[name] = (np.asarray(now, np.float64) - self.lr * (g + self.momentum * m)).astype(now.dtype)
            if not np.isfinite(out[name]).all():  # never hand a non-finite model to be signed
                raise ValueError(f"server optimizer step of {name!r} is not finite (overflow in {now.dtype})")
        return out

    def describe(self) -> dict[str, Any]:
        """`{"optimizer": "nesterov", "lr": ..., "momentum": ...}`."""
        return {"optimizer": self.name, "lr": self.lr, "momentum": self.momentum}

    def state(self) -> dict[str, np.ndarray]:
        """The momentum buffers (float64), by array name."""
        return dict(self._m)

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the momentum buffers."""
        for name, buf in state.items():
            if np.asarray(buf).dtype != np.float64:
                raise ValueError(f"momentum buffer {name!r} must be float64")
        self._m = {name: np.array(buf, dtype=np.float64) for name, buf in state.items()}


def optimizer_from_description(d: Mapping[str, Any]) -> ServerOptimizer:
    """Rebuild a server optimizer from its `describe()` (as read back from a ledger)."""
    name = d.get("optimizer")
    if name == "fedavg" and set(d) == {"optimizer"}:
        return Plain()
    if name == "nesterov" and set(d) == {"optimizer", "lr", "momentum"}:
        lr, momentum = d["lr"], d["momentum"]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (lr, momentum)):
            raise ValueError("server optimizer: lr and momentum must be numbers")
        return OuterNesterov(float(lr), float(momentum))
    raise ValueError(f"server optimizer: cannot rebuild {dict(d)!r}")
