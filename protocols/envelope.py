"""Signed envelopes: what a node says about its update, and what the coordinator says about a model.

Both encode as `b"WEFT" || u8 version || u8 kind || body` (docs/PROTOCOL.md). The bytes are signed
under the kind's `Domain`. Decoding is strict: wrong magic, an unknown version or kind, a field out
of range, an unknown payload kind or trailing bytes raise `DecodeError`.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from protocols.encoding import ConfigValue, Reader, Writer
from protocols.errors import DecodeError
from protocols.identity import Domain, PublicKey, SigningKey
from protocols.payload import PAYLOADS as _PAYLOAD_KINDS

MAGIC = b"WEFT"
VERSION = 1

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""What a federation id, run id or task name may look like (all are signed into envelopes)."""
_MEMBER = re.compile(r"[0-9a-f]{16}")
_KEY = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")

PAYLOAD_WEIGHTS = "weights"
"""The update carries the full trained parameter vector (the default payload kind)."""
PAYLOADS = frozenset(_PAYLOAD_KINDS)
"""`weights`, `delta-fp16`, `delta-int8`, `delta-int4`: what the arrays are (protocols/payload.py)."""

RESERVED_METRIC = "num-examples"
"""Carries the example count next to the metrics in a Flower reply; never a metric name."""

_E = TypeVar("_E", "UpdateEnvelope", "GlobalModelEnvelope", "EvaluationEnvelope")


class Kind(enum.IntEnum):
    """The structure a blob of envelope bytes holds."""

    UPDATE = 1
    GLOBAL_MODEL = 2
    EVALUATION = 3


@dataclass(frozen=True)
class UpdateEnvelope:
    """A node's signed statement about one update.

    The signature binds every field: a changed byte anywhere invalidates it.
    """

    federation_id: str
    """Federation this update is for."""
    run_id: str
    """Run of that federation."""
    round: int
    """Training round the update was made in (rounds start at 1; 0 never matches a live round)."""
    sender: str
    """Member id of the signing node (fingerprint of its public key)."""
    base_digest: bytes
    """Digest of the global model the node started training from."""
    update_digest: bytes
    """Digest of the parameter vector sent back (`protocols.digest.params_digest`)."""
    num_examples: int
    """Training examples behind this update (the FedAvg weight)."""
    metrics: Mapping[str, float] = field(default_factory=dict)
    """Declared scalar metrics, names from the node's allowlist."""
    payload: str = PAYLOAD_WEIGHTS
    """What the arrays are: one of `PAYLOADS` (protocols/payload.py decodes them into weights)."""

    def __post_init__(self) -> None:
        _check_node_statement(self.federation_id, self.run_id, self.round, self.sender, self.num_examples, self.metrics)
        _check_digest("base_digest", self.base_digest)
        _check_digest("update_digest", self.update_digest)
        if self.payload not in PAYLOADS:
            raise ValueError(f"unknown payload kind {self.payload!r}")
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))

    def encode(self) -> bytes:
        """Canonical bytes (the signed message)."""
        w = _header(Kind.UPDATE)
        w.text(self.federation_id).text(self.run_id).u32(self.round).text(self.sender)
        w.digest(self.base_digest).digest(self.update_digest).text(self.payload)
        w.u64(self.num_examples).metrics(self.metrics)
        return w.getvalue()

    @classmethod
    def decode(cls, data: bytes) -> UpdateEnvelope:
        """Parse canonical bytes strictly."""
        r = _read_header(data, Kind.UPDATE)
        fields = dict(
            federation_id=r.text(),
            run_id=r.text(),
            round=r.u32(),
            sender=r.text(),
            base_digest=r.digest(),
            update_digest=r.digest(),
            payload=r.text(),
            num_examples=r.u64(),
            metrics=r.metrics(),
        )
        r.finish()
        return _build(cls, fields)


@dataclass(frozen=True)
class GlobalModelEnvelope:
    """The coordinator's signed statement about a global model and how to train on it."""

    federation_id: str
    """Federation the model belongs to."""
    run_id: str
    """Run that produced it."""
    round: int
    """Aggregation rounds completed to produce this model (0: the initial model)."""
    model_digest: bytes
    """Digest of the model's parameter vector."""
    task: str
    """Name of the task (model + data recipe) the arrays belong to."""
    config: Mapping[str, ConfigValue] = field(default_factory=dict)
    """Training instructions for the next round (local epochs, learning rate, ...)."""

    def __post_init__(self) -> None:
        _check_id("federation_id", self.federation_id)
        _check_id("run_id", self.run_id)
        _check_range("round", self.round, 0, 2**32 - 1)
        _check_digest("model_digest", self.model_digest)
        _check_id("task", self.task)
        _check_keys("config", self.config)
        object.__setattr__(self, "config", MappingProxyType(dict(self.config)))

    def encode(self) -> bytes:
        """Canonical bytes (the signed message)."""
        w = _header(Kind.GLOBAL_MODEL)
        w.text(self.federation_id).text(self.run_id).u32(self.round)
        w.digest(self.model_digest).text(self.task).config(self.config)
        return w.getvalue()

    @classmethod
    def decode(cls, data: bytes) -> GlobalModelEnvelope:
        """Parse canonical bytes strictly."""
        r = _read_header(data, Kind.GLOBAL_MODEL)
        fields = dict(
            federation_id=r.text(),
            run_id=r.text(),
            round=r.u32(),
            model_digest=r.digest(),
            task=r.text(),
            config=r.config(),
        )
        r.finish()
        return _build(cls, fields)


@dataclass(frozen=True)
class EvaluationEnvelope:
    """A node's signed statement about how a global model did on its local validation data.

    Binds the model evaluated (its digest and round), the example count and the metrics: the coordinator
    counts an evaluation only if it verifies, and records it in the ledger as signed.
    """

    federation_id: str
    run_id: str
    round: int
    """The round of the global model that was evaluated."""
    sender: str
    """Member id of the evaluating node."""
    model_digest: bytes
    """Digest of the global model evaluated."""
    num_examples: int
    """Validation examples behind the metrics."""
    metrics: Mapping[str, float] = field(default_factory=dict)
    """Declared scalar metrics (`eval_*`, `personal_*`)."""

    def __post_init__(self) -> None:
        _check_node_statement(self.federation_id, self.run_id, self.round, self.sender, self.num_examples, self.metrics)
        _check_digest("model_digest", self.model_digest)
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))

    def encode(self) -> bytes:
        """Canonical bytes (the signed message)."""
        w = _header(Kind.EVALUATION)
        w.text(self.federation_id).text(self.run_id).u32(self.round).text(self.sender)
        w.digest(self.model_digest).u64(self.num_examples).metrics(self.metrics)
        return w.getvalue()

    @classmethod
    def decode(cls, data: bytes) -> EvaluationEnvelope:
        """Parse canonical bytes strictly."""
        r = _read_header(data, Kind.EVALUATION)
        fields = dict(
            federation_id=r.text(),
            run_id=r.text(),
            round=r.u32(),
            sender=r.text(),
            model_digest=r.digest(),
            num_examples=r.u64(),
            metrics=r.metrics(),
        )
        r.finish()
        return _build(cls, fields)


# ---- signing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignedBlob:
    """Envelope bytes and the signature over them, as they travel."""

    body: bytes
    signature: bytes


def sign_update(key: SigningKey, envelope: UpdateEnvelope) -> SignedBlob:
    """Sign an update envelope; the key must be the envelope's sender."""
    if key.member_id != envelope.sender:
        raise ValueError(f"key {key.member_id} cannot sign for sender {envelope.sender}")
    body = envelope.encode()
    return SignedBlob(body, key.sign(Domain.UPDATE, body))


def sign_global_model(key: SigningKey, envelope: GlobalModelEnvelope) -> SignedBlob:
    """Sign a global-model envelope with the coordinator's key."""
    body = envelope.encode()
    return SignedBlob(body, key.sign(Domain.GLOBAL_MODEL, body))


def sign_evaluation(key: SigningKey, envelope: EvaluationEnvelope) -> SignedBlob:
    """Sign an evaluation envelope; the key must be the envelope's sender."""
    if key.member_id != envelope.sender:
        raise ValueError(f"key {key.member_id} cannot sign for sender {envelope.sender}")
    body = envelope.encode()
    return SignedBlob(body, key.sign(Domain.EVALUATION, body))


def open_global_model(blob: SignedBlob, coordinator: PublicKey) -> GlobalModelEnvelope:
    """Verify the coordinator's signature, then decode. Raises SignatureError or DecodeError."""
    coordinator.verify(Domain.GLOBAL_MODEL, blob.body, blob.signature)
    return GlobalModelEnvelope.decode(blob.body)


# ---- helpers -------------------------------------------------------------------------------------


def _header(kind: Kind) -> Writer:
    return Writer().raw(MAGIC).u8(VERSION).u8(kind)


def _read_header(data: bytes, kind: Kind) -> Reader:
    r = Reader(data)
    if r.take(4) != MAGIC:
        raise DecodeError("not a weft envelope (bad magic)")
    version = r.u8()
    if version != VERSION:
        raise DecodeError(f"unsupported envelope version {version} (this build knows {VERSION})")
    got = r.u8()
    if got != kind:
        raise DecodeError(f"expected envelope kind {kind.name}, got {got}")
    return r


def _build(cls: type[_E], fields: dict[str, Any]) -> _E:
    try:
        return cls(**fields)
    except ValueError as exc:
        raise DecodeError(str(exc)) from exc


def _check_node_statement(
    federation_id: str, run_id: str, round_: int, sender: str, num_examples: int, metrics: Mapping[str, float]
) -> None:
    """The fields every envelope a node signs shares: binding, sender, example count, declared metrics."""
    _check_id("federation_id", federation_id)
    _check_id("run_id", run_id)
    _check_range("round", round_, 0, 2**32 - 1)
    if not _MEMBER.fullmatch(sender):
        raise ValueError(f"sender must be a 16-hex-digit member id, got {sender!r}")
    _check_range("num_examples", num_examples, 0, 2**63 - 1)
    _check_keys("metrics", metrics)
    if RESERVED_METRIC in metrics:
        raise ValueError(f"metrics may not use the reserved name {RESERVED_METRIC!r}")
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"metric {name!r} must be a finite number, got {value!r}")


def _check_id(name: str, value: str) -> None:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ValueError(f"{name} must match {ID_PATTERN.pattern}, got {value!r}")


def _check_keys(name: str, values: Mapping[str, object]) -> None:
    for key in values:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(f"{name} key {key!r} must match {_KEY.pattern}")


def _check_range(name: str, value: int, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


def _check_digest(name: str, value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != 32:
        raise ValueError(f"{name} must be 32 bytes")
