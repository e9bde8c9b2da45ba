"""Robust aggregation rules: coordinate-wise median, trimmed mean, and (multi-)Krum.

Each rule implements `protocols.aggregation.Rule` and is deterministic: float64 arithmetic in a fixed,
documented order, ties broken by canonical index (the order of `sources`), so an offline auditor that
re-runs a rule on the same inputs gets the same bits on any machine with IEEE-754 doubles
(docs/PROTOCOL.md, section 16.3). The model is processed one array name at a time: a rule holds
n x (largest array) in memory, never n x model. Outputs are float64; the caller casts them back.

Sorting is only ever used to order values, and a zero result is always returned as +0.0: numpy's sort
may order -0.0 and +0.0 (which compare equal) differently on different CPUs, and this makes the result
independent of that. Inputs are finite (the coordinator rejects non-finite updates before aggregation).

`rule_from_description` rebuilds any rule, FedAvg included, from its ledger description.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocols.aggregation import FedAvg, Rule, RuleResult, UpdateSource, weighted_mean

RULES = ("fedavg", "median", "trimmed-mean", "krum")
"""The names of every aggregation rule, as they appear in configs and in the ledger's `rule` field."""

_CHUNK = 1 << 20  # elements per step of the sequential sum (bounds its temporary memory)


def squared_distance(a: np.ndarray, b: np.ndarray) -> float:
    """`sum((a - b)**2)` in float64, summed strictly left to right over the elements in C order.

    Each difference and square is one IEEE-754 binary64 operation; the sum is sequential
    (`((d0² + d1²) + d2²) + ...`), never pairwise or vectorised, so any implementation reproduces it bit
    for bit. Raises ValueError when the shapes differ (no broadcasting).
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} and {y.shape}")
    diff = (x - y).reshape(-1)
    total = 0.0
    for start in range(0, diff.size, _CHUNK):
        sq = diff[start : start + _CHUNK] * diff[start : start + _CHUNK]
        sq[0] = total + sq[0]
        np.add.accumulate(sq, out=sq)  # sequential prefix sums: out[i] = out[i-1] + sq[i]
        total = float(sq[-1])
    return total


def _stack(name: str, sources: Sequence[UpdateSource]) -> np.ndarray:
    """The array `name` of every source as float64, stacked along a new axis 0 (canonical order)."""
    arrays = [np.asarray(src.array(name), dtype=np.float64) for src in sources]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"array {name!r} has different shapes across updates: {sorted(shapes)}")
    return np.stack(arrays, axis=0)


def _check_inputs(sources: Sequence[UpdateSource], shares: Sequence[float]) -> None:
    if not sources:
        raise ValueError("no update to aggregate")
    if len(sources) != len(shares):
        raise ValueError(f"{len(sources)} updates but {len(shares)} shares")


def _positive_zero(x: np.ndarray) -> np.ndarray:
    """`x + 0.0`: turns -0.0 into +0.0 (round to nearest) and leaves every other value unchanged."""
    x += 0.0
    return x


@dataclass(frozen=True)
class Median:
    """Coordinate-wise median of the updates.

    Yin, Chen, Kannan and Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
    Rates", ICML 2018 (https://arxiv.org/abs/1803.01498).

    Per array, the n values of each coordinate are sorted; the median is the middle value for odd n and
    `(a + b) / 2` of the two middle values for even n (as `numpy.median`). A zero result is +0.0. The
    policy's shares are ignored (every update counts as one value); every update is selected.
    """

    name: str = field(default="median", init=False)

    def describe(self) -> dict[str, Any]:
        """`{"rule": "median"}`."""
        return {"rule": self.name}

    def aggregate(self, names: Sequence[str], sources: Sequence[UpdateSource], shares: Sequence[float]) -> RuleResult:
        """The coordinate-wise median, array by array; `shares` are ignored."""
        _check_inputs(sources, shares)
        n = len(sources)
        out: dict[str, np.ndarray] = {}
        for name in names:
            ordered = np.sort(_stack(name, sources), axis=0)
            middle = ordered[n // 2]
            value = middle.copy() if n % 2 == 1 else (ordered[n // 2 - 1] + middle) / 2.0
            out[name] = _positive_zero(value)
        return RuleResult(out, tuple(range(n)))


@dataclass(frozen=True)
class TrimmedMean:
    """Coordinate-wise trimmed mean of the updates.

    Yin, Chen, Kannan and Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
    Rates", ICML 2018 (https://arxiv.org/abs/1803.01498).

    With n updates, k = floor(trim * n) values are removed from each end of every coordinate's sorted
    values, and the mean of the remaining n - 2k is `(v_k + v_(k+1) + ... + v_(n-k-1)) / (n - 2k)`, summed
    left to right in sorted order, in float64. A zero result is +0.0. The policy's shares are ignored;
    every update is selected. `trim` must satisfy 0 <= trim < 0.5 (0 gives the plain mean).
    """

    trim: float
    """The fraction of values removed from each end, 0 <= trim < 0.5."""
    name: str = field(default="trimmed-mean", init=False)

    def __post_init__(self) -> None:
        if isinstance(self.trim, bool) or not isinstance(self.trim, int | float):
            raise ValueError(f"trim must be a number, got {self.trim!r}")
        if not 0.0 <= self.trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {self.trim!r}")

    def describe(self) -> dict[str, Any]:
        """`{"rule": "trimmed-mean", "trim": trim}`."""
        return {"rule": self.name, "trim": float(self.trim)}

    def trimmed(self, n: int) -> int:
        """k = floor(trim * n): how many values are removed from each end with n updates."""
        return math.floor(float(self.trim) * n)

    def aggregate(self, names: Sequence[str], sources: Sequence[UpdateSource], shares: Sequence[float]) -> RuleResult:
        """The coordinate-wise trimmed mean, array by array; `shares` are ignored."""
        _check_inputs(sources, shares)
        n = len(sources)
        k = self.trimmed(n)
        kept = n - 2 * k
        if kept < 1:
            raise ValueError(f"trimmed mean with trim={self.trim} removes all {n} updates (k={k} from each end)")
        out: dict[str, np.ndarray] = {}
        for name in names:
            ordered = np.sort(_stack(name, sources), axis=0)
            acc = ordered[k].copy()
            for row in ordered[k + 1 : n - k]:
                acc += row
            acc /= float(kept)
            out[name] = _positive_zero(acc)
        return RuleResult(out, tuple(range(n)))


def _rank_key(value: float) -> float:
    """Sort key for distances and scores: NaN ranks as +inf (after every number)."""
    return math.inf if math.isnan(value) else value


@dataclass(frozen=True)
class Krum:
    """Krum, and multi-Krum for m > 1.

    Blanchard, El Mhamdi, Guerraoui and Stainer, "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent", NeurIPS 2017
    (https://papers.nips.cc/paper/2017/hash/f4b9ec30ad9f68f89b29639786cb62ef-Abstract.html); multi-Krum is
    from the same paper.

    With n updates and at most f Byzantine ones:

    - d(i, j) = sum over the floating arrays in `names` order of `squared_distance(x_i, x_j)` (float64,
      each array's sum sequential in C order, then added to the running total array by array). Integer
      and bool arrays (by the first update's dtype; counters such as batch-norm's `num_batches_tracked`)
      are not parameters and are left out, as in the policy's norm bound. Distances between models
      equal distances between their deltas from the round's base model (the base cancels).
    - score(i) = the sum, in ascending order, of the n - f - 2 smallest d(i, j), j != i (ties between
      equal distances do not change the sum). A NaN distance or score ranks as +inf.
    - The m lowest scores are selected (ties: the lower index first), reported in ascending index order.
    - The aggregate is `weighted_mean` (as FedAvg) of the selected updates, in ascending index order, with
      their policy shares (the division by their sum renormalises them over the selected); when the
      selected shares are all 0, each selected update weighs 1.0.

    Needs n - f - 2 >= 1 (n >= f + 3) and 1 <= m <= n.
    """

    f: int
    """The number of Byzantine updates to tolerate, f >= 0."""
    m: int = 1
    """How many updates to select and average (1: Krum; more: multi-Krum)."""
    name: str = field(default="krum", init=False)

    def __post_init__(self) -> None:
        if isinstance(self.f, bool) or not isinstance(self.f, int) or self.f < 0:
            raise ValueError(f"f must be an integer >= 0, got {self.f!r}")
        if isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 1:
            raise ValueError(f"m must be an integer >= 1, got {self.m!r}")

    def describe(self) -> dict[str, Any]:
        """`{"rule": "krum", "f": f, "m": m}`."""
        return {"rule": self.name, "f": self.f, "m": self.m}

    def distances(self, names: Sequence[str], sources: Sequence[UpdateSource]) -> np.ndarray:
        """The symmetric n x n matrix of d(i, j) (zero diagonal), accumulated array by array."""
        n = len(sources)
        dist = np.zeros((n, n), dtype=np.float64)
        for name in names:
            if np.asarray(sources[0].array(name)).dtype.kind != "f":
                continue
            stacked = _stack(name, sources)
            for i in range(n):
                for j in range(i + 1, n):
                    d = dist[i, j] + squared_distance(stacked[i], stacked[j])
                    dist[i, j] = d
                    dist[j, i] = d
        return dist

    def scores(self, dist: np.ndarray) -> list[float]:
        """score(i) from the distance matrix: the ascending sum of its n - f - 2 nearest distances."""
        n = dist.shape[0]
        nearest = n - self.f - 2
        out: list[float] = []
        for i in range(n):
            others = sorted((float(dist[i, j]) for j in range(n) if j != i), key=_rank_key)
            total = 0.0
            for value in others[:nearest]:
                total += value
            out.append(total)
        return out

    def aggregate(self, names: Sequence[str], sources: Sequence[UpdateSource], shares: Sequence[float]) -> RuleResult:
        """Score every update, select the m best, and take their share-weighted mean."""
        _check_inputs(sources, shares)
        n = len(sources)
        if n - self.f - 2 < 1:
            raise ValueError(f"Krum with f={self.f} needs at least {self.f + 3} updates, got {n}")
        if self.m > n:
            raise ValueError(f"Krum with m={self.m} needs at least {self.m} updates, got {n}")
        for share in shares:
            if not (math.isfinite(share) and share >= 0):
                raise ValueError(f"shares must be finite and >= 0, got {share!r}")
        scores = self.scores(self.distances(names, sources))
        ranked = sorted(range(n), key=lambda i: (_rank_key(scores[i]), i))
        selected = sorted(ranked[: self.m])
        picked = [float(shares[i]) for i in selected]
        if all(s == 0 for s in picked):
            picked = [1.0] * len(selected)
        arrays = weighted_mean(names, [sources[i] for i in selected], picked)
        return RuleResult(arrays, tuple(selected), tuple(scores))


def _integer(d: Mapping[str, Any], key: str) -> int:
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"rule field {key!r} must be an integer, got {value!r}")
    return value


def rule_from_description(d: Mapping[str, Any]) -> Rule:
    """Rebuild a rule from its `describe()` output (the ledger's `rule` field).

    Strict, since the auditor feeds it ledger contents: the `rule` name must be one of `RULES`, every
    parameter of that rule must be present with the right type, and no other field may appear. Raises
    ValueError naming the bad field otherwise.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"a rule description must be an object, got {type(d).__name__}")
    name = d.get("rule")
    if not isinstance(name, str) or name not in RULES:
        raise ValueError(f"rule field 'rule' must be one of {', '.join(RULES)}; got {name!r}")
    expected = {"fedavg": (), "median": (), "trimmed-mean": ("trim",), "krum": ("f", "m")}[name]
    for key in d:
        if key != "rule" and key not in expected:
            raise ValueError(f"rule field {key!r} is not a parameter of {name}")
    for key in expected:
        if key not in d:
            raise ValueError(f"rule field {key!r} is missing for {name}")
    if name == "fedavg":
        return FedAvg()
    if name == "median":
        return Median()
    if name == "trimmed-mean":
        trim = d["trim"]
        if isinstance(trim, bool) or not isinstance(trim, int | float):
            raise ValueError(f"rule field 'trim' must be a number, got {trim!r}")
        return TrimmedMean(float(trim))
    return Krum(_integer(d, "f"), _integer(d, "m"))
