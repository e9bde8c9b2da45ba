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
    spool.flush()  # the spool writes behind: complete once flushed
    (entry,) = spool.entries()
    assert entry.num_examples == 7
    assert entry.member_id == "m2" * 8
    loaded = entry.load()
    assert params_digest(loaded) == params_digest(UPDATES["m2"])


def test_spool_keeps_the_signed_envelope_beside_the_arrays(tmp_path) -> None:
    from protocols.stored import StoredUpdate

    spool = UpdateSpool(tmp_path / "updates")
    spool.put("m2" * 8, params_digest(UPDATES["m2"]), 7, UPDATES["m2"], SIGNED)
    spool.flush()  # the spool writes behind: complete once flushed
    (entry,) = spool.entries()
    assert StoredUpdate(entry.path).signed() == SIGNED
    assert set(entry.load()) == set(UPDATES["m2"])


def test_an_overflowing_aggregate_is_refused_not_signed() -> None:
    # Two finite float64 updates whose weighted sum overflows: the aggregate must not be produced.
    big = {"w": np.array([1e308])}
    with pytest.raises(ValueError, match="aggregate of 'w' is not finite"):
        in_order([(big, 3), (big, 3)])


# ---- the chunk-major fold gives the bits of the whole-array formula it replaced -------------------------


def _old_weighted_mean(names, sources, shares) -> dict[str, np.ndarray]:
    """A copy of the whole-array implementation the chunk-major fold replaced (the reference)."""
    total = float(sum(shares))
    out: dict[str, np.ndarray] = {}
    with np.errstate(over="ignore", invalid="ignore"):
        for name in names:
            acc = None
            for source, share in zip(sources, shares, strict=True):
                if share == 0:
                    continue
                term = np.asarray(source.array(name), dtype=np.float64) * float(share)
                if acc is None:
                    acc = term
                else:
                    acc += term
            acc /= total
            out[name] = acc
    return out


def _old_cast(arrays, template) -> dict[str, np.ndarray]:
    out = {}
    for name in sorted(template):
        dtype = np.dtype(template[name].dtype)
        value = arrays[name]
        if dtype.kind in "iub":
            value = np.rint(value)
        with np.errstate(over="ignore", invalid="ignore"):
            out[name] = np.asarray(value).astype(dtype).reshape(template[name].shape)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_chunked_fold_is_bit_identical_to_the_whole_array_formula(seed: int, monkeypatch) -> None:
    import protocols.aggregation as aggregation

    monkeypatch.setattr(aggregation, "CHUNK", 1000)  # many chunks and a ragged last one, split over threads
    monkeypatch.setattr(aggregation, "THREADS", 3)
    monkeypatch.setattr(aggregation, "_pool", None)
    rng = np.random.default_rng(seed)
    n = 7
    updates = []
    for _ in range(n):
        updates.append(
            {
                "a.f32": (rng.standard_normal((37, 211)) * 10.0 ** rng.integers(-3, 4)).astype(np.float32),
                "b.f16": rng.standard_normal(5003).astype(np.float16),
                "c.i64": rng.integers(-(2**40), 2**40, size=(3, 999), dtype=np.int64),
                "d.u8": rng.integers(0, 256, size=2500, dtype=np.uint8),
                "e.f64": rng.standard_normal(4001),
                "f.bool": rng.random(1500) < 0.5,
                "g.scalar": np.array(rng.standard_normal(), dtype=np.float32),
                "h.empty": np.zeros((0, 4), dtype=np.float32),
            }
        )
    shares = [float(x) for x in rng.random(n)]
    shares[0] = 0.0  # the first non-zero share starts the sum
    shares[3] = 0.0
    names = sorted(updates[0])
    template = structure(updates[0])
    sources = [InMemory(u) for u in updates]
    expected64 = _old_weighted_mean(names, sources, shares)
    got64 = weighted_mean(names, sources, shares)
    expected = _old_cast(expected64, template)
    got = weighted_mean(names, sources, shares, template)
    via_round = cast_to_template(got, template)
    for name in names:
        assert got64[name].dtype == np.float64 and got64[name].tobytes() == expected64[name].tobytes(), name
        assert got[name].dtype == expected[name].dtype and got[name].shape == expected[name].shape, name
        assert got[name].tobytes() == expected[name].tobytes(), name
        assert via_round[name].tobytes() == expected[name].tobytes(), name


def test_aggregate_round_with_fedavg_keeps_the_old_bits_and_refuses_overflow_in_the_cast() -> None:
    rng = np.random.default_rng(5)
    updates = [{"w": rng.standard_normal(300_000).astype(np.float32), "n": rng.integers(0, 9, 7)} for _ in range(3)]
    base = updates[0]
    inputs = [RoundInput(f"{i:016x}", params_digest(u), 5 + i, InMemory(u)) for i, u in enumerate(updates)]
    agg = aggregate_round(structure(base), base, inputs, ContributionPolicy(), FedAvg())
    order = sorted(range(3), key=lambda i: (params_digest(updates[i]), f"{i:016x}"))
    weights = [float(5 + i) for i in order]
    shares = [w / sum(weights) for w in weights]
    expected = _old_cast(_old_weighted_mean(["n", "w"], [InMemory(updates[i]) for i in order], shares), structure(base))
    for name in ("n", "w"):
        assert agg.arrays[name].tobytes() == expected[name].tobytes()
    big = {"w": np.full(70_000, 60000.0, dtype=np.float16)}
    over = [RoundInput(f"{i:016x}", bytes([i]) * 32, 1, InMemory(big)) for i in range(2)]
    bigger = {"w": np.full(70_000, 65504.0, dtype=np.float16)}
    over[1] = RoundInput("1" * 16, bytes([1]) * 32, 1, InMemory(bigger))
    agg = aggregate_round(structure(big), big, over, ContributionPolicy(), FedAvg())  # the mean still fits
    assert np.isfinite(agg.arrays["w"]).all()
    huge = {"w": np.full(70_000, 1e308)}
    template = structure(huge)
    with pytest.raises(ValueError, match="aggregate of 'w' is not finite"):
        weighted_mean(["w"], [InMemory(huge), InMemory(huge)], [1.0, 1.0], template)  # the float64 sum overflows


# ---- stored updates: raw, aligned, read in place, strict ----------------------------------------------------


def test_stored_update_round_trips_every_dtype_and_reads_in_place(tmp_path) -> None:
    from protocols.digest import DTYPES
    from protocols.stored import ALIGN, StoredUpdate, write_stored_update

    arrays = {f"a.{name}": (np.arange(10) % 3).astype(name).reshape(2, 5) for name in sorted(DTYPES)}
    arrays["z.scalar"] = np.array(1.5, dtype=np.float32)
    arrays["z.empty"] = np.zeros((0, 3), dtype=np.int32)
    arrays["\uff41"] = np.ones(3, dtype=">f8")  # big-endian in memory: stored little-endian
    path = tmp_path / "u.update"
    write_stored_update(path, arrays, SIGNED)
    update = StoredUpdate(path)
    assert update.signed() == SIGNED
    assert update.names() == sorted(arrays, key=lambda n: n.encode("utf-8"))
    back = update.arrays()
    assert params_digest(back) == params_digest(arrays)
    view = update.array("a.float32")
    assert not view.flags.owndata and not view.flags.writeable
    assert view.ctypes.data % ALIGN == 0 or view.base is not None
    with pytest.raises(KeyError):
        update.array("missing")
    again = tmp_path / "again.update"
    write_stored_update(again, dict(reversed(list(arrays.items()))), SIGNED, sync=False)
    assert again.read_bytes() == path.read_bytes()  # the bytes are a function of the contents


def test_damaged_stored_updates_are_refused(tmp_path) -> None:
    from protocols.errors import DecodeError
    from protocols.stored import StoredUpdate, write_stored_update

    path = tmp_path / "u.update"
    write_stored_update(path, {"a": np.arange(5, dtype=np.float32), "b": np.ones(3, dtype=np.int64)}, SIGNED)
    good = path.read_bytes()
    head = 22 + 4 + int.from_bytes(good[22:26], "big")
    first = -(-head // 64) * 64  # where array "a" starts
    damaged = {
        "magic": b"X" + good[1:],
        "truncated": good[:-1],
        "trailing": good + b"\x00",
        "directory too long": good[:22] + (len(good)).to_bytes(4, "big") + good[26:],
        "offset moved": good.replace(
            first.to_bytes(8, "big") + (20).to_bytes(8, "big"),
            (first + 64).to_bytes(8, "big") + (20).to_bytes(8, "big"),
            1,
        ),
        "dtype": good.replace(b"\x00\x00\x00\x07float32", b"\x00\x00\x00\x07float31", 1),
        "names out of order": good.replace(b"\x00\x00\x00\x01a\x00", b"\x00\x00\x00\x01c\x00", 1),
        "empty": b"",
    }
    for what, data in damaged.items():
        assert data != good or what == "empty", what
        path.write_bytes(data)
        with pytest.raises(DecodeError):
            StoredUpdate(path).arrays()
        assert head > 26


def test_all_finite_is_exact_when_a_finite_sum_overflows() -> None:
    from protocols.aggregation import all_finite

    big = np.full(100_000, 3e38, dtype=np.float32)  # every value finite, their float32 sum overflows
    assert all_finite(big)
    for bad in (np.inf, -np.inf, np.nan):
        spoiled = big.copy()
        spoiled[77_777] = bad
        assert not all_finite(spoiled)
        small = np.zeros(10, dtype=np.float64)
        small[3] = bad
        assert not all_finite(small)
