"""Server (outer) optimizers: how the round's aggregate moves the global model.

Plain FedAvg (arXiv:1602.05629) takes the aggregate as the next global model. An outer optimizer treats
`pseudo_gradient = global - aggregate` as a gradient instead (Reddi et al., arXiv:2003.00295). DiLoCo
(arXiv:2311.08105) uses Nesterov momentum on it: with few rounds of many local steps, the momentum carries
progress across rounds that a fresh average forgets. FedAvgM (Hsu et al., arXiv:1909.06335) uses heavy-ball
momentum on it, FedAdam (Reddi et al., arXiv:2003.00295, Algorithm 2) Adam with the adaptivity floor tau and,
as in the paper, no bias correction. Why these and their defaults: docs/decisions/0011-server-optimizers.md.
The state (one or two float64 buffers per floating-point array) lives at the coordinator: it is
checkpointed after every round (`state()` / `load_state()`) so a resumed run carries on exactly, and
`weft audit verify` rebuilds it from round 1 with `optimizer_from_description`.

Arithmetic is float64 per array, cast back to the array's dtype: deterministic for the same inputs.
Pure numpy: the auditor runs it without flwr or torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
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

        m     <- momentum * m + g                 (g = current - aggregate, m starts at 0)
        next  <- current - lr * (g + momentum * m)

    With lr = 1 and momentum = 0 this is plain FedAvg.
    """

    name = "nesterov"

    def __init__(self, lr: float = 0.7, momentum: float = 0.9) -> None:
        _check_lr_momentum(lr, momentum)
        self.lr, self.momentum = lr, momentum
        self._m: dict[str, np.ndarray] = {}

    def step(self, current: Mapping[str, np.ndarray], aggregate: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The next global model; updates the momentum buffers."""

        def one(name: str, x: np.ndarray, g: np.ndarray) -> np.ndarray:
            m = self._m.get(name)
            m = g if m is None else self.momentum * m + g
            self._m[name] = m
            return x - self.lr * (g + self.momentum * m)

        return _each_float_array(current, aggregate, one)

    def describe(self) -> dict[str, Any]:
        """`{"optimizer": "nesterov", "lr": ..., "momentum": ...}`."""
        return {"optimizer": self.name, "lr": self.lr, "momentum": self.momentum}

    def state(self) -> dict[str, np.ndarray]:
        """The momentum buffers (float64), by array name."""
        return dict(self._m)

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the momentum buffers."""
        self._m = _float64_buffers(state, "momentum buffer")


class FedAvgM:
    """FedAvgM (Hsu et al., arXiv:1909.06335): heavy-ball server momentum on the pseudo-gradient.

        v     <- momentum * v + g                 (g = current - aggregate, v starts at 0)
        next  <- current - lr * v

    With lr = 1 and momentum = 0 this is plain FedAvg. Unlike `OuterNesterov` the step follows the
    accumulated velocity itself, not a look-ahead `g + momentum * v`.
    """

    name = "fedavgm"

    def __init__(self, lr: float = 1.0, momentum: float = 0.9) -> None:
        _check_lr_momentum(lr, momentum)
        self.lr, self.momentum = lr, momentum
        self._v: dict[str, np.ndarray] = {}

    def step(self, current: Mapping[str, np.ndarray], aggregate: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The next global model; updates the velocity buffers."""

        def one(name: str, x: np.ndarray, g: np.ndarray) -> np.ndarray:
            v = self._v.get(name)
            v = g if v is None else self.momentum * v + g
            self._v[name] = v
            return x - self.lr * v

        return _each_float_array(current, aggregate, one)

    def describe(self) -> dict[str, Any]:
        """`{"optimizer": "fedavgm", "lr": ..., "momentum": ...}`."""
        return {"optimizer": self.name, "lr": self.lr, "momentum": self.momentum}

    def state(self) -> dict[str, np.ndarray]:
        """The velocity buffers (float64), by array name."""
        return dict(self._v)

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the velocity buffers."""
        self._v = _float64_buffers(state, "velocity buffer")


class FedAdam:
    """FedAdam (Reddi et al., arXiv:2003.00295, Algorithm 2): Adam on the pseudo-gradient, without bias correction.

        m     <- beta1 * m + (1 - beta1) * g      (g = current - aggregate, m starts at 0)
        v     <- beta2 * v + (1 - beta2) * g**2   (v starts at tau**2, the paper's v_-1 >= tau**2)
        next  <- current - lr * (m / (sqrt(v) + tau))

    All in float64, element by element, in this order. The paper writes the step with Delta = aggregate -
    current = -g; the signs are the same update. tau bounds the per-coordinate step: |next - current| <=
    lr * |m| / tau. The state is two buffers per floating-point array, `m/<name>` and `v/<name>`.
    """

    name = "fedadam"

    def __init__(self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        _check_lr_momentum(lr, beta1, "fedadam beta1")
        if not (math.isfinite(beta2) and 0 <= beta2 < 1):
            raise ValueError("fedadam beta2 must be in [0, 1)")
        if not (math.isfinite(tau) and tau > 0):
            raise ValueError("fedadam tau (server epsilon) must be > 0")
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self._m: dict[str, np.ndarray] = {}
        self._v: dict[str, np.ndarray] = {}

    def step(self, current: Mapping[str, np.ndarray], aggregate: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The next global model; updates both moment buffers."""

        def one(name: str, x: np.ndarray, g: np.ndarray) -> np.ndarray:
            m = self.beta1 * self._m.get(name, 0.0) + (1 - self.beta1) * g
            v = self.beta2 * self._v.get(name, self.tau * self.tau) + (1 - self.beta2) * (g * g)
            self._m[name], self._v[name] = m, v
            return x - self.lr * (m / (np.sqrt(v) + self.tau))

        return _each_float_array(current, aggregate, one)

    def describe(self) -> dict[str, Any]:
        """`{"optimizer": "fedadam", "lr": ..., "beta1": ..., "beta2": ..., "tau": ...}`."""
        return {"optimizer": self.name, "lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau}

    def state(self) -> dict[str, np.ndarray]:
        """`m/<name>` and `v/<name>` (float64) for every floating-point array stepped so far."""
        return {**{f"m/{k}": b for k, b in self._m.items()}, **{f"v/{k}": b for k, b in self._v.items()}}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore both moment buffers; every name needs its `m/` and its `v/` buffer, nothing else is taken."""
        buffers = _float64_buffers(state, "fedadam buffer")
        m = {k[2:]: b for k, b in buffers.items() if k.startswith("m/")}
        v = {k[2:]: b for k, b in buffers.items() if k.startswith("v/")}
        if len(m) + len(v) != len(buffers) or m.keys() != v.keys():
            raise ValueError("fedadam state must hold an m/<name> and a v/<name> buffer for each array, nothing else")
        for name in m:
            if m[name].shape != v[name].shape:
                raise ValueError(f"fedadam buffers of {name!r} differ in shape")
        self._m, self._v = m, v


def optimizer_from_description(d: Mapping[str, Any]) -> ServerOptimizer:
    """Rebuild a server optimizer from its `describe()` (as read back from a ledger): exact keys, numbers only."""
    name = d.get("optimizer")
    if name == "fedavg" and set(d) == {"optimizer"}:
        return Plain()
    if name == "nesterov" and set(d) == {"optimizer", "lr", "momentum"}:
        return OuterNesterov(*_numbers(d, ("lr", "momentum")))
    if name == "fedavgm" and set(d) == {"optimizer", "lr", "momentum"}:
        return FedAvgM(*_numbers(d, ("lr", "momentum")))
    if name == "fedadam" and set(d) == {"optimizer", "lr", "beta1", "beta2", "tau"}:
        return FedAdam(*_numbers(d, ("lr", "beta1", "beta2", "tau")))
    raise ValueError(f"server optimizer: cannot rebuild {dict(d)!r}")


def _numbers(d: Mapping[str, Any], keys: tuple[str, ...]) -> list[float]:
    """The values of `keys` in `d`, each a real number (not a bool): a ledger's JSON numbers."""
    values = [d[k] for k in keys]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ValueError(f"server optimizer: {', '.join(keys)} must be numbers")
    return [float(v) for v in values]


def _check_lr_momentum(lr: float, momentum: float, what: str = "server momentum") -> None:
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError("server learning rate must be > 0")
    if not (math.isfinite(momentum) and 0 <= momentum < 1):
        raise ValueError(f"{what} must be in [0, 1)")


def _each_float_array(
    current: Mapping[str, np.ndarray],
    aggregate: Mapping[str, np.ndarray],
    step: Callable[[str, np.ndarray, np.ndarray], np.ndarray],
) -> dict[str, np.ndarray]:
    """Apply `step(name, float64(current), g)` (g = current - aggregate, float64) to each floating array, cast back
    and refused when not finite; non-floating arrays (counters) are taken from the aggregate as in FedAvg."""
    out: dict[str, np.ndarray] = {}
    for name, now in current.items():
        agg = aggregate[name]
        if now.dtype.kind != "f":
            out[name] = np.asarray(agg)
            continue
        x = np.asarray(now, np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            out[name] = _finite(name, step(name, x, x - np.asarray(agg, np.float64)), now.dtype)
    return out


def _finite(name: str, out: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`out` cast to `dtype`; refused when not finite (never hand a non-finite model to be signed)."""
    with np.errstate(over="ignore", invalid="ignore"):
        cast = out.astype(dtype)
    if not np.isfinite(cast).all():
        raise ValueError(f"server optimizer step of {name!r} is not finite (overflow in {dtype})")
    return cast


def _float64_buffers(state: Mapping[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    for name, buf in state.items():
        if np.asarray(buf).dtype != np.float64:
            raise ValueError(f"{what} {name!r} must be float64")
    return {name: np.array(buf, dtype=np.float64) for name, buf in state.items()}
