"""protocols.aggregation: FedAvg through `aggregate_round`, against hand-computed values, and canonical order."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.spool import UpdateSpool
from protocols import SignedBlob, params_digest, structure
from protocols.aggregation import FedAvg, InMemory, RoundInput, aggregate_round, cast_to_template, weighted_mean
from protocols.policy import ContributionPolicy

SIGNED = SignedBlob(b"envelope bytes", b"signature bytes")  # the spool keeps them beside the arrays


def fedavg(updates: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    template = structure(updates[0][0])
    inputs = [RoundInput(f"{i:016x}", params_digest(a), w, InMemory(a)) for i, (a, w) in enumerate(updates)]
    return aggregate_round(template, updates[0][0], inputs, ContributionPolicy(), FedAvg()).arrays


def in_order(updates: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    """FedAvg in exactly the order given (no canonical sort)."""
    names = sorted(updates[0][0])
    mean = weighted_mean(names, [InMemory(a) for a, _ in updates], [float(w) for _, w in updates])
    return cast_to_template(mean, structure(updates[0][0]))


def test_weighted_mean_by_hand() -> None:
    a = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    b = np.array([[-1.0, 0.0, 0.5], [2.0, 10.0, -6.0]])
    # weights 1 and 3:  (1*a + 3*b) / 4
    #   1*a + 3*b = [[1-3, 2+0, 3+1.5], [4+6, 5+30, 6-18]] = [[-2, 2, 4.5], [10, 35, -12]]
    #   / 4       = [[-0.5, 0.5, 1.125], [2.5, 8.75, -3]]   (all exact in binary floating point)
    out = fedavg([({"w": a}, 1), ({"w": b}, 3)])
    expected = np.array([[-0.5, 0.5, 1.125], [2.5, 8.75, -3.0]])
    np.testing.assert_array_equal(out["w"], expected)
    assert out["w"].dtype == np.float64


def test_every_array_is_averaged_with_the_same_weights() -> None:
    u1 = {"w": np.full((2, 3), 2.0), "b": np.array([0.0, 4.0, 8.0])}
    u2 = {"w": np.full((2, 3), 6.0), "b": np.array([4.0, 0.0, 8.0])}
    # weights 3 and 1: w = (3*2 + 1*6)/4 = 3;  b = ([0, 12, 24] + [4, 0, 8]) / 4 = [1, 3, 8]
    out = fedavg([(u1, 3), (u2, 1)])
    assert set(out) == {"w", "b"}
    np.testing.assert_array_equal(out["w"], np.full((2, 3), 3.0))
    np.testing.assert_array_equal(out["b"], np.array([1.0, 3.0, 8.0]))


def test_float32_in_float32_out() -> None:
    a = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32)
    b = np.array([[3, 2, 1], [0, 1, 2]], dtype=np.float32)
    # weights 1 and 1: (a + b) / 2 = [[2, 2, 2], [2, 3, 4]]
    out = fedavg([({"w": a}, 1), ({"w": b}, 1)])
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["w"], np.array([[2, 2, 2], [2, 3, 4]], dtype=np.float32))


def test_int64_arrays_are_rounded_to_nearest() -> None:
    zeros = np.zeros((2, 3), dtype=np.int64)
    b = np.array([[1, 2, 3], [4, 5, -1]], dtype=np.int64)
    # weights 1 and 2: (0 + 2*b) / 3 = [[0.667, 1.333, 2], [2.667, 3.333, -0.667]]
    #   rounded to nearest:            [[1, 1, 2], [3, 3, -1]]
    #   (truncation would give         [[0, 1, 2], [2, 3, 0]])
    out = fedavg([({"n": zeros}, 1), ({"n": b}, 2)])
    assert out["n"].dtype == np.int64
    np.testing.assert_array_equal(out["n"], np.array([[1, 1, 2], [3, 3, -1]], dtype=np.int64))


def test_no_update_raises() -> None:
    with pytest.raises(ValueError, match="no update"):
        aggregate_round({"w": structure({"w": np.ones(3)})["w"]}, {"w": np.ones(3)}, [], ContributionPolicy(), FedAvg())


def test_shares_that_sum_to_zero_raise() -> None:
    with pytest.raises(ValueError, match="positive"):
        weighted_mean(["w"], [InMemory({"w": np.ones(3)})], [0.0])


# Three updates whose float64 sum depends on the order they are added in:
#   (1e16 + 1) - 1e16 == 0   (1 is below half an ulp of 1e16 and is lost)
#   (1e16 - 1e16) + 1 == 1
UPDATES = {
    "m1": {"w": np.full((2, 3), 1e16), "b": np.full((3,), 0.1, dtype=np.float32)},
    "m2": {"w": np.full((2, 3), 1.0), "b": np.full((3,), 0.2, dtype=np.float32)},
    "m3": {"w": np.full((2, 3), -1e16), "b": np.full((3,), 0.3, dtype=np.float32)},
}


def test_fold_order_matters_without_the_canonical_order() -> None:
    # Guards the next test: if order never mattered, byte-identity would prove nothing.
    forward = in_order([(UPDATES[m], 1) for m in ("m1", "m2", "m3")])
    other = in_order([(UPDATES[m], 1) for m in ("m1", "m3", "m2")])
    assert forward["w"].tobytes() != other["w"].tobytes()


@pytest.mark.parametrize("arrival", [("m1", "m2", "m3"), ("m1", "m3", "m2"), ("m3", "m2", "m1")])
def test_spool_order_makes_the_aggregate_byte_identical(tmp_path, arrival) -> None:
    def aggregate(order: tuple[str, ...], directory) -> dict[str, np.ndarray]:
        spool = UpdateSpool(directory)
        for member in order:
            spool.put(member * 8, params_digest(UPDATES[member]), 1, UPDATES[member], SIGNED)
        base = UPDATES["m1"]
        return aggregate_round(structure(base), base, spool.inputs(), ContributionPolicy(), FedAvg()).arrays

    reference = aggregate(("m2", "m1", "m3"), tmp_path / "reference")
    result = aggregate(arrival, tmp_path / "arrival")
    assert set(result) == set(reference)
    for name in reference:
        assert result[name].dtype == reference[name].dtype
        assert result[name].tobytes() == reference[name].tobytes()


def test_spool_round_trips_arrays_and_weights(tmp_path) -> None:
    spool = UpdateSpool(tmp_path / "updates")
    spool.put("m2" * 8, params_digest(UPDATES["m2"]), 7, UPDATES["m2"], SIGNED)
    (entry,) = spool.entries()
    assert entry.num_examples == 7
    assert entry.member_id == "m2" * 8
    loaded = entry.load()
    assert params_digest(loaded) == params_digest(UPDATES["m2"])


def test_spool_keeps_the_signed_envelope_beside_the_arrays(tmp_path) -> None:
    from protocols.npz import load_npz

    spool = UpdateSpool(tmp_path / "updates")
    spool.put("m2" * 8, params_digest(UPDATES["m2"]), 7, UPDATES["m2"], SIGNED)
    (entry,) = spool.entries()
    stored = load_npz(entry.path)
    assert stored["__weft__.envelope"].tobytes() == b"envelope bytes"
    assert stored["__weft__.signature"].tobytes() == b"signature bytes"
    assert set(entry.load()) == set(UPDATES["m2"])


def test_an_overflowing_aggregate_is_refused_not_signed() -> None:
    # Two finite float64 updates whose weighted sum overflows: the aggregate must not be produced.
    big = {"w": np.array([1e308])}
    with pytest.raises(ValueError, match="aggregate of 'w' is not finite"):
        in_order([(big, 3), (big, 3)])
