"""How a round's global model is computed from its accepted updates: specified here, so anyone can recompute it.

The coordinator (`coordinator.rounds`) and the offline auditor (`protocols.audit`) call the very same
function, `aggregate_round`, on the same inputs in the same order; that is what makes `weft audit verify`
able to recompute every aggregate bit for bit (docs/PROTOCOL.md, "Aggregation").

Inputs, in canonical order (sorted by update digest, then member id; never arrival order):
- each update as an `UpdateSource`: arrays read one name at a time (from the spool, or from the record);
- each update's signed example count and, for the `quality` policy, its measured quality score;
- the global model the round started from (the base of every delta);
- the contribution policy (`protocols.policy`) and the rule (`FedAvg` here; median, trimmed mean and
  Krum in `protocols.robust`).

Arithmetic is float64 in a fixed order, cast back to each array's dtype at the end (integer arrays are
rounded to nearest): deterministic for the same inputs on any machine with IEEE-754 doubles.

The weighted mean (FedAvg, and Krum's final step) runs chunk-major: for each run of `CHUNK` elements of an
array, every update's values are folded in canonical order into a small float64 buffer, divided and (for
FedAvg under `aggregate_round`) cast to the model's dtype at once. Each element sees exactly the operations
of the whole-array formula, so the bits are the same, but no full-size float64 temporary exists and the
chunks are shared between threads (numpy releases the GIL; the result does not depend on the split).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

CHUNK = 1 << 15
"""Elements per step of the weighted mean and of the finite check (their scratch buffers stay in cache)."""
THREADS = max(1, min(8, os.cpu_count() or 1))
"""Threads the weighted mean splits a large array's chunks over."""
_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(THREADS, thread_name_prefix="weft-fold")
    return _pool


def all_finite(array: np.ndarray) -> bool:
    """Whether a floating array holds no NaN or Inf, checked in chunks (other dtypes are always finite)."""
    if array.dtype.kind != "f":
        return True
    flat = array.reshape(-1)
    if array.dtype.itemsize >= 4:
        # Fast path: a sum is finite only if every term is (NaN and Inf propagate), and numpy's SIMD pairwise
        # sum reads faster than isfinite writes. A non-finite sum (a NaN or Inf, or finite values whose sum
        # overflows) falls through to the exact check below.
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.add.reduce(flat)):
                return True
    if flat.size <= CHUNK:
        return bool(np.isfinite(flat).all())
    scratch = np.empty(CHUNK, dtype=bool)
    for start in range(0, flat.size, CHUNK):
        part = flat[start : start + CHUNK]
        ok = scratch[: part.size]
        np.isfinite(part, out=ok)
        if not ok.all():
            return False
    return True


class UpdateSource(Protocol):
    """One update, read one array at a time (so a rule never needs a whole update in memory)."""

    def array(self, name: str) -> np.ndarray:
        """The update's array `name`, in its wire dtype."""
        ...


@dataclass(frozen=True)
class InMemory:
    """An `UpdateSource` over a dict of arrays (tests, small models)."""

    arrays: Mapping[str, np.ndarray]

    def array(self, name: str) -> np.ndarray:
        """The array `name`."""
        return self.arrays[name]


@dataclass(frozen=True)
class RuleResult:
    """What a rule produced: float64 arrays, and which inputs counted."""

    arrays: dict[str, np.ndarray]
    """The aggregate, float64, by array name."""
    selected: tuple[int, ...]
    """Indices (into the canonical order) of the updates the aggregate is built from."""
    scores: tuple[float, ...] = ()
    """Per-update scores where the rule computes them (Krum), in canonical order."""


class Rule(Protocol):
    """An aggregation rule: (names, updates in canonical order, shares) -> float64 aggregate."""

    @property
    def name(self) -> str:
        """The rule's name in configs and the ledger."""
        ...

    def describe(self) -> dict[str, Any]:
        """`{"rule": name, **parameters}`: goes into the ledger, and `rule_from_description` rebuilds it."""
        ...

    def aggregate(self, names: Sequence[str], sources: Sequence[UpdateSource], shares: Sequence[float]) -> RuleResult:
        """The aggregate of `sources`; `shares` are the policy's weights (>= 0, any scale)."""
        ...


@dataclass(frozen=True)
class FedAvg:
    """The share-weighted mean of the updates (McMahan et al., arXiv:1602.05629).

    `sum_i(share_i * x_i) / sum_i(share_i)`, accumulated in float64 in canonical order. With the default
    policy the shares are the signed example counts themselves.
    """

    name: str = field(default="fedavg", init=False)

    def describe(self) -> dict[str, Any]:
        """`{"rule": "fedavg"}`."""
        return {"rule": self.name}

    def aggregate(self, names: Sequence[str], sources: Sequence[UpdateSource], shares: Sequence[float]) -> RuleResult:
        """One pass per array over the updates."""
        return RuleResult(weighted_mean(names, sources, shares), tuple(range(len(sources))))


def weighted_mean(
    names: Sequence[str],
    sources: Sequence[UpdateSource],
    shares: Sequence[float],
    template: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """`sum(w_i x_i) / sum(w_i)` per array, accumulated in the order given (zero-share updates skipped).

    Per element: `acc = float64(x_first) * w_first`, then `acc = acc + float64(x_i) * w_i` for each next
    update with a non-zero share, then `acc / total`, all in float64. Without `template` the result is
    float64. With `template` (name -> `ArraySpec`) each chunk is cast like `cast_to_template` (integers
    rounded to nearest, then converted) straight into an array of the model's dtype and shape, and a
    non-finite floating result raises ValueError: the same bits, without a full-size float64 result.
    """
    if len(sources) != len(shares):
        raise ValueError(f"{len(sources)} updates but {len(shares)} shares")
    total = float(sum(shares))
    if not (np.isfinite(total) and total > 0):
        raise ValueError("the shares must sum to a positive number")
    out: dict[str, np.ndarray] = {}
    for name in names:
        terms = [(np.asarray(src.array(name)), float(share)) for src, share in zip(sources, shares, strict=True)
                 if share != 0]  # fmt: skip
        assert terms  # total > 0, so some share is non-zero
        shape = terms[0][0].shape
        for array, _ in terms:
            if array.shape != shape:
                raise ValueError(f"array {name!r} has different shapes across updates: {shape} and {array.shape}")
        flats = [(array.reshape(-1), share) for array, share in terms]
        dtype = np.dtype(np.float64) if template is None else np.dtype(template[name].dtype)
        result = np.empty(shape, dtype=dtype)
        size = result.size
        chunks = -(-size // CHUNK)
        parts = min(THREADS, chunks // 8) if chunks >= 16 else 1  # a thread costs more than a few chunks
        if parts <= 1:
            finite = _fold(flats, total, result.reshape(-1), 0, size, template is not None)
        else:
            bounds = [CHUNK * (chunks * k // parts) for k in range(parts)] + [size]
            jobs = [
                _executor().submit(
                    _fold, flats, total, result.reshape(-1), bounds[k], bounds[k + 1], template is not None
                )
                for k in range(parts)
            ]
            finite = all([job.result() for job in jobs])
        if not finite:
            raise ValueError(f"aggregate of {name!r} is not finite (overflow in {dtype})")
        del terms, flats
        out[name] = result
    return out


def _fold(
    flats: Sequence[tuple[np.ndarray, float]], total: float, out: np.ndarray, start: int, stop: int, cast: bool
) -> bool:
    """Fold elements [start, stop) of every update into `out`, chunk by chunk; False if a cast float is not finite."""
    acc = np.empty(min(CHUNK, stop - start), dtype=np.float64)
    term = np.empty_like(acc)
    ok = np.empty(acc.size, dtype=bool)
    rounded = cast and out.dtype.kind in "iub"
    checked = cast and out.dtype.kind == "f"
    finite = True
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is caught by the finite check
        for lo in range(start, stop, CHUNK):
            hi = min(stop, lo + CHUNK)
            n = hi - lo
            a, t = acc[:n], term[:n]
            first, share = flats[0]
            np.multiply(first[lo:hi], share, out=a, dtype=np.float64)
            for x, share in flats[1:]:
                np.multiply(x[lo:hi], share, out=t, dtype=np.float64)
                np.add(a, t, out=a)
            np.divide(a, total, out=a)
            if rounded:
                np.rint(a, out=a)
            out[lo:hi] = a
            if checked and finite:
                np.isfinite(out[lo:hi], out=ok[:n])
                finite = bool(ok[:n].all())
    return finite


# ---- one round, end to end: policy, rule, cast -----------------------------------------------------------


@dataclass(frozen=True)
class RoundInput:
    """One accepted update as the round's aggregation sees it."""

    member_id: str
    update_digest: bytes
    num_examples: int
    """The example count the member signed."""
    source: UpdateSource
    score: float | None = None
    """Its quality score on the coordinator's held-out data (only under a quality policy)."""


@dataclass(frozen=True)
class RoundAggregate:
    """The new aggregate and how each update counted, in canonical order."""

    arrays: dict[str, np.ndarray]
    """The aggregate in the global model's dtypes."""
    order: tuple[RoundInput, ...]
    """The inputs in canonical order (every list below follows it)."""
    shares: tuple[float, ...]
    """Each update's share after the policy (weighting, anti-capture cap); they sum to 1."""
    norms: tuple[float | None, ...]
    """L2 norm of each update's delta from the base model (only computed under a norm bound)."""
    scales: tuple[float, ...]
    """The factor each delta was scaled by to respect the norm bound (1.0: untouched)."""
    selected: tuple[int, ...]
    """Which updates the rule built the aggregate from."""
    rule_scores: tuple[float, ...]
    """The rule's own per-update scores (Krum), else empty."""


def canonical_order(inputs: Sequence[RoundInput]) -> list[RoundInput]:
    """Sorted by (update digest, member id): an order that depends on the updates alone."""
    return sorted(inputs, key=lambda i: (i.update_digest, i.member_id))


def aggregate_round(
    template: Mapping[str, Any],
    base: Mapping[str, np.ndarray],
    inputs: Sequence[RoundInput],
    policy: Any,
    rule: Rule,
) -> RoundAggregate:
    """The round's aggregate: the coordinator signs it, the auditor recomputes it; the same code for both.

    `template` maps array names to `ArraySpec`s (dtype, shape); `base` is the global model the round
    started from; `policy` is a `protocols.policy.ContributionPolicy`. Raises ValueError when the rule
    cannot run on these inputs or the aggregate is not finite (nothing is signed then).
    """
    from protocols.policy import Clipped, base_weights, cap_shares, clip_scale, update_norm

    if not inputs:
        raise ValueError("no update to aggregate")
    order = canonical_order(inputs)
    names = sorted(template)
    norms: list[float | None] = []
    scales: list[float] = []
    sources: list[UpdateSource] = []
    for item in order:
        if policy.norm_bound is None:
            norms.append(None)
            scales.append(1.0)
            sources.append(item.source)
            continue
        norm = update_norm(names, item.source, base)
        scale = clip_scale(norm, policy.norm_bound)
        norms.append(norm)
        scales.append(scale)
        sources.append(item.source if scale == 1.0 else Clipped(item.source, base, scale))
    weights = base_weights(policy, [i.num_examples for i in order], [i.score for i in order])
    shares = cap_shares(weights, policy.max_share)
    if isinstance(rule, FedAvg):  # straight into the model's dtypes: no full-size float64 aggregate
        result = RuleResult(weighted_mean(names, sources, shares, template), tuple(range(len(sources))))
    else:
        result = rule.aggregate(names, sources, shares)
    return RoundAggregate(
        arrays=cast_to_template(result.arrays, template),
        order=tuple(order),
        shares=tuple(float(s) for s in shares),
        norms=tuple(norms),
        scales=tuple(scales),
        selected=tuple(result.selected),
        rule_scores=tuple(float(s) for s in result.scores),
    )


def cast_to_template(arrays: Mapping[str, np.ndarray], template: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """float64 aggregate -> the global model's dtypes (integers rounded to nearest); refuse non-finite results.

    An array already in its model dtype and shape (FedAvg's, cast chunk by chunk by `weighted_mean`) is
    taken as it is, after the same finite check.
    """
    out: dict[str, np.ndarray] = {}
    for name in sorted(template):
        dtype = np.dtype(template[name].dtype)
        value = arrays[name]
        if value.dtype == dtype and value.shape == tuple(template[name].shape):
            if not all_finite(value):
                raise ValueError(f"aggregate of {name!r} is not finite (overflow in {dtype})")
            out[name] = value
            continue
        if dtype.kind in "iub":
            value = np.rint(value)
        with np.errstate(over="ignore", invalid="ignore"):
            out[name] = np.asarray(value).astype(dtype).reshape(template[name].shape)
        if dtype.kind == "f" and not np.isfinite(out[name]).all():
            raise ValueError(f"aggregate of {name!r} is not finite (overflow in {dtype})")
    return out
