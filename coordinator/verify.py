"""Every check a reply must pass before it may touch the aggregate (docs/ARCHITECTURE.md, invariant 2).

`verify_reply` returns `Accepted` or `Rejected(reason, detail)`; it never raises for anything a
node can send. The checks run in the order of `protocols.RejectReason`, so each kind of bad
update gets one well-defined reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message

from coordinator.arrays import from_record
from protocols import (
    ArraySpec,
    DecodeError,
    Domain,
    Manifest,
    RejectReason,
    SignatureError,
    SignedBlob,
    UpdateEnvelope,
    params_digest,
    structure,
    wire,
)
from protocols.aggregation import all_finite
from protocols.payload import WEIGHTS, decode_array, wire_structure
from protocols.text import printable


@dataclass(frozen=True)
class Expectation:
    """What a valid reply in this round must match."""

    federation_id: str
    run_id: str
    round: int
    base_digest: bytes
    """Digest of the global model sent out this round."""
    template: Mapping[str, ArraySpec]
    """Names, dtypes and shapes of the global model."""
    manifest: Manifest
    """The manifest in force: only its `active` members' updates are accepted."""
    payload: str = WEIGHTS
    """The payload kind the run asks for (protocols.payload); an update of another kind is malformed."""
    base: Mapping[str, np.ndarray] | None = None
    """The global model sent out this round: a compressed update must decode against it (needed unless
    `payload` is `weights`)."""
    seen: set[str] = field(default_factory=set)
    """Members already accepted this round (a second update is a replay)."""


@dataclass(frozen=True)
class Accepted:
    """A verified update, ready to fold."""

    member_id: str
    node_id: int
    envelope: UpdateEnvelope
    arrays: dict[str, np.ndarray]
    signed: SignedBlob
    """The envelope bytes and signature exactly as received (kept in the record)."""


@dataclass(frozen=True)
class Rejected:
    """A reply that was not aggregated, and why (`detail` is bounded and escaped: it may quote a node's text)."""

    node_id: int
    reason: RejectReason
    detail: str
    member_id: str | None = None

    def to_json(self) -> dict[str, object]:
        """Plain form for metrics.jsonl."""
        return {"node": self.node_id, "member": self.member_id, "reason": str(self.reason), "detail": self.detail}


class _Reject(Exception):
    def __init__(self, reason: RejectReason, detail: str, member_id: str | None = None) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.member_id = reason, detail, member_id


def verify_reply(msg: Message, expect: Expectation) -> Accepted | Rejected:
    """Check one train reply; on success, record its member in `expect.seen`."""
    node_id = msg.metadata.src_node_id
    try:
        accepted = _verify(msg, expect, node_id)
    except _Reject as rej:
        return Rejected(node_id, rej.reason, printable(rej.detail), rej.member_id)
    except Exception as exc:  # untrusted input must never stop the round: whatever slipped past is malformed
        return Rejected(node_id, RejectReason.MALFORMED, printable(f"unverifiable reply: {type(exc).__name__}: {exc}"))
    expect.seen.add(accepted.member_id)
    return accepted


def _verify(msg: Message, expect: Expectation, node_id: int) -> Accepted:
    if msg.has_error():
        raise _Reject(RejectReason.NODE_ERROR, f"node replied with error: {msg.error.reason}")
    body, signature, env = _envelope(msg)
    member = expect.manifest.get(env.sender)
    if member is None:
        raise _Reject(RejectReason.UNKNOWN_MEMBER, f"sender {env.sender} is not in the manifest", env.sender)
    try:
        member.public_key.verify(Domain.UPDATE, body, signature)
    except SignatureError as exc:
        raise _Reject(RejectReason.BAD_SIGNATURE, str(exc), env.sender) from exc
    if not member.active:
        raise _Reject(
            RejectReason.INACTIVE_MEMBER,
            f"member {member.name!r} is {member.status} in manifest version {expect.manifest.version}",
            env.sender,
        )
    _check_binding(env, expect)
    if env.payload != expect.payload:
        raise _Reject(
            RejectReason.MALFORMED, f"sent payload {env.payload!r}, this run asks for {expect.payload!r}", env.sender
        )
    arrays = _arrays(msg, env.sender)
    _check_structure(arrays, wire_structure(expect.template, expect.payload), env.sender)
    if params_digest(arrays) != env.update_digest:
        raise _Reject(RejectReason.DIGEST_MISMATCH, "arrays differ from the signed digest", env.sender)
    _check_finite(arrays, env.sender)
    _check_decodes(arrays, expect, env.sender)
    _check_count(env, member.max_examples)
    _check_metrics(msg, env)
    return Accepted(env.sender, node_id, env, arrays, SignedBlob(body, signature))


def _envelope(msg: Message) -> tuple[bytes, bytes, UpdateEnvelope]:
    content = msg.content
    if wire.UPDATE_RECORD not in content.config_records:
        raise _Reject(RejectReason.UNSIGNED, "reply carries no signed update envelope")
    record = content.config_records[wire.UPDATE_RECORD]
    body, signature = record.get(wire.ENVELOPE), record.get(wire.SIGNATURE)
    if not isinstance(body, bytes) or not isinstance(signature, bytes):
        raise _Reject(RejectReason.UNSIGNED, "envelope or signature missing from the update record")
    if set(record.keys()) != {wire.ENVELOPE, wire.SIGNATURE}:
        raise _Reject(RejectReason.MALFORMED, f"unexpected update record keys {sorted(record.keys())}")
    try:
        env = UpdateEnvelope.decode(body)
    except DecodeError as exc:
        raise _Reject(RejectReason.MALFORMED, f"envelope: {exc}") from exc
    return body, signature, env


def _check_binding(env: UpdateEnvelope, expect: Expectation) -> None:
    who = env.sender
    if env.federation_id != expect.federation_id:
        raise _Reject(RejectReason.WRONG_FEDERATION, f"signed for federation {env.federation_id!r}", who)
    if env.run_id != expect.run_id:
        raise _Reject(RejectReason.WRONG_RUN, f"signed for run {env.run_id!r}", who)
    if env.round < expect.round:
        raise _Reject(RejectReason.REPLAY, f"signed for round {env.round}, this is round {expect.round}", who)
    if env.round > expect.round:
        raise _Reject(RejectReason.WRONG_ROUND, f"signed for future round {env.round}", who)
    if who in expect.seen:
        raise _Reject(RejectReason.REPLAY, "second update from this member in this round", who)
    if env.base_digest != expect.base_digest:
        raise _Reject(RejectReason.STALE_BASE, "trained from a model other than this round's global", who)


def _arrays(msg: Message, who: str) -> dict[str, np.ndarray]:
    records = msg.content.array_records
    if set(records.keys()) != {wire.ARRAYS}:
        raise _Reject(RejectReason.MALFORMED, f"expected one ArrayRecord {wire.ARRAYS!r}", who)
    try:
        return from_record(records[wire.ARRAYS])  # read-only views of the received bytes (coordinator.arrays)
    except Exception as exc:  # any decoding failure of untrusted bytes is a malformed reply
        raise _Reject(RejectReason.MALFORMED, f"arrays cannot be decoded: {exc}", who) from exc


def _check_structure(arrays: Mapping[str, np.ndarray], template: Mapping[str, ArraySpec], who: str) -> None:
    got = structure(arrays)
    if got == dict(template):
        return
    diffs = [
        f"{name}: {got.get(name, 'missing')} != {template.get(name, 'unexpected')}"
        for name in sorted(set(got) | set(template))
        if got.get(name) != template.get(name)
    ]
    raise _Reject(RejectReason.SHAPE_MISMATCH, "; ".join(diffs[:3]), who)


def _check_finite(arrays: Mapping[str, np.ndarray], who: str) -> None:
    for name, array in arrays.items():
        if not all_finite(array):
            raise _Reject(RejectReason.NON_FINITE, f"array {name!r} holds NaN or Inf", who)


def _check_decodes(arrays: Mapping[str, np.ndarray], expect: Expectation, who: str) -> None:
    """A compressed update must decode to finite weights against this round's base (one array at a time)."""
    if expect.payload == WEIGHTS:
        return
    if expect.base is None:
        raise RuntimeError("a compressed payload needs the round's base model in the Expectation")
    for name in sorted(arrays):
        try:
            decode_array(arrays[name], expect.base[name], expect.template[name], expect.payload)
        except ValueError as exc:
            raise _Reject(RejectReason.MALFORMED, f"array {name!r} does not decode: {exc}", who) from exc


def _check_count(env: UpdateEnvelope, max_examples: int) -> None:
    if not 1 <= env.num_examples <= max_examples:
        raise _Reject(
            RejectReason.EXAMPLE_COUNT,
            f"claims {env.num_examples} examples; allowed 1..{max_examples}",
            env.sender,
        )


def _check_metrics(msg: Message, env: UpdateEnvelope) -> None:
    records = msg.content.metric_records
    if set(records.keys()) != {wire.METRICS}:
        raise _Reject(RejectReason.MALFORMED, f"expected one MetricRecord {wire.METRICS!r}", env.sender)
    sent = dict(records[wire.METRICS])
    signed = {wire.NUM_EXAMPLES: env.num_examples, **env.metrics}
    if sent != signed:
        raise _Reject(RejectReason.MALFORMED, "metrics differ from the signed envelope", env.sender)
