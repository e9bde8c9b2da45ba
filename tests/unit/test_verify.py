"""coordinator.verify.verify_reply: one test per RejectReason, on real Flower reply Messages."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import (
    DEFAULT_TTL,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)

from coordinator.arrays import to_record
from coordinator.verify import Accepted, Expectation, Rejected, verify_reply
from node.egress import train_reply
from protocols import (
    Domain,
    Manifest,
    Member,
    RejectReason,
    SigningKey,
    Status,
    UpdateEnvelope,
    params_digest,
    sign_update,
    structure,
    wire,
)

NODE_ID = 7
FEDERATION, RUN, ROUND = "fed-a", "run-1", 3
MAX_EXAMPLES = 100

COORDINATOR = SigningKey.from_seed(bytes([1]) * 32)
MEMBER = SigningKey.from_seed(bytes([2]) * 32)
OTHER_MEMBER = SigningKey.from_seed(bytes([3]) * 32)
OUTSIDER = SigningKey.from_seed(bytes([9]) * 32)

MANIFEST = Manifest(
    federation_id=FEDERATION,
    coordinator_key=COORDINATOR.public_key,
    members=(
        Member("hospital-a", MEMBER.public_key, "DE", MAX_EXAMPLES),
        Member("hospital-b", OTHER_MEMBER.public_key, "FR", MAX_EXAMPLES),
    ),
)

GLOBAL = {
    "fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
    "fc.bias": np.zeros(2, dtype=np.float32),
}
BASE = params_digest(GLOBAL)


def update_arrays() -> dict[str, np.ndarray]:
    return {name: a + np.float32(0.5) for name, a in GLOBAL.items()}


def expectation() -> Expectation:
    return Expectation(FEDERATION, RUN, ROUND, BASE, structure(GLOBAL), MANIFEST)


def instruction() -> Message:
    """A train instruction as a node receives it (metadata set as the SuperLink would)."""
    metadata = Metadata(
        run_id=1,
        message_id="instruction-1",
        src_node_id=1,
        dst_node_id=NODE_ID,
        reply_to_message_id="",
        group_id=str(ROUND),
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type=MessageType.TRAIN,
    )
    return Message(RecordDict(), metadata=metadata)


def envelope(arrays: dict[str, np.ndarray], key: SigningKey = MEMBER, **changes) -> UpdateEnvelope:
    honest = UpdateEnvelope(
        federation_id=FEDERATION,
        run_id=RUN,
        round=ROUND,
        sender=key.member_id,
        base_digest=BASE,
        update_digest=params_digest(arrays),
        num_examples=40,
        metrics={"train_loss": 0.25},
    )
    return replace(honest, **changes)


def reply(
    arrays: dict[str, np.ndarray] | None = None,
    key: SigningKey = MEMBER,
    sent_arrays: dict[str, np.ndarray] | None = None,
    **changes,
) -> Message:
    """An honest node's reply (node.egress.train_reply); `changes` alter the signed envelope,
    `sent_arrays` replaces the arrays after signing."""
    arrays = update_arrays() if arrays is None else arrays
    env = envelope(arrays, key, **changes)
    content = train_reply(
        arrays if sent_arrays is None else sent_arrays,
        sign_update(key, env),
        env.num_examples,
        env.metrics,
    )
    return Message(content, reply_to=instruction())


def with_update_record(record: dict[str, object]) -> Message:
    """An honest reply whose `weft.update` record is replaced by `record`."""
    msg = reply()
    msg.content.config_records[wire.UPDATE_RECORD] = ConfigRecord(record)
    return msg


def signed_record(env: UpdateEnvelope, signer: SigningKey, domain: Domain = Domain.UPDATE) -> dict:
    body = env.encode()
    return {wire.ENVELOPE: body, wire.SIGNATURE: signer.sign(domain, body)}


def rejected(msg: Message, expect: Expectation | None = None) -> Rejected:
    outcome = verify_reply(msg, expect or expectation())
    assert isinstance(outcome, Rejected), outcome
    assert outcome.node_id == NODE_ID
    return outcome


# ---- happy path ----------------------------------------------------------------------------------


def test_honest_reply_is_accepted() -> None:
    expect = expectation()
    outcome = verify_reply(reply(), expect)
    assert isinstance(outcome, Accepted)
    assert outcome.member_id == MEMBER.member_id
    assert outcome.node_id == NODE_ID
    assert outcome.envelope.num_examples == 40
    assert set(outcome.arrays) == set(GLOBAL)
    for name, array in update_arrays().items():
        np.testing.assert_array_equal(outcome.arrays[name], array)
        assert outcome.arrays[name].dtype == array.dtype
    assert expect.seen == {MEMBER.member_id}


def test_two_members_are_both_accepted() -> None:
    expect = expectation()
    assert isinstance(verify_reply(reply(), expect), Accepted)
    assert isinstance(verify_reply(reply(key=OTHER_MEMBER), expect), Accepted)
    assert expect.seen == {MEMBER.member_id, OTHER_MEMBER.member_id}


# ---- one test per reason, in RejectReason order --------------------------------------------------


def test_node_error() -> None:
    msg = Message(Error(code=4001, reason="refused global model"), reply_to=instruction())
    out = rejected(msg)
    assert out.reason is RejectReason.NODE_ERROR
    assert "refused global model" in out.detail


def test_a_nodes_error_text_is_bounded_and_escaped() -> None:
    # A 5 MB reason with newlines once forged lines of the coordinator's log and metrics.jsonl.
    forged = "x" * 100 + "\n2026-11-25 INFO weft: round 9: accepted everything\n" + "y" * 5_000_000
    out = rejected(Message(Error(code=4001, reason=forged), reply_to=instruction()))
    assert out.reason is RejectReason.NODE_ERROR
    assert "\n" not in out.detail and "\r" not in out.detail
    assert "\\n2026-11-25 INFO weft" in out.detail  # shown, escaped
    assert len(out.detail) < 500 and out.detail.endswith("more characters)")


def test_below_quality_floor_is_judged_after_verification() -> None:
    # verify_reply only checks what a reply claims; the quality floor needs the coordinator's held-out data and is
    # applied by the round loop to verified updates (tests/unit/test_policy_ledger.py). An honest reply passes here.
    assert isinstance(verify_reply(reply(), expectation()), Accepted)


def test_unsigned_without_update_record() -> None:
    msg = reply()
    del msg.content.config_records[wire.UPDATE_RECORD]
    assert rejected(msg).reason is RejectReason.UNSIGNED


def test_unsigned_without_signature() -> None:
    body = envelope(update_arrays()).encode()
    assert rejected(with_update_record({wire.ENVELOPE: body})).reason is RejectReason.UNSIGNED


@pytest.mark.parametrize(
    "record",
    [
        {wire.ENVELOPE: b"not an envelope", wire.SIGNATURE: bytes(64)},
        {**signed_record(envelope(update_arrays()), MEMBER), "extra": b"x"},
    ],
    ids=["garbage-envelope", "extra-key"],
)
def test_malformed_update_record(record: dict) -> None:
    assert rejected(with_update_record(record)).reason is RejectReason.MALFORMED


def test_malformed_metrics_differ_from_signed() -> None:
    msg = reply()
    msg.content.metric_records[wire.METRICS] = MetricRecord({wire.NUM_EXAMPLES: 40, "train_loss": 0.01})
    out = rejected(msg)
    assert out.reason is RejectReason.MALFORMED
    assert out.member_id == MEMBER.member_id


def test_malformed_second_array_record() -> None:
    msg = reply()
    msg.content.array_records["smuggled"] = to_record({"x": np.ones(3, dtype=np.float32)})
    assert rejected(msg).reason is RejectReason.MALFORMED


def test_unknown_member() -> None:
    out = rejected(reply(key=OUTSIDER))
    assert out.reason is RejectReason.UNKNOWN_MEMBER
    assert out.member_id == OUTSIDER.member_id


@pytest.mark.parametrize(
    ("signer", "domain"),
    [(OUTSIDER, Domain.UPDATE), (OTHER_MEMBER, Domain.UPDATE), (MEMBER, Domain.GLOBAL_MODEL)],
    ids=["outsider-key", "another-members-key", "wrong-domain"],
)
def test_bad_signature(signer: SigningKey, domain: Domain) -> None:
    env = envelope(update_arrays())  # sender is MEMBER
    out = rejected(with_update_record(signed_record(env, signer, domain)))
    assert out.reason is RejectReason.BAD_SIGNATURE
    assert out.member_id == MEMBER.member_id


def test_bad_signature_envelope_changed_after_signing() -> None:
    signed = sign_update(MEMBER, envelope(update_arrays()))
    forged = envelope(update_arrays(), num_examples=41).encode()
    record = {wire.ENVELOPE: forged, wire.SIGNATURE: signed.signature}
    assert rejected(with_update_record(record)).reason is RejectReason.BAD_SIGNATURE


@pytest.mark.parametrize("status", [Status.SUSPENDED, Status.REVOKED])
def test_inactive_member(status: Status) -> None:
    manifest = MANIFEST.with_status(MEMBER.member_id, status)  # version 2
    expect = Expectation(FEDERATION, RUN, ROUND, BASE, structure(GLOBAL), manifest)
    out = rejected(reply(), expect)  # a validly signed, otherwise perfect update
    assert out.reason is RejectReason.INACTIVE_MEMBER
    assert out.member_id == MEMBER.member_id
    assert out.detail == f"member 'hospital-a' is {status.value} in manifest version 2"
    assert out.to_json()["reason"] == "inactive_member"
    assert expect.seen == set()
    assert isinstance(verify_reply(reply(key=OTHER_MEMBER), expect), Accepted)  # the active member still counts


def test_inactive_member_is_named_only_after_its_signature_verified() -> None:
    manifest = MANIFEST.with_status(MEMBER.member_id, Status.SUSPENDED)
    expect = Expectation(FEDERATION, RUN, ROUND, BASE, structure(GLOBAL), manifest)
    forged = with_update_record(signed_record(envelope(update_arrays()), OUTSIDER))  # claims to be MEMBER
    assert rejected(forged, expect).reason is RejectReason.BAD_SIGNATURE
    # and it comes before every binding check: a suspended member's replay is inactive, not a replay
    assert rejected(reply(round=ROUND - 1), expect).reason is RejectReason.INACTIVE_MEMBER


def test_reinstated_member_is_accepted_again() -> None:
    manifest = MANIFEST.with_status(MEMBER.member_id, Status.SUSPENDED).with_status(MEMBER.member_id, Status.ACTIVE)
    expect = Expectation(FEDERATION, RUN, ROUND, BASE, structure(GLOBAL), manifest)
    assert manifest.version == 3
    assert isinstance(verify_reply(reply(), expect), Accepted)


def test_wrong_federation() -> None:
    assert rejected(reply(federation_id="fed-b")).reason is RejectReason.WRONG_FEDERATION


def test_wrong_run() -> None:
    assert rejected(reply(run_id="run-0")).reason is RejectReason.WRONG_RUN


def test_replay_of_an_earlier_round() -> None:
    assert rejected(reply(round=ROUND - 1)).reason is RejectReason.REPLAY


def test_replay_second_update_from_the_same_member() -> None:
    expect = expectation()
    assert isinstance(verify_reply(reply(), expect), Accepted)
    other_arrays = {name: a - np.float32(1) for name, a in GLOBAL.items()}
    out = rejected(reply(arrays=other_arrays), expect)
    assert out.reason is RejectReason.REPLAY
    assert out.member_id == MEMBER.member_id
    assert expect.seen == {MEMBER.member_id}


def test_wrong_round_in_the_future() -> None:
    assert rejected(reply(round=ROUND + 1)).reason is RejectReason.WRONG_ROUND


def test_stale_base() -> None:
    stale = params_digest({name: a + np.float32(1) for name, a in GLOBAL.items()})
    assert rejected(reply(base_digest=stale)).reason is RejectReason.STALE_BASE


def test_digest_mismatch_arrays_changed_after_signing() -> None:
    tampered = update_arrays()
    tampered["fc.bias"] = tampered["fc.bias"] + np.float32(1)
    out = rejected(reply(sent_arrays=tampered))
    assert out.reason is RejectReason.DIGEST_MISMATCH
    assert out.member_id == MEMBER.member_id


@pytest.mark.parametrize(
    "arrays",
    [
        {"fc.weight": np.zeros((3, 2), np.float32), "fc.bias": np.zeros(2, np.float32)},
        {"fc.weight": np.zeros((2, 3), np.float64), "fc.bias": np.zeros(2, np.float32)},
        {"fc.weight": np.zeros((2, 3), np.float32)},
        {**GLOBAL, "extra": np.zeros(1, np.float32)},
    ],
    ids=["shape", "dtype", "missing", "extra"],
)
def test_shape_mismatch(arrays: dict[str, np.ndarray]) -> None:
    # Signed honestly over the wrong structure, so only the structure check can catch it.
    assert rejected(reply(arrays=arrays)).reason is RejectReason.SHAPE_MISMATCH


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite(bad: float) -> None:
    arrays = update_arrays()
    arrays["fc.weight"][1, 2] = bad
    assert rejected(reply(arrays=arrays)).reason is RejectReason.NON_FINITE


@pytest.mark.parametrize("count", [0, MAX_EXAMPLES + 1])
def test_example_count(count: int) -> None:
    out = rejected(reply(num_examples=count))
    assert out.reason is RejectReason.EXAMPLE_COUNT
    assert out.member_id == MEMBER.member_id


def test_example_count_at_the_declared_maximum_is_accepted() -> None:
    assert isinstance(verify_reply(reply(num_examples=MAX_EXAMPLES), expectation()), Accepted)


def test_every_reason_is_covered() -> None:
    tested = {name.removeprefix("test_") for name in globals() if name.startswith("test_")}
    for reason in RejectReason:
        assert any(name.startswith(reason.value) for name in tested), reason


def test_checks_run_in_reason_order() -> None:
    # Wrong federation and a stale base and NaNs: the earliest reason wins.
    arrays = update_arrays()
    arrays["fc.bias"][0] = np.nan
    out = rejected(reply(arrays=arrays, federation_id="fed-b", base_digest=bytes(32)))
    assert out.reason is RejectReason.WRONG_FEDERATION


def test_rejection_to_json() -> None:
    out = rejected(reply(run_id="run-0"))
    assert out.to_json() == {
        "node": NODE_ID,
        "member": MEMBER.member_id,
        "reason": "wrong_run",
        "detail": out.detail,
    }


# ---- inputs no rule anticipates must never stop the round ----------------------------------------


@pytest.mark.parametrize(
    "sent",
    [
        {"fc.weight": np.zeros((2, 3), np.complex64), "fc.bias": np.zeros(2, np.float32)},
        {"fc.weight": np.zeros((2, 3), np.float32), "fc.bias": np.array(["ab", "cd"])},
        {"": np.zeros((2, 3), np.float32), "fc.bias": np.zeros(2, np.float32)},
    ],
    ids=["complex64", "str", "empty-name"],
)
def test_arrays_the_digest_cannot_hash_are_rejected_not_raised(sent: dict[str, np.ndarray]) -> None:
    # A member signs honestly, then sends arrays params_digest would refuse: a dtype outside the
    # protocol's is refused while decoding, a bad name by the structure check; the round goes on.
    expected = RejectReason.SHAPE_MISMATCH if "" in sent else RejectReason.MALFORMED
    assert rejected(reply(sent_arrays=sent)).reason is expected


def test_an_unexpected_failure_while_checking_is_malformed(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(arrays: object) -> bytes:
        raise RuntimeError("boom")

    monkeypatch.setattr("coordinator.verify.params_digest", explode)
    out = rejected(reply())
    assert out.reason is RejectReason.MALFORMED
    assert out.detail == "unverifiable reply: RuntimeError: boom"


# ---- the arrays are read in place from their .npy bytes, strictly ----------------------------------------


def _npy(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _header(text: str, version: bytes = b"\x01\x00") -> bytes:
    raw = text.encode("latin1")
    size = len(raw).to_bytes(2 if version == b"\x01\x00" else 4, "little")
    return b"\x93NUMPY" + version + size + raw


_BIAS = np.zeros(2, np.float32)
_GOOD = _npy(_BIAS)
_DATA = _BIAS.tobytes()


@pytest.mark.parametrize(
    ("data", "dtype", "shape"),
    [
        (b"", "float32", (2,)),
        (b"\x93NUMPX" + _GOOD[6:], "float32", (2,)),
        (_GOOD[:9], "float32", (2,)),
        (b"\x93NUMPY\x03\x00" + _GOOD[8:], "float32", (2,)),
        (_GOOD[:-1], "float32", (2,)),  # one data byte short
        (_GOOD + b"\x00", "float32", (2,)),  # one byte too many
        (_header("{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }\n") + _DATA, "float32", (2,)),
        (_header("{'descr': '|O', 'fortran_order': False, 'shape': (2,), }\n") + _DATA, "object", (2,)),
        (_header("{'descr': '<c8', 'fortran_order': False, 'shape': (1,), }\n") + _DATA, "complex64", (1,)),
        (_header("{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }\n") + _DATA, "float32", (2,)),
        (_header("{'descr': '<f4', 'fortran_order': 0, 'shape': (2,), }\n") + _DATA, "float32", (2,)),
        (_header("{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }\n") + _DATA, "float32", (2,)),
        (_header("{'descr': '<f4', 'fortran_order': False, 'shape': (2.0,), }\n") + _DATA, "float32", (2,)),
        (_header("{'descr': '<f4', 'fortran_order': False, 'shape': [2], }\n") + _DATA, "float32", (2,)),
        (_header("{'descr': '<f4', 'fortran_order': False, 'shape': (True,), }\n") + _DATA, "float32", (2,)),
        (_header("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}\n") + _DATA, "float32", (2,)),
        (_header("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,)}\n") + _DATA, "float32", (2,)),
        (_header("__import__('os').system('true')\n") + _DATA, "float32", (2,)),
        (_header("{'descr': '<f4', 'fortran_order': False, 'shape': (2,)\n") + _DATA, "float32", (2,)),
        (_header("{[1]: 2}\n") + _DATA, "float32", (2,)),
        (_header("(" * 200 + ")" * 200) + _DATA, "float32", (2,)),
        (b"\x93NUMPY\x01\x00\xff\xff" + b" " * 10, "float32", (2,)),  # header longer than the data
        (b"\x93NUMPY\x02\x00" + (1 << 30).to_bytes(4, "little") + _DATA, "float32", (2,)),
        (_GOOD, "float64", (2,)),  # declared dtype differs from the data's
        (_GOOD, "float32", (1, 2)),  # declared shape differs from the data's
        (_npy(np.zeros(2, np.float64)), "float32", (2,)),
    ],
)
def test_malformed_npy_bytes_are_rejected_never_raised(data: bytes, dtype: str, shape: tuple[int, ...]) -> None:
    from flwr.app import Array

    msg = reply()
    record = msg.content.array_records[wire.ARRAYS]
    record["fc.bias"] = Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)
    out = rejected(msg)
    assert out.reason is RejectReason.MALFORMED, out
    assert out.detail.startswith("arrays cannot be decoded: array 'fc.bias'"), out.detail


def test_npy_version_2_headers_and_every_protocol_dtype_decode_in_place() -> None:
    from flwr.app import Array

    from coordinator.arrays import array_view, npy_view
    from protocols.digest import DTYPES

    for name in sorted(DTYPES):
        value = (np.arange(12) % 2).astype(name).reshape(3, 4)
        view = array_view(Array(value))
        assert view.dtype == value.dtype and view.shape == (3, 4) and view.tobytes() == value.tobytes()
        assert not view.flags.writeable
    v2 = _header("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }\n", b"\x02\x00") + _DATA
    assert npy_view(v2).tolist() == [0.0, 0.0]
    scalar = array_view(Array(np.array(2.5, np.float64)))
    assert scalar.shape == () and float(scalar) == 2.5


def test_an_honest_reply_is_verified_from_views_of_the_received_bytes() -> None:
    msg = reply()
    outcome = verify_reply(msg, expectation())
    assert isinstance(outcome, Accepted)
    received = msg.content.array_records[wire.ARRAYS]["fc.weight"].data
    view = outcome.arrays["fc.weight"]
    assert not view.flags.owndata and np.shares_memory(view, np.frombuffer(received, dtype=np.uint8))
