"""Compressed updates (protocols/payload.py) and the node sending them (node/app.py, node/store.py)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest

from node.app import handle_train
from node.instructions import Instructions
from node.store import RESIDUAL_FILE, RESIDUAL_PREV_FILE, ResidualKey, load_residual, save_residual
from protocols import ArraySpec, UpdateEnvelope, params_digest, structure
from protocols.aggregation import FedAvg, InMemory, RoundInput, aggregate_round
from protocols.envelope import PAYLOADS as ENVELOPE_PAYLOADS
from protocols.payload import (
    DELTA_FP16,
    DELTA_INT4,
    DELTA_INT8,
    PAYLOADS,
    WEIGHTS,
    Decoded,
    decode,
    encode,
    wire_structure,
)
from protocols.policy import ContributionPolicy
from tests.unit.test_node import ALL_EXCHANGED, CONFIG, global_arrays, instruction, runtime, update_of

DELTAS = (DELTA_FP16, DELTA_INT8, DELTA_INT4)


def model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "fc.weight": rng.normal(size=(64, 33)).astype(np.float32),  # 2112 values: blocks end mid-array
        "fc.bias": rng.normal(size=(7,)).astype(np.float32),  # odd size: a last half-filled int4 byte
        "half": rng.normal(size=(3, 5)).astype(np.float16),
        "double": rng.normal(size=(300,)),
        "scalar": np.array(0.5, dtype=np.float32),
        "bn.num_batches_tracked": np.array(12, dtype=np.int64),
        "mask": np.array([True, False]),
    }


def trained(base: dict[str, np.ndarray], step: float = 0.01, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, a in base.items():
        if a.dtype.kind == "f":
            out[name] = (a + step * rng.normal(size=a.shape)).astype(a.dtype)
        else:
            out[name] = a + 1 if a.dtype.kind == "i" else ~a
    return out


def max_error(decoded: dict[str, np.ndarray], weights: dict[str, np.ndarray], name: str) -> float:
    return float(np.abs(decoded[name].astype(np.float64) - weights[name].astype(np.float64)).max())


# ---- structure --------------------------------------------------------------------------------------


def test_the_envelope_knows_every_payload_kind() -> None:
    assert ENVELOPE_PAYLOADS == frozenset(PAYLOADS) == {WEIGHTS, DELTA_FP16, DELTA_INT8, DELTA_INT4}


@pytest.mark.parametrize("payload", PAYLOADS)
def test_encode_produces_exactly_the_wire_structure(payload: str) -> None:
    base = model()
    wire, _ = encode(trained(base), base, payload)
    assert structure(wire) == wire_structure(structure(base), payload)
    assert set(wire) == set(base)  # names never change: no derived name can collide


def test_wire_sizes() -> None:
    spec = ArraySpec("float32", (1000,))
    assert wire_structure({"w": spec}, WEIGHTS)["w"] == spec
    assert wire_structure({"w": spec}, DELTA_FP16)["w"] == ArraySpec("float16", (1000,))
    assert wire_structure({"w": spec}, DELTA_INT8)["w"] == ArraySpec("uint8", (4 * 4 + 1000,))  # 4 blocks of 256
    assert wire_structure({"w": spec}, DELTA_INT4)["w"] == ArraySpec("uint8", (4 * 8 + 500,))  # 8 blocks of 128
    counter = ArraySpec("int64", ())
    assert all(wire_structure({"n": counter}, p)["n"] == counter for p in PAYLOADS)


def test_int8_is_at_most_0_26_and_int4_at_most_0_14_of_float32_bytes() -> None:
    spec = {"w": ArraySpec("float32", (1_000_000,))}
    raw = 4_000_000
    int8 = wire_structure(spec, DELTA_INT8)["w"].shape[0]
    int4 = wire_structure(spec, DELTA_INT4)["w"].shape[0]
    assert int8 / raw <= 0.26
    assert int4 / raw < 0.1406  # below the 4-bit blockwise 64-value fp32-absmax layout (14.06%)


def test_unknown_payload_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown payload kind"):
        wire_structure({"w": ArraySpec("float32", (2,))}, "delta-int2")
    with pytest.raises(ValueError, match="unknown payload kind"):
        encode(model(), model(), "deltas")


# ---- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", PAYLOADS)
def test_round_trip_error_is_bounded(payload: str) -> None:
    base = model()
    weights = trained(base)
    wire, residual = encode(weights, base, payload)
    decoded = decode(wire, base, structure(base), payload)
    assert structure(decoded) == structure(base)
    for name in ("bn.num_batches_tracked", "mask"):
        assert np.array_equal(decoded[name], weights[name])  # sent as they are
    if payload == WEIGHTS:
        assert all(np.array_equal(decoded[n], weights[n]) for n in weights)
        assert residual == {}
        return
    delta = np.abs(weights["fc.weight"].astype(np.float64) - base["fc.weight"]).max()
    bound = {DELTA_FP16: 2**-10, DELTA_INT8: 0.5 / 127, DELTA_INT4: 0.5 / 7}[payload] * delta
    float32_ulp = 2**-23 * 8  # |weights| < 8: the cast of base + delta to float32
    assert max_error(decoded, weights, "fc.weight") <= bound + float32_ulp
    # the residual is exactly what the coordinator will not see
    lost = weights["fc.weight"].astype(np.float64) - decoded["fc.weight"].astype(np.float64)
    assert np.allclose(residual["fc.weight"], lost, atol=1e-7)
    assert set(residual) == {n for n, a in base.items() if a.dtype.kind == "f"}


def test_zero_delta_decodes_to_the_base() -> None:
    base = model()
    for payload in DELTAS:
        wire, residual = encode(base, base, payload)
        decoded = decode(wire, base, structure(base), payload)
        assert all(np.array_equal(decoded[n], base[n]) for n in base)
        assert all(not r.any() for r in residual.values())


def test_int4_packs_two_codes_per_byte_low_nibble_first() -> None:
    base = {"w": np.zeros(3, dtype=np.float32)}
    wire, _ = encode({"w": np.array([7.0, -7.0, 1.0], dtype=np.float32)}, base, DELTA_INT4)
    scale = np.frombuffer(wire["w"][:4].tobytes(), dtype="<f4")[0]
    assert scale == np.float32(1.0)
    assert list(wire["w"][4:]) == [0x07 | (0x9 << 4), 0x01]  # 7, -7 (two's complement 1001), 1, pad 0


def test_decoding_is_deterministic_and_order_free() -> None:
    base = model()
    wire, _ = encode(trained(base), base, DELTA_INT8)
    first = decode(wire, base, structure(base), DELTA_INT8)
    again = decode(dict(reversed(list(wire.items()))), base, structure(base), DELTA_INT8)
    assert params_digest(first) == params_digest(again)
    one = Decoded(InMemory(wire), base, structure(base), DELTA_INT8)
    assert all(np.array_equal(one.array(n), first[n]) for n in base)


def test_decode_arithmetic_is_the_documented_one() -> None:
    """w = dtype(float64(base) + float64(code) * float64(scale)), recomputed by hand."""
    base = {"w": np.array([1.0, 2.0, 3.0], dtype=np.float32)}
    scale = np.float32(0.1)
    codes = np.array([1, -127, 5], dtype=np.int8)
    wire = {"w": np.concatenate([np.frombuffer(scale.tobytes(), np.uint8), codes.view(np.uint8)])}
    out = decode(wire, base, structure(base), DELTA_INT8)["w"]
    expected = (base["w"].astype(np.float64) + codes.astype(np.float64) * np.float64(scale)).astype(np.float32)
    assert out.tobytes() == expected.tobytes()


def test_error_feedback_keeps_the_accumulated_error_bounded() -> None:
    """Over many rounds the sum of what was sent tracks the sum of the true deltas (error feedback);
    without it the rounding errors pile up."""
    rng = np.random.default_rng(5)
    n = 4096
    base = {"w": np.zeros(n, dtype=np.float32)}
    true_sum = np.zeros(n)
    sent = {True: np.zeros(n), False: np.zeros(n)}
    residual: dict[bool, dict[str, np.ndarray] | None] = {True: None, False: None}
    bias = rng.normal(size=n) * 0.01  # a consistent direction, as in training
    for _ in range(30):
        delta = (bias + rng.normal(size=n) * 0.002).astype(np.float32)
        true_sum += delta.astype(np.float64)
        for feedback in (True, False):
            wire, new = encode({"w": base["w"] + delta}, base, DELTA_INT4, residual[feedback])
            got = decode(wire, base, structure(base), DELTA_INT4)["w"].astype(np.float64)
            sent[feedback] += got
            residual[feedback] = new if feedback else None
    with_ef = np.abs(sent[True] - true_sum).max()
    without = np.abs(sent[False] - true_sum).max()
    assert with_ef < without / 5
    assert with_ef <= np.abs(residual[True]["w"]).max() + 1e-6  # type: ignore[index]  # only the last residual is missing


# ---- untrusted wire arrays ------------------------------------------------------------------------------


def _bad_wires() -> list[tuple[str, str, object]]:
    scale = np.frombuffer(np.float32(0.1).tobytes(), np.uint8)
    nan = np.frombuffer(np.float32(np.nan).tobytes(), np.uint8)
    inf = np.frombuffer(np.float32(np.inf).tobytes(), np.uint8)
    neg = np.frombuffer(np.float32(-1).tobytes(), np.uint8)
    huge = np.frombuffer(np.float32(3e38).tobytes(), np.uint8)
    codes3 = np.array([1, 2, 3], dtype=np.int8).view(np.uint8)
    return [
        (DELTA_INT8, "wrong length", np.concatenate([scale, codes3[:2]])),
        (DELTA_INT8, "wrong dtype", np.concatenate([scale, codes3]).view(np.int8)),
        (DELTA_INT8, "2-d", np.concatenate([scale, codes3]).reshape(1, 7)),
        (DELTA_INT8, "nan scale", np.concatenate([nan, codes3])),
        (DELTA_INT8, "inf scale", np.concatenate([inf, codes3])),
        (DELTA_INT8, "negative scale", np.concatenate([neg, codes3])),
        (DELTA_INT8, "code -128", np.concatenate([scale, np.array([0x80, 0, 0], np.uint8)])),
        (DELTA_INT8, "overflowing scale", np.concatenate([huge, np.array([127, 127, 127], np.uint8)])),
        (DELTA_INT4, "nibble -8", np.concatenate([scale, np.array([0x08, 0x00], np.uint8)])),
        (DELTA_INT4, "padding nibble set", np.concatenate([scale, np.array([0x00, 0x10], np.uint8)])),
        (DELTA_INT4, "short", scale),
        (DELTA_FP16, "nan delta", np.array([0, np.nan, 0], dtype=np.float16)),
        (DELTA_FP16, "wrong shape", np.zeros(4, dtype=np.float16)),
        (DELTA_FP16, "float32 instead", np.zeros(3, dtype=np.float32)),
        (DELTA_INT8, "an object array", np.array([object()] * 7, dtype=object)),
        (DELTA_INT8, "not an array", "\x00" * 7),
    ]


@pytest.mark.parametrize(("payload", "what", "bad"), _bad_wires(), ids=[w for _, w, _ in _bad_wires()])
def test_malformed_wire_arrays_raise_value_error(payload: str, what: str, bad: object) -> None:
    base = {"w": np.array([1.0, 2.0, 3.0], dtype=np.float32)}
    with pytest.raises(ValueError):
        decode({"w": bad}, base, structure(base), payload)  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        Decoded(InMemory({"w": bad}), base, structure(base), payload).array("w")  # type: ignore[dict-item]


def test_fp16_delta_overflowing_a_float16_model_is_refused() -> None:
    base = {"w": np.array([60000.0], dtype=np.float16)}
    with pytest.raises(ValueError, match="not finite"):
        decode({"w": np.array([60000.0], dtype=np.float16)}, base, structure(base), DELTA_FP16)


def test_missing_or_extra_arrays_are_refused() -> None:
    base = model()
    wire, _ = encode(trained(base), base, DELTA_INT8)
    with pytest.raises(ValueError, match="missing"):
        decode({k: v for k, v in wire.items() if k != "fc.bias"}, base, structure(base), DELTA_INT8)
    with pytest.raises(ValueError, match="extra"):
        decode({**wire, "other": np.zeros(1, np.uint8)}, base, structure(base), DELTA_INT8)


def test_random_bytes_never_crash_decode() -> None:
    rng = np.random.default_rng(0)
    spec = ArraySpec("float32", (300,))
    base = {"w": np.zeros(300, dtype=np.float32)}
    for payload in (DELTA_INT8, DELTA_INT4):
        length = wire_structure({"w": spec}, payload)["w"].shape[0]
        for _ in range(200):
            with contextlib.suppress(ValueError):  # only ValueError may come out
                decode({"w": rng.integers(0, 256, size=length, dtype=np.uint8)}, base, {"w": spec}, payload)


def test_encode_refuses_weights_that_are_not_finite() -> None:
    base = {"w": np.zeros(3, dtype=np.float32)}
    with pytest.raises(ValueError, match="not finite"):
        encode({"w": np.array([0, np.inf, 0], dtype=np.float32)}, base, DELTA_INT8)


def test_aggregation_over_decoded_updates() -> None:
    """aggregate_round over `Decoded` sources is FedAvg of the decoded weights."""
    base = model()
    updates = [encode(trained(base, seed=s), base, DELTA_INT8)[0] for s in (1, 2)]
    inputs = [
        RoundInput(f"{i:016x}", params_digest(u), 10 * (i + 1), Decoded(InMemory(u), base, structure(base), DELTA_INT8))
        for i, u in enumerate(updates)
    ]
    agg = aggregate_round(structure(base), base, inputs, ContributionPolicy(), FedAvg())
    plain = [decode(u, base, structure(base), DELTA_INT8) for u in updates]
    order = sorted(range(2), key=lambda i: (params_digest(updates[i]), f"{i:016x}"))
    expected = sum(plain[i]["fc.weight"].astype(np.float64) * (10 * (i + 1)) for i in order) / 30
    assert np.array_equal(agg.arrays["fc.weight"], expected.astype(np.float32))


# ---- the node ---------------------------------------------------------------------------------------------


def _train(tmp: Path, payload: str, feedback: int = 1, **changes) -> tuple[UpdateEnvelope, dict[str, np.ndarray]]:
    from dataclasses import replace

    config = Instructions(ALL_EXCHANGED, replace(CONFIG, payload=payload, error_feedback=feedback)).to_config()
    reply = handle_train(runtime(tmp), instruction(config=config, **changes))
    assert not reply.has_error(), reply.error
    return update_of(reply)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_node_sends_the_payload_it_was_asked_for(tmp_path: Path, payload: str) -> None:
    start = global_arrays()
    env, arrays = _train(tmp_path, payload)
    assert env.payload == payload
    assert env.update_digest == params_digest(arrays)  # signed over the compressed bytes
    assert structure(arrays) == wire_structure(structure(start), payload)
    weights = decode(arrays, start, structure(start), payload)
    assert weights.keys() == start.keys()
    assert (tmp_path / RESIDUAL_FILE).exists() == (payload != WEIGHTS)


def test_node_keeps_its_full_precision_model(tmp_path: Path) -> None:
    from node.store import load_local_model

    _train(tmp_path / "a", DELTA_INT4)
    _, full = _train(tmp_path / "b", WEIGHTS)
    kept = load_local_model(tmp_path / "a")
    assert all(np.array_equal(kept[n], full[n]) for n in full)


def test_node_refuses_an_unknown_payload(tmp_path: Path) -> None:
    config = {**Instructions(ALL_EXCHANGED, CONFIG).to_config(), "payload": "delta-int2"}
    reply = handle_train(runtime(tmp_path), instruction(config=config))
    assert reply.has_error()
    assert "bad_instructions" in reply.error.reason


def test_node_carries_its_residual_across_rounds_and_repeats_a_retried_round(tmp_path: Path) -> None:
    _, first = _train(tmp_path, DELTA_INT4, round=4)  # trains round 5
    _, second = _train(tmp_path, DELTA_INT4, round=5)  # round 6 starts from round 5's residual
    _, retried = _train(tmp_path, DELTA_INT4, round=5)  # a retry of round 6 starts from the same one
    assert params_digest(second) == params_digest(retried)
    assert (tmp_path / RESIDUAL_PREV_FILE).exists()
    fresh = tmp_path / "fresh"
    _, no_history = _train(fresh, DELTA_INT4, round=5)
    assert params_digest(no_history) != params_digest(second)  # the residual changed what was sent
    _, without = _train(tmp_path / "off", DELTA_INT4, feedback=0, round=5)
    assert params_digest(without) == params_digest(no_history)
    assert not (tmp_path / "off" / RESIDUAL_FILE).exists()
    assert params_digest(first) != params_digest(second)


def test_residual_is_reset_for_another_run_payload_or_model(tmp_path: Path) -> None:
    template = {"w": ArraySpec("float32", (4,)), "n": ArraySpec("int64", ())}
    key = ResidualKey("fed", "run-1", DELTA_INT8)
    r = {"w": np.full(4, 0.5, dtype=np.float32)}
    save_residual(tmp_path, key, 3, r)
    assert load_residual(tmp_path, key, 4, template) is not None
    assert load_residual(tmp_path, key, 3, template) is None  # only residuals of earlier rounds
    assert load_residual(tmp_path, ResidualKey("fed", "run-2", DELTA_INT8), 4, template) is None
    assert load_residual(tmp_path, ResidualKey("fed", "run-1", DELTA_INT4), 4, template) is None
    assert load_residual(tmp_path, key, 4, {"w": ArraySpec("float32", (5,))}) is None
    save_residual(tmp_path, key, 4, {"w": np.full(4, 0.25, dtype=np.float32)})
    got = load_residual(tmp_path, key, 4, template)  # retry of round 4: the residual before it
    assert got is not None and np.array_equal(got["w"], r["w"])
    got = load_residual(tmp_path, key, 5, template)
    assert got is not None and float(got["w"][0]) == 0.25
    (tmp_path / RESIDUAL_FILE).write_bytes(b"garbage")
    got = load_residual(tmp_path, key, 5, template)  # damaged: the previous one (round 3) is the newest left
    assert got is not None and np.array_equal(got["w"], r["w"])


def test_decoding_in_chunks_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import protocols.payload as payload_module

    base = model()
    for payload in DELTAS:
        wire, _ = encode(trained(base), base, payload)
        whole = decode(wire, base, structure(base), payload)
        monkeypatch.setattr(payload_module, "CHUNK", 256)  # a multiple of both block sizes
        chunked = decode(wire, base, structure(base), payload)
        monkeypatch.undo()
        assert params_digest(whole) == params_digest(chunked)


@pytest.mark.parametrize(
    ("payload", "dtype", "hex_bytes", "decoded"),
    [
        (DELTA_FP16, "float16", "003800bc000000b40030", [1.5, 1.0, 3.0, -0.75, 0.375]),
        (DELTA_INT8, "uint8", "0402013c408100e010", [1.503937, 1.0, 3.0, -0.7519685, 0.37598425]),
        (DELTA_INT4, "uint8", "2549123e93e001", [1.4285715, 0.99999994, 3.0, -0.78571427, 0.39285713]),
    ],
)
def test_vector(payload: str, dtype: str, hex_bytes: str, decoded: list[float]) -> None:
    """The payload test vector (docs/PROTOCOL.md, "Payloads")."""
    base = {"w": np.array([1.0, 2.0, 3.0, -0.5, 0.25], dtype=np.float32)}
    weights = {"w": np.array([1.5, 1.0, 3.0, -0.75, 0.375], dtype=np.float32)}
    wire, _ = encode(weights, base, payload)
    assert wire["w"].dtype.name == dtype and wire["w"].tobytes().hex() == hex_bytes
    assert decode(wire, base, structure(base), payload)["w"].tolist() == np.array(decoded, np.float32).tolist()
