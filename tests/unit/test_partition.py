"""federation/partition.py: IID and Dirichlet label-skew splits."""

from __future__ import annotations

import numpy as np
import pytest

from federation.partition import dirichlet_partition, iid_partition

LABELS = np.repeat(np.arange(10), 100)  # 1,000 examples, 100 of each of 10 classes


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n  # no index twice...
    assert np.array_equal(np.sort(joined), np.arange(n))  # ...and every index once


def mean_max_class_share(parts: list[np.ndarray], labels: np.ndarray) -> float:
    shares = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
    return float(np.mean(shares))


# ---- IID ---------------------------------------------------------------------------------------------------


def test_iid_sizes_and_cover() -> None:
    parts = iid_partition(10, 3, seed=0)
    assert [len(p) for p in parts] == [4, 3, 3]
    assert_exact_cover(parts, 10)
    for p in parts:
        assert np.array_equal(p, np.sort(p))


def test_iid_is_deterministic_and_seeded() -> None:
    a = iid_partition(10, 3, seed=0)
    b = iid_partition(10, 3, seed=0)
    c = iid_partition(10, 3, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    assert_exact_cover(c, 10)


def test_iid_one_part_is_everything() -> None:
    (only,) = iid_partition(5, 1, seed=3)
    assert np.array_equal(only, np.arange(5))


@pytest.mark.parametrize(
    ("n", "parts", "message"),
    [
        (10, 0, "need at least one part, got 0"),
        (2, 3, "2 examples cannot be split across 3 nodes"),
    ],
)
def test_iid_errors(n: int, parts: int, message: str) -> None:
    with pytest.raises(ValueError) as exc_info:
        iid_partition(n, parts, seed=0)
    assert str(exc_info.value) == message


# ---- Dirichlet ---------------------------------------------------------------------------------------------


def test_dirichlet_disjoint_cover_and_min_size() -> None:
    parts = dirichlet_partition(LABELS, 5, alpha=0.5, seed=0, min_size=20)
    assert len(parts) == 5
    assert_exact_cover(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 20
    for p in parts:
        assert p.dtype == np.int64
        assert np.array_equal(p, np.sort(p))


def test_dirichlet_is_deterministic_and_seeded() -> None:
    a = dirichlet_partition(LABELS, 5, alpha=0.5, seed=4)
    b = dirichlet_partition(LABELS, 5, alpha=0.5, seed=4)
    c = dirichlet_partition(LABELS, 5, alpha=0.5, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_alpha_gives_more_label_skew(seed: int) -> None:
    skewed = mean_max_class_share(dirichlet_partition(LABELS, 5, alpha=0.1, seed=seed), LABELS)
    balanced = mean_max_class_share(dirichlet_partition(LABELS, 5, alpha=100.0, seed=seed), LABELS)
    # With alpha=100 each node holds close to 10% of every class; with alpha=0.1 one class dominates.
    assert balanced < 0.15
    assert skewed > 0.4
    assert skewed > balanced


@pytest.mark.parametrize(
    ("labels", "parts", "kwargs", "message"),
    [
        (LABELS, 5, {"alpha": 0.0}, "alpha must be > 0, got 0.0"),
        (LABELS, 5, {"alpha": -1.0}, "alpha must be > 0, got -1.0"),
        (LABELS, 5, {"alpha": float("nan")}, "alpha must be > 0, got nan"),
        (np.zeros(50, dtype=np.int64), 6, {"alpha": 1.0}, "50 examples cannot give 6 nodes 10 each"),
        (np.zeros(50, dtype=np.int64), 3, {"alpha": 1.0, "min_size": 17}, "50 examples cannot give 3 nodes 17 each"),
        (LABELS, 0, {"alpha": 1.0}, "need at least one part, got 0"),
        (np.zeros(3, dtype=np.int64), 5, {"alpha": 1.0}, "3 examples cannot be split across 5 nodes"),
    ],
)
def test_dirichlet_errors(labels: np.ndarray, parts: int, kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError) as exc_info:
        dirichlet_partition(labels, parts, seed=0, **kwargs)  # type: ignore[arg-type]
    assert str(exc_info.value) == message


def test_dirichlet_gives_up_after_max_tries() -> None:
    labels = np.repeat([0, 1], 10)
    with pytest.raises(ValueError) as exc_info:
        dirichlet_partition(labels, 2, alpha=0.01, seed=0, min_size=10, max_tries=3)
    assert str(exc_info.value) == (
        "no Dirichlet(alpha=0.01) split gave all 2 nodes >= 10 examples in 3 draws; raise alpha or use fewer nodes"
    )
