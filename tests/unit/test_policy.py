"""protocols.policy: weights, the quality floor, the anti-capture cap and the norm bound, with exact numbers."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols import params_digest, structure
from protocols.aggregation import InMemory, RoundInput, aggregate_round
from protocols.policy import (
    WEIGHTINGS,
    Clipped,
    ContributionPolicy,
    base_weights,
    below_floor,
    cap_shares,
    clip_scale,
    policy_from_description,
    update_norm,
)
from protocols.robust import Krum, Median

DEFAULT = {"weighting": "examples", "quality_floor": None, "maximize": True, "max_share": None, "norm_bound": None}

# ---- the policy and its description ---------------------------------------------------------------------


def test_default_description() -> None:
    assert ContributionPolicy().describe() == DEFAULT
    assert WEIGHTINGS == ("examples", "equal", "quality")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"weighting": "stake"}, "weighting"),
        ({"quality_floor": math.nan}, "quality_floor"),
        ({"quality_floor": math.inf}, "quality_floor"),
        ({"quality_floor": "0.5"}, "quality_floor"),
        ({"maximize": "yes"}, "maximize"),
        ({"max_share": 0.0}, "max_share"),
        ({"max_share": 1.5}, "max_share"),
        ({"max_share": math.nan}, "max_share"),
        ({"norm_bound": 0.0}, "norm_bound"),
        ({"norm_bound": -1.0}, "norm_bound"),
        ({"norm_bound": math.inf}, "norm_bound"),
        ({"norm_bound": True}, "norm_bound"),
    ],
)
def test_invalid_settings_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must"):
        ContributionPolicy(**kwargs)


@pytest.mark.parametrize(
    "policy",
    [
        ContributionPolicy(),
        ContributionPolicy(weighting="equal", max_share=0.35),
        ContributionPolicy(weighting="quality", quality_floor=0.5, maximize=False, max_share=1.0, norm_bound=0.05),
    ],
)
def test_description_round_trip(policy: ContributionPolicy) -> None:
    assert policy_from_description(policy.describe()) == policy
    assert policy_from_description(policy.describe()).describe() == policy.describe()


def test_json_integers_become_floats() -> None:
    policy = policy_from_description({**DEFAULT, "quality_floor": 0, "max_share": 1, "norm_bound": 3})
    assert policy.describe() == {**DEFAULT, "quality_floor": 0.0, "max_share": 1.0, "norm_bound": 3.0}
    assert isinstance(policy.max_share, float)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"weighting": "stake"}, "weighting"),
        ({"weighting": 1}, "weighting"),
        ({"maximize": 1}, "maximize"),
        ({"max_share": "0.5"}, "max_share"),
        ({"max_share": True}, "max_share"),
        ({"max_share": 2.0}, "max_share"),
        ({"quality_floor": [0.5]}, "quality_floor"),
        ({"norm_bound": -3}, "norm_bound"),
        ({"extra": 1}, "extra"),
    ],
)
def test_malformed_descriptions_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        policy_from_description({**DEFAULT, **change})


def test_a_missing_field_is_named() -> None:
    for key in DEFAULT:
        with pytest.raises(ValueError, match=f"'{key}' is missing"):
            policy_from_description({k: v for k, v in DEFAULT.items() if k != key})
    with pytest.raises(ValueError, match="object"):
        policy_from_description("examples")  # type: ignore[arg-type]


# ---- weights and the floor ------------------------------------------------------------------------------


def test_base_weights() -> None:
    assert base_weights(ContributionPolicy(), [10, 20, 0], None) == [10.0, 20.0, 0.0]
    assert base_weights(ContributionPolicy(weighting="equal"), [10, 20], None) == [1.0, 1.0]
    quality = ContributionPolicy(weighting="quality")
    scores = [0.9, 0.5, None, math.nan, -1.0, 0.0, math.inf]
    assert base_weights(quality, [1] * 7, scores) == [0.9, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]
    minimise = ContributionPolicy(weighting="quality", maximize=False)
    assert base_weights(minimise, [1] * 5, [0.5, 2.0, 4.0, math.inf, 1e-320]) == [2.0, 0.5, 0.25, 0.0, 0.0]
    with pytest.raises(ValueError, match="needs a score"):
        base_weights(quality, [1, 2], None)
    with pytest.raises(ValueError, match="2 example counts but 1 scores"):
        base_weights(quality, [1, 2], [0.5])


def test_below_floor() -> None:
    assert not below_floor(ContributionPolicy(), None)
    high = ContributionPolicy(quality_floor=0.5)
    assert [below_floor(high, s) for s in (0.4, 0.5, 0.6, None, math.nan, math.inf)] == [
        True,
        False,
        False,
        True,
        True,
        True,
    ]
    low = ContributionPolicy(quality_floor=2.0, maximize=False)
    assert [below_floor(low, s) for s in (2.5, 2.0, 1.0, -math.inf)] == [True, False, False, True]


# ---- the anti-capture cap -------------------------------------------------------------------------------


def test_shares_without_a_cap() -> None:
    assert cap_shares([1, 3], None) == [0.25, 0.75]
    assert cap_shares([1.0, 3.0], 1.0) == [0.25, 0.75]
    assert cap_shares([2.0, 0.0, 2.0], None) == [0.5, 0.0, 0.5]


def test_cap_one_iteration() -> None:
    # 10/12 > 0.5 -> capped at 0.5; the remaining 0.5 split 1:1 -> 0.25 each
    assert cap_shares([10, 1, 1], 0.5) == [0.5, 0.25, 0.25]


def test_cap_two_iterations_6_3_1() -> None:
    # step 1: 6/10 = 0.6 > 0.4 -> cap member 0
    # step 2: R = 1 - 0.4, split 3:1 -> 0.45, 0.15; 0.45 > 0.4 -> cap member 1
    # step 3: R = 1 - 2 * 0.4 -> all to member 2, below the cap: done
    shares = cap_shares([6, 3, 1], 0.4)
    # exact on the float inputs: 1 - 2 * float(0.4) is representable, so the last share is exactly that
    last = Fraction(1) - 2 * Fraction(0.4)
    assert float(last) == last
    assert shares == [0.4, 0.4, float(last)]
    assert shares[2] == 0.19999999999999996  # not 0.2: float(0.4) is slightly above 2/5


def test_cap_two_iterations_8_4_2_1_1() -> None:
    # step 1: 8/16 = 0.5 > 0.3 -> cap 0;  step 2: R = 0.7, 4 * 0.7 / 8 = 0.35 > 0.3 -> cap 1
    # step 3: R = 1 - 2 * 0.3 = 0.4 (exactly float(0.4)), U = 4: 2 * 0.4 / 4 = 0.2, 0.1, 0.1
    assert float(1 - 2 * Fraction(0.3)) == 0.4
    assert cap_shares([8, 4, 2, 1, 1], 0.3) == [0.3, 0.3, 0.2, 0.1, 0.1]


def test_cap_with_zero_weights() -> None:
    # zero weights stay at 0 and do not absorb the excess
    assert cap_shares([3, 0, 1, 1], 0.5) == [0.5, 0.0, 0.25, 0.25]


def test_infeasible_cap_gives_equal_shares() -> None:
    assert cap_shares([5, 1], 0.4) == [0.5, 0.5]  # 2 * 0.4 < 1
    assert cap_shares([5, 1, 1], 0.3) == [1 / 3, 1 / 3, 1 / 3]
    assert cap_shares([3, 0, 1], 0.4) == [0.5, 0.0, 0.5]  # two positive weights: 2 * 0.4 < 1
    assert cap_shares([7], 0.5) == [1.0]


@pytest.mark.parametrize(
    ("weights", "cap", "message"),
    [
        ([0, 0], None, "every weight is 0"),
        ([], None, "no weights"),
        ([1, -1], None, "finite and >= 0"),
        ([1, math.nan], None, "finite and >= 0"),
        ([1e308, 1e308], None, "overflows"),
        ([1, 1], 0.0, "max_share"),
        ([1, 1], 1.5, "max_share"),
    ],
)
def test_cap_refuses(weights: list[float], cap: float | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cap_shares(weights, cap)


@given(
    st.lists(st.integers(min_value=0, max_value=10_000), min_size=1, max_size=12).filter(any),
    st.floats(min_value=0.05, max_value=1.0),
)
def test_cap_properties(weights: list[int], cap: float) -> None:
    shares = cap_shares(weights, cap)
    positive = sum(1 for w in weights if w > 0)
    assert math.isclose(sum(shares), 1.0, abs_tol=1e-12)
    assert all(s == 0.0 for s, w in zip(shares, weights, strict=True) if w == 0)
    if positive * cap < 1:
        assert all(s == 1 / positive for s, w in zip(shares, weights, strict=True) if w > 0)
        return
    assert max(shares) <= cap
    free = [(s, w) for s, w in zip(shares, weights, strict=True) if w > 0 and s < cap]
    for s, w in free:  # the uncapped keep the proportions of their weights
        assert math.isclose(s / w, free[0][0] / free[0][1], rel_tol=1e-12)
    assert cap_shares(weights, cap) == shares


# ---- the norm bound -------------------------------------------------------------------------------------

BASE = {"b": np.array([1.0]), "n": np.array([5], dtype=np.int64), "w": np.array([0.0, 0.0])}


def test_update_norm_skips_integer_arrays() -> None:
    update = InMemory(
        {"b": np.array([5.0]), "n": np.array([100], dtype=np.int64), "w": np.array([3.0, 0.0], np.float32)}
    )
    assert update_norm(["b", "n", "w"], update, BASE) == 5.0  # sqrt(4^2 + 3^2 + 0^2)
    same = InMemory(BASE)
    assert update_norm(["b", "n", "w"], same, BASE) == 0.0


def test_clip_scale() -> None:
    assert clip_scale(5.0, None) == 1.0
    assert clip_scale(5.0, 10.0) == 1.0
    assert clip_scale(5.0, 5.0) == 1.0
    assert clip_scale(5.0, 2.0) == 0.4
    assert clip_scale(0.0, 2.0) == 1.0


def test_clipped_source() -> None:
    arrays = {"b": np.array([1.0]), "n": np.array([100], dtype=np.int64), "w": np.array([3.0, 4.0], np.float32)}
    clipped = Clipped(InMemory(arrays), BASE, 0.4)
    assert clipped.array("w").tolist() == [0.0 + 0.4 * (3.0 - 0.0), 0.0 + 0.4 * (4.0 - 0.0)]
    assert clipped.array("w").dtype == np.float64
    assert clipped.array("b").tolist() == [1.0]  # no delta
    assert clipped.array("n") is arrays["n"]  # integer arrays untouched
    assert math.isclose(update_norm(["b", "n", "w"], clipped, BASE), 2.0, rel_tol=1e-15)
    unscaled = Clipped(InMemory(arrays), BASE, 1.0).array("w")
    assert unscaled.dtype == np.float64 and unscaled.tolist() == [3.0, 4.0]


# ---- wired through aggregate_round ----------------------------------------------------------------------


def test_policy_and_robust_rule_through_aggregate_round() -> None:
    base = {"w": np.zeros(2, np.float32)}
    updates = [
        {"w": np.array([1.0, 0.0], np.float32)},
        {"w": np.array([0.0, 1.0], np.float32)},
        {"w": np.array([1.0, 1.0], np.float32)},
        {"w": np.array([30.0, 40.0], np.float32)},  # norm 50: scaled to the bound 2 -> (1.2, 1.6)
    ]
    inputs = [RoundInput(f"m{i}", params_digest(u), 10 * (i + 1), InMemory(u)) for i, u in enumerate(updates)]
    policy = ContributionPolicy(max_share=0.4, norm_bound=2.0)
    out = aggregate_round(structure(base), base, inputs, policy, Median())
    by_member = {item.member_id: k for k, item in enumerate(out.order)}
    k3 = by_member["m3"]
    assert out.norms[k3] == 50.0 and out.scales[k3] == 0.04
    assert [out.scales[by_member[f"m{i}"]] for i in range(3)] == [1.0, 1.0, 1.0]
    assert max(out.shares) <= 0.4 and math.isclose(sum(out.shares), 1.0)
    # median of the x coordinates (1, 0, 1, 1.2) -> (1 + 1) / 2 = 1; of y (0, 1, 1, 1.6) -> 1
    assert out.arrays["w"].tolist() == [1.0, 1.0]
    krum = aggregate_round(structure(base), base, inputs, ContributionPolicy(), Krum(1))
    assert len(krum.rule_scores) == 4 and len(krum.selected) == 1
    assert by_member["m3"] not in krum.selected
