"""protocols.robust: median, trimmed mean and (multi-)Krum against hand-computed values; determinism; robustness."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import protocols.robust as robust
from protocols.aggregation import FedAvg, InMemory, Rule
from protocols.robust import RULES, Krum, Median, TrimmedMean, rule_from_description, squared_distance

ROOT = Path(__file__).resolve().parents[2]


def sources(*arrays: dict[str, Any]) -> list[InMemory]:
    return [InMemory({k: np.asarray(v) for k, v in a.items()}) for a in arrays]


def run(rule: Rule, srcs: list[InMemory], shares: list[float] | None = None) -> dict[str, np.ndarray]:
    names = sorted(srcs[0].arrays)
    return rule.aggregate(names, srcs, shares if shares is not None else [1.0] * len(srcs)).arrays


# ---- median ------------------------------------------------------------------------------------------


def test_median_odd_n_by_hand() -> None:
    srcs = sources(
        {"a": [1.0, 5.0, -2.0], "n": np.array([0, 7], dtype=np.int64)},
        {"a": [3.0, 4.0, 0.5], "n": np.array([1, 7], dtype=np.int64)},
        {"a": [2.0, 9.0, -1.0], "n": np.array([4, 8], dtype=np.int64)},
    )
    result = Median().aggregate(["a", "n"], srcs, [5.0, 1.0, 1.0])  # shares are ignored
    # per coordinate: sorted (1, 2, 3) -> 2;  (4, 5, 9) -> 5;  (-2, -1, 0.5) -> -1;  ints (0, 1, 4) -> 1, (7, 7, 8) -> 7
    np.testing.assert_array_equal(result.arrays["a"], [2.0, 5.0, -1.0])
    np.testing.assert_array_equal(result.arrays["n"], [1.0, 7.0])
    assert result.arrays["a"].dtype == np.float64 and result.arrays["n"].dtype == np.float64
    assert result.selected == (0, 1, 2) and result.scores == ()


def test_median_even_n_is_the_mean_of_the_two_middle_values() -> None:
    srcs = sources({"a": [1.0, 5.0, -2.0]}, {"a": [3.0, 4.0, 0.5]}, {"a": [2.0, 9.0, -1.0]}, {"a": [10.0, 0.0, 0.25]})
    # sorted: (1, 2, 3, 10) -> 2.5;  (0, 4, 5, 9) -> 4.5;  (-2, -1, 0.25, 0.5) -> (-1 + 0.25) / 2 = -0.375
    out = run(Median(), srcs)
    np.testing.assert_array_equal(out["a"], [2.5, 4.5, -0.375])
    np.testing.assert_array_equal(out["a"], np.median(np.stack([s.arrays["a"] for s in srcs]), axis=0))


def test_median_returns_positive_zero() -> None:
    for n in (3, 4):
        srcs = sources(*({"a": [-0.0, 0.0, -0.0]} if i % 2 == 0 else {"a": [0.0, -0.0, -0.0]} for i in range(n)))
        out = run(Median(), srcs)["a"]
        assert out.tobytes() == np.zeros(3).tobytes()


# ---- trimmed mean --------------------------------------------------------------------------------------


def test_trimmed_mean_k1_by_hand() -> None:
    srcs = sources(
        {"a": [1.0, -50.0, 0.1]},
        {"a": [100.0, 0.5, 0.3]},
        {"a": [3.0, 0.25, 0.5]},
        {"a": [2.0, 1.0, 0.2]},
        {"a": [4.0, 0.75, 0.4]},
    )
    rule = TrimmedMean(0.2)
    assert rule.trimmed(5) == 1  # floor(0.2 * 5)
    result = rule.aggregate(["a"], srcs, [1.0] * 5)
    # sorted (1, 2, 3, 4, 100) -> keep 2, 3, 4 -> 3;  (-50, .25, .5, .75, 1) -> (.25 + .5 + .75) / 3 = 0.5
    # (.1, .2, .3, .4, .5) -> ((0.2 + 0.3) + 0.4) / 3, left to right in float64
    np.testing.assert_array_equal(result.arrays["a"], [3.0, 0.5, ((0.2 + 0.3) + 0.4) / 3])
    assert result.selected == (0, 1, 2, 3, 4)


def test_trimmed_mean_k0_is_the_plain_mean_and_k_grows_with_n() -> None:
    srcs = sources({"a": [1.0]}, {"a": [2.0]}, {"a": [4.0]}, {"a": [9.0]})
    assert TrimmedMean(0.2).trimmed(4) == 0
    assert run(TrimmedMean(0.2), srcs)["a"].tolist() == [4.0]  # (1 + 2 + 4 + 9) / 4
    assert TrimmedMean(0.25).trimmed(4) == 1
    assert run(TrimmedMean(0.25), srcs)["a"].tolist() == [3.0]  # (2 + 4) / 2
    assert run(TrimmedMean(0.0), srcs)["a"].tolist() == [4.0]


def test_trimmed_mean_that_would_remove_everything_is_refused() -> None:
    rule = TrimmedMean(0.2)
    object.__setattr__(rule, "trim", 0.5)  # unreachable through the constructor; the check is a backstop
    with pytest.raises(ValueError, match="removes all 2 updates"):
        run(rule, sources({"a": [1.0]}, {"a": [2.0]}))


# ---- Krum ----------------------------------------------------------------------------------------------

# five points (a, b) in two arrays, plus an integer array that Krum's distances leave out:
#   p0 = (0, 0)  p1 = (1, 0)  p2 = (0, 2)  p3 = (1, 1)  p4 = (5, 5)
# squared distances:
#   d01 = 1  d02 = 4  d03 = 2  d04 = 50  d12 = 5  d13 = 1  d14 = 41  d23 = 2  d24 = 34  d34 = 32
# f = 1, n = 5: each score sums the n - f - 2 = 2 nearest:
#   s0 = 1 + 2 = 3   s1 = 1 + 1 = 2   s2 = 2 + 4 = 6   s3 = 1 + 2 = 3   s4 = 32 + 34 = 66
POINTS = [(0.0, 0.0), (1.0, 0.0), (0.0, 2.0), (1.0, 1.0), (5.0, 5.0)]
SCORES = (3.0, 2.0, 6.0, 3.0, 66.0)


def krum_sources() -> list[InMemory]:
    return sources(
        *({"a": [x], "b": [y], "n": np.array([1000 * i], dtype=np.int64)} for i, (x, y) in enumerate(POINTS))
    )


def test_krum_scores_by_hand() -> None:
    result = Krum(1).aggregate(["a", "b", "n"], krum_sources(), [1.0, 3.0, 5.0, 7.0, 9.0])
    assert result.scores == SCORES
    assert result.selected == (1,)
    assert result.arrays["a"].tolist() == [1.0] and result.arrays["b"].tolist() == [0.0]
    assert result.arrays["n"].tolist() == [1000.0]  # the selected update's own value


def test_multi_krum_m2_share_weighted_with_tie_to_the_lower_index() -> None:
    # lowest scores: s1 = 2, then s0 = s3 = 3 (tie: index 0 first) -> selected (0, 1)
    result = Krum(1, m=2).aggregate(["a", "b", "n"], krum_sources(), [1.0, 3.0, 5.0, 7.0, 9.0])
    assert result.selected == (0, 1) and result.scores == SCORES
    # (1 * p0 + 3 * p1) / (1 + 3) = (0.75, 0);  n: (1 * 0 + 3 * 1000) / 4 = 750
    assert result.arrays["a"].tolist() == [0.75]
    assert result.arrays["b"].tolist() == [0.0]
    assert result.arrays["n"].tolist() == [750.0]


def test_multi_krum_m3_and_zero_shares() -> None:
    shares = [1.0, 3.0, 5.0, 7.0, 9.0]
    result = Krum(1, m=3).aggregate(["a", "b"], krum_sources(), shares)
    assert result.selected == (0, 1, 3)
    # (1 * p0 + 3 * p1 + 7 * p3) / 11 = (10 / 11, 7 / 11)
    assert result.arrays["a"].tolist() == [(0.0 * 1.0 + 1.0 * 3.0 + 1.0 * 7.0) / 11.0]
    assert result.arrays["b"].tolist() == [7.0 / 11.0]
    # the selected shares all 0: equal weights among the selected
    zero = Krum(1, m=2).aggregate(["a", "b"], krum_sources(), [0.0, 0.0, 5.0, 5.0, 5.0])
    assert zero.selected == (0, 1) and zero.arrays["a"].tolist() == [0.5] and zero.arrays["b"].tolist() == [0.0]


def test_krum_parameters_against_the_number_of_updates() -> None:
    with pytest.raises(ValueError, match="f=1 needs at least 4 updates, got 3"):
        run(Krum(1), krum_sources()[:3])
    with pytest.raises(ValueError, match="m=6 needs at least 6 updates"):
        run(Krum(1, m=6), krum_sources())
    assert run(Krum(1, m=5), krum_sources())["a"].tolist() == [7.0 / 5.0]  # every update: the plain mean
    with pytest.raises(ValueError, match="shares"):
        run(Krum(1), krum_sources(), [1.0, -1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="5 updates but 4 shares"):
        run(Krum(1), krum_sources(), [1.0] * 4)


def test_squared_distance_is_a_sequential_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    a = rng.standard_normal((7, 5)).astype(np.float32)
    b = rng.standard_normal((7, 5))
    expected = 0.0
    for x, y in zip(a.astype(np.float64).ravel().tolist(), b.ravel().tolist(), strict=True):
        expected += (x - y) * (x - y)
    assert squared_distance(a, b) == expected
    monkeypatch.setattr(robust, "_CHUNK", 4)  # the carry across chunks keeps the same order
    assert squared_distance(a, b) == expected
    assert squared_distance(np.zeros(0), np.zeros(0)) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        squared_distance(np.zeros(3), np.zeros((3, 1)))


# ---- determinism and robustness ------------------------------------------------------------------------


def noisy(seed: int, n: int = 10) -> list[InMemory]:
    rng = np.random.default_rng(seed)
    return sources(
        *({"w": rng.standard_normal((4, 6)), "b": rng.standard_normal(3).astype(np.float32)} for _ in range(n))
    )


@pytest.mark.parametrize("rule", [Median(), TrimmedMean(0.2), Krum(2, m=3), FedAvg()], ids=lambda r: r.name)
def test_same_inputs_same_bytes(rule: Rule) -> None:
    shares = [float(i + 1) for i in range(10)]
    first = rule.aggregate(["b", "w"], noisy(1), shares)
    second = rule.aggregate(["b", "w"], noisy(1), shares)
    assert {k: v.tobytes() for k, v in first.arrays.items()} == {k: v.tobytes() for k, v in second.arrays.items()}
    assert first.selected == second.selected and first.scores == second.scores


@pytest.mark.parametrize("rule", [Median(), TrimmedMean(0.2), TrimmedMean(0.3)], ids=lambda r: str(r.describe()))
def test_order_does_not_matter_for_median_and_trimmed_mean(rule: Rule) -> None:
    srcs = noisy(2)
    reference = rule.aggregate(["b", "w"], srcs, [1.0] * 10).arrays
    for seed in range(5):
        perm = np.random.default_rng(seed).permutation(10)
        out = rule.aggregate(["b", "w"], [srcs[i] for i in perm], [1.0] * 10).arrays
        assert {k: v.tobytes() for k, v in out.items()} == {k: v.tobytes() for k, v in reference.items()}


def test_two_attackers_out_of_ten() -> None:
    rng = np.random.default_rng(0)
    honest = [{"w": 1.0 + 0.01 * rng.standard_normal(10)} for _ in range(8)]
    attackers = [{"w": np.full(10, -100.0)} for _ in range(2)]
    srcs = sources(*honest[:3], attackers[0], *honest[3:6], attackers[1], *honest[6:])
    for rule in (Median(), TrimmedMean(0.2), Krum(2), Krum(2, m=4)):
        out = run(rule, srcs)["w"]
        assert np.abs(out - 1.0).max() < 0.05, rule.describe()
    krum = Krum(2).aggregate(["w"], srcs, [1.0] * 10)
    assert 3 not in krum.selected and 7 not in krum.selected
    assert krum.scores[3] > 1000 and krum.scores[7] > 1000
    assert run(FedAvg(), srcs)["w"].mean() < -15  # (8 * 1 - 200) / 10 = -19.2


# ---- parameters and descriptions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: TrimmedMean(0.5), "trim"),
        (lambda: TrimmedMean(-0.1), "trim"),
        (lambda: TrimmedMean(math.nan), "trim"),
        (lambda: TrimmedMean("0.2"), "trim"),  # type: ignore[arg-type]
        (lambda: Krum(-1), "f"),
        (lambda: Krum(1.5), "f"),  # type: ignore[arg-type]
        (lambda: Krum(True), "f"),
        (lambda: Krum(1, m=0), "m"),
        (lambda: Krum(1, m=2.0), "m"),  # type: ignore[arg-type]
    ],
)
def test_invalid_parameters_name_the_field(make: Any, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must"):
        make()


def test_describe_values() -> None:
    assert Median().describe() == {"rule": "median"}
    assert TrimmedMean(0.2).describe() == {"rule": "trimmed-mean", "trim": 0.2}
    assert Krum(2).describe() == {"rule": "krum", "f": 2, "m": 1}
    assert Krum(2, m=3).describe() == {"rule": "krum", "f": 2, "m": 3}
    assert RULES == ("fedavg", "median", "trimmed-mean", "krum")


@pytest.mark.parametrize("rule", [FedAvg(), Median(), TrimmedMean(0.2), TrimmedMean(0.0), Krum(2), Krum(1, m=3)])
def test_description_round_trip(rule: Rule) -> None:
    rebuilt = rule_from_description(rule.describe())
    assert rebuilt == rule and type(rebuilt) is type(rule)
    assert rebuilt.describe() == rule.describe()
    assert rule.describe()["rule"] in RULES


def test_json_integers_are_accepted_for_trim() -> None:
    assert rule_from_description({"rule": "trimmed-mean", "trim": 0}) == TrimmedMean(0.0)


@pytest.mark.parametrize(
    ("description", "field"),
    [
        ({}, "'rule'"),
        ({"rule": "mean"}, "'rule'"),
        ({"rule": 3}, "'rule'"),
        ({"rule": "median", "trim": 0.1}, "'trim'"),
        ({"rule": "fedavg", "f": 1}, "'f'"),
        ({"rule": "trimmed-mean"}, "'trim'"),
        ({"rule": "trimmed-mean", "trim": "0.2"}, "'trim'"),
        ({"rule": "trimmed-mean", "trim": True}, "'trim'"),
        ({"rule": "trimmed-mean", "trim": 0.5}, "trim"),
        ({"rule": "krum", "f": 2}, "'m'"),
        ({"rule": "krum", "m": 1}, "'f'"),
        ({"rule": "krum", "f": "2", "m": 1}, "'f'"),
        ({"rule": "krum", "f": True, "m": 1}, "'f'"),
        ({"rule": "krum", "f": 2.0, "m": 1}, "'f'"),
        ({"rule": "krum", "f": -1, "m": 1}, "f"),
        ({"rule": "krum", "f": 1, "m": 0}, "m"),
        ({"rule": "krum", "f": 1, "m": 1, "seed": 3}, "'seed'"),
    ],
)
def test_malformed_descriptions_name_the_field(description: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        rule_from_description(description)


def test_a_description_must_be_an_object() -> None:
    with pytest.raises(ValueError, match="object"):
        rule_from_description(["median"])  # type: ignore[arg-type]


# ---- border ---------------------------------------------------------------------------------------------


def test_robust_and_policy_import_neither_torch_nor_flwr() -> None:
    for rel in ("protocols/robust.py", "protocols/policy.py"):
        tree = ast.parse((ROOT / rel).read_text())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert roots <= {"__future__", "math", "collections", "dataclasses", "typing", "numpy", "protocols"}, rel
    code = (
        "import sys, protocols.robust, protocols.policy; "
        "print(sorted(m for m in ('torch', 'flwr') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
