"""The contribution policy: how much each accepted update counts in a round's aggregate.

Three steps per round, each a pure, deterministic float64 function documented with its formula
(docs/PROTOCOL.md, section 16.2), so the coordinator and the offline auditor compute the same bits:

1. norm bound: an update whose delta from the round's base model is longer than `norm_bound` is scaled
   down to it (`update_norm`, `clip_scale`, `Clipped`);
2. weights: signed example counts, equal, or measured quality (`base_weights`);
3. shares: the weights normalised to sum to 1, with the anti-capture cap `max_share` applied by
   water-filling (`cap_shares`).

The quality floor acts earlier, when a reply is accepted (`below_floor`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocols.aggregation import UpdateSource
from protocols.robust import squared_distance

WEIGHTINGS = ("examples", "equal", "quality")
"""The values of `ContributionPolicy.weighting`."""

_FIELDS = ("weighting", "quality_floor", "maximize", "max_share", "norm_bound")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class ContributionPolicy:
    """How accepted updates are weighted, capped and bounded; recorded in the ledger by `describe()`.

    Raises ValueError naming the field when a setting is out of range.
    """

    weighting: str = "examples"
    """`examples` (the signed example count), `equal` (1 each) or `quality` (the measured score)."""
    quality_floor: float | None = None
    """Reject an update whose quality score is worse than this (None: no floor)."""
    maximize: bool = True
    """Whether a higher quality score is better (the task's target metric direction)."""
    max_share: float | None = None
    """Anti-capture cap: no single update's share of the aggregate may exceed this, in (0, 1]."""
    norm_bound: float | None = None
    """L2 bound on an update's delta from the round's global model; longer deltas are scaled down to it."""

    def __post_init__(self) -> None:
        if not isinstance(self.weighting, str) or self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {self.weighting!r}")
        if self.quality_floor is not None and not (
            _is_number(self.quality_floor) and math.isfinite(self.quality_floor)
        ):
            raise ValueError(f"quality_floor must be a finite number or None, got {self.quality_floor!r}")
        if not isinstance(self.maximize, bool):
            raise ValueError(f"maximize must be true or false, got {self.maximize!r}")
        if self.max_share is not None and not (_is_number(self.max_share) and 0.0 < self.max_share <= 1.0):
            raise ValueError(f"max_share must be in (0, 1] or None, got {self.max_share!r}")
        if self.norm_bound is not None and not (
            _is_number(self.norm_bound) and math.isfinite(self.norm_bound) and self.norm_bound > 0
        ):
            raise ValueError(f"norm_bound must be a finite number > 0 or None, got {self.norm_bound!r}")

    @property
    def measures_quality(self) -> bool:
        """Whether the coordinator must score each update (quality weighting or a quality floor)."""
        return self.weighting == "quality" or self.quality_floor is not None

    def describe(self) -> dict[str, Any]:
        """Plain JSON for the ledger: the five settings, numbers as floats, None for "off"."""
        return {
            "weighting": self.weighting,
            "quality_floor": None if self.quality_floor is None else float(self.quality_floor),
            "maximize": self.maximize,
            "max_share": None if self.max_share is None else float(self.max_share),
            "norm_bound": None if self.norm_bound is None else float(self.norm_bound),
        }


def policy_from_description(d: Mapping[str, Any]) -> ContributionPolicy:
    """Rebuild a policy from its `describe()` output (the ledger's `policy` field).

    Strict, since the auditor feeds it ledger contents: exactly the five fields, each of the right type
    (numbers or null for `quality_floor`, `max_share`, `norm_bound`; a boolean `maximize`; a string
    `weighting`). Raises ValueError naming the bad field otherwise.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"a policy description must be an object, got {type(d).__name__}")
    for key in d:
        if key not in _FIELDS:
            raise ValueError(f"policy field {key!r} is unknown")
    for key in _FIELDS:
        if key not in d:
            raise ValueError(f"policy field {key!r} is missing")
    if not isinstance(d["weighting"], str):
        raise ValueError(f"policy field 'weighting' must be a string, got {d['weighting']!r}")
    if not isinstance(d["maximize"], bool):
        raise ValueError(f"policy field 'maximize' must be true or false, got {d['maximize']!r}")
    numbers: dict[str, float | None] = {}
    for key in ("quality_floor", "max_share", "norm_bound"):
        value = d[key]
        if value is not None and not _is_number(value):
            raise ValueError(f"policy field {key!r} must be a number or null, got {value!r}")
        numbers[key] = None if value is None else float(value)
    return ContributionPolicy(
        weighting=d["weighting"],
        quality_floor=numbers["quality_floor"],
        maximize=d["maximize"],
        max_share=numbers["max_share"],
        norm_bound=numbers["norm_bound"],
    )


def base_weights(
    policy: ContributionPolicy, num_examples: Sequence[int], scores: Sequence[float | None] | None
) -> list[float]:
    """Each update's weight w_i before normalisation, in the order given (float64).

    - `examples`: w_i = float(num_examples_i);
    - `equal`: w_i = 1.0;
    - `quality`: w_i = score_i when `policy.maximize`, else 1.0 / score_i (`scores` is required).

    A weight that is not finite or not positive becomes 0.0: a missing (None), NaN, infinite, zero or
    negative score gives its update no weight (and 1 / score overflowing to inf does too).
    Raises ValueError when `scores` is needed and absent, or its length differs from `num_examples`.
    """
    n = len(num_examples)
    if scores is not None and len(scores) != n:
        raise ValueError(f"{n} example counts but {len(scores)} scores")
    if policy.weighting == "examples":
        raw: list[float] = [float(e) for e in num_examples]
    elif policy.weighting == "equal":
        raw = [1.0] * n
    else:
        if scores is None:
            raise ValueError("quality weighting needs a score per update")
        raw = []
        for score in scores:
            if score is None or not math.isfinite(score) or score <= 0:
                raw.append(0.0)
            else:
                raw.append(float(score) if policy.maximize else 1.0 / float(score))
    return [w if math.isfinite(w) and w > 0 else 0.0 for w in raw]


def below_floor(policy: ContributionPolicy, score: float | None) -> bool:
    """Whether a quality floor is set and `score` fails it.

    Fails: the score is worse than the floor (`score < floor` when maximising, `score > floor` when
    minimising; equal passes), or missing (None) or not finite. Without a floor, always False.
    """
    floor = policy.quality_floor
    if floor is None:
        return False
    if score is None or not math.isfinite(score):
        return True
    return score < floor if policy.maximize else score > floor


def cap_shares(weights: Sequence[float], max_share: float | None) -> list[float]:
    """Shares summing to 1 from the weights, with the anti-capture cap applied by water-filling.

    Without a cap: share_i = w_i / W, where W = w_0 + w_1 + ... summed left to right in float64.

    With a cap c, over the P updates with a positive weight (a zero weight always gets share 0.0):

    - if P * c < 1 the cap cannot hold with so few contributors, and equal shares are the closest
      assignment: each positive-weight update gets 1.0 / P;
    - otherwise, starting with no update capped, repeat (at most P times): with C the capped set,
      R = 1.0 - |C| * c (float64: the product, then the difference) is the mass left and
      U = sum of w_j over the uncapped j (left to right); every uncapped update gets
      share_i = (w_i * R) / U; if any of these exceeds c, all such are added to C (share exactly c)
      and the step repeats; otherwise the shares are final. The first step (C empty, R = 1.0) is the
      uncapped formula. The excess is thus redistributed in proportion to the weights.

    Raises ValueError for an empty list, a negative or non-finite weight, all-zero weights, a weight
    sum that overflows, or a cap outside (0, 1].
    """
    w = [float(x) for x in weights]
    if not w:
        raise ValueError("no weights to normalise")
    for x in w:
        if not (math.isfinite(x) and x >= 0):
            raise ValueError(f"weights must be finite and >= 0, got {x!r}")
    total = 0.0
    for x in w:
        total += x
    if total == 0:
        raise ValueError("every weight is 0: no update can count")
    if not math.isfinite(total):
        raise ValueError("the weights' sum overflows")
    if max_share is None:
        return [x / total for x in w]
    if not (_is_number(max_share) and 0.0 < max_share <= 1.0):
        raise ValueError(f"max_share must be in (0, 1], got {max_share!r}")
    cap = float(max_share)
    positive = [i for i, x in enumerate(w) if x > 0]
    count = len(positive)
    equal = [1.0 / count if x > 0 else 0.0 for x in w]
    if count * cap < 1:
        return equal
    capped: set[int] = set()
    shares: dict[int, float] = {}
    for _ in range(count):
        remaining = 1.0 - len(capped) * cap
        free = [i for i in positive if i not in capped]
        free_total = 0.0
        for i in free:
            free_total += w[i]
        shares = {i: (w[i] * remaining) / free_total for i in free}
        over = [i for i in free if shares[i] > cap]
        if not over:
            break
        if len(over) == len(free):  # only rounding can get here when count * cap >= 1: the closest is equal
            return equal
        capped.update(over)
    return [cap if i in capped else shares.get(i, 0.0) for i in range(len(w))]


def _floating(array: np.ndarray) -> bool:
    return np.asarray(array).dtype.kind == "f"


def update_norm(names: Sequence[str], source: UpdateSource, base: Mapping[str, np.ndarray]) -> float:
    """‖x - base‖: the L2 norm of the update's delta from the base model, in float64.

    `sqrt(D)` where D = sum over the floating arrays in `names` order (by the update's dtype) of
    `protocols.robust.squared_distance(x, base)` (each array's squares summed left to right in C order),
    added array by array starting from 0.0; `math.sqrt` is correctly rounded. Integer and bool arrays
    are skipped.
    """
    total = 0.0
    for name in names:
        x = source.array(name)
        if not _floating(x):
            continue
        total += squared_distance(x, base[name])
    return math.sqrt(total)


def clip_scale(norm: float, bound: float | None) -> float:
    """The factor an update's delta is scaled by: 1.0 if `bound` is None or norm <= bound, else bound / norm."""
    if bound is None or norm <= bound:
        return 1.0
    return float(bound) / float(norm)


@dataclass(frozen=True)
class Clipped:
    """An `UpdateSource` whose delta from `base` is scaled by `scale` (the norm bound).

    `array(name)`: for a floating array, `base + scale * (x - base)` in float64 (the difference, the
    product, then the sum; with scale == 1.0 just `x` as float64); integer and bool arrays unchanged.
    """

    source: UpdateSource
    base: Mapping[str, np.ndarray]
    scale: float

    def array(self, name: str) -> np.ndarray:
        """The array `name`, its delta scaled (floating arrays), as float64; other arrays as they are."""
        x = self.source.array(name)
        if not _floating(x):
            return x
        x64 = np.asarray(x, dtype=np.float64)
        if self.scale == 1.0:
            return x64
        b = np.asarray(self.base[name], dtype=np.float64)
        return b + float(self.scale) * (x64 - b)
