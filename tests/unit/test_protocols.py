"""The wire protocol: docs/PROTOCOL.md's test vectors, strict decoding, signatures, keys, files.

The vectors in the document are recomputed here from the inputs of its section 11.1 and must
match byte for byte; a vector in the document that this file does not check is itself a failure.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import blake3
import numpy as np
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from protocols import (
    VERSION,
    ArraySpec,
    DecodeError,
    Domain,
    GlobalModelEnvelope,
    KeyFileError,
    Manifest,
    ManifestError,
    Member,
    PublicKey,
    RejectReason,
    SignatureError,
    SignedBlob,
    SigningKey,
    Status,
    UpdateEnvelope,
    WeakKeyError,
    load_public_key,
    load_signing_key,
    open_global_model,
    params_digest,
    read_signed_model,
    save_public_key,
    save_signing_key,
    sign_global_model,
    sign_update,
    structure,
    wire,
    write_signed_model,
)
from protocols.digest import DTYPES
from protocols.encoding import MAX_BLOB_BYTES, MAX_MAP_ENTRIES, MAX_TEXT_BYTES, Reader, Writer
from protocols.envelope import MAGIC
from protocols.identity import SMALL_ORDER_KEYS

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"

# ---- the inputs of docs/PROTOCOL.md section 11.1 ---------------------------------------------------

NODE = SigningKey.from_seed(bytes(range(32)))
COORDINATOR = SigningKey.from_seed(bytes(range(32, 64)))
THIRD = SigningKey.from_seed(bytes(range(64, 96)))


def p1() -> dict[str, np.ndarray]:
    """P1; `layer.weight` is inserted first on purpose (the digest sorts by name)."""
    return {
        "layer.weight": np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32),
        "layer.bias": np.array([0.5, -1.0], dtype=np.float32),
    }


def p2() -> dict[str, np.ndarray]:
    return {
        "step": np.array(3.25, dtype=np.float64),
        "half": np.array([1.0, -2.5, 65504.0], dtype=np.float16),
        "count": np.array([-1, 0, 2**40], dtype=np.int64),
        "mask": np.array([True, False, True]),
        "bytes": np.array([[0, 255]], dtype=np.uint8),
    }


def p3() -> dict[str, np.ndarray]:
    return {
        "\U0001f600": np.array([1], dtype=np.int8),
        "\uff41": np.array([2], dtype=np.int8),
    }


def u1() -> UpdateEnvelope:
    return UpdateEnvelope(
        federation_id="fed-demo",
        run_id="run-0001",
        round=3,
        sender=NODE.member_id,
        base_digest=hashlib.sha256(b"base").digest(),
        update_digest=params_digest(p1()),
        num_examples=1234,
        metrics={"train_loss": 0.25, "train_accuracy": 0.875},
    )


def g1() -> GlobalModelEnvelope:
    return GlobalModelEnvelope(
        federation_id="fed-demo",
        run_id="run-0001",
        round=2,
        model_digest=params_digest(p1()),
        task="digits",
        config={"local-epochs": 2, "learning-rate": 0.05, "seed": -7, "schedule": "constant"},
    )


def flower_auth_key_1() -> str:
    """The OpenSSH public key of the P-384 private scalar 0x606162...8f (the bytes 96..143, big-endian)."""
    private = ec.derive_private_key(int.from_bytes(bytes(range(96, 144)), "big"), ec.SECP384R1())
    return private.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()


def m2_unsigned() -> Manifest:
    return Manifest(
        federation_id="fed-demo",
        coordinator_key=COORDINATOR.public_key,
        members=(
            Member("hospital-a", NODE.public_key, "DE", 5000, flower_auth_key=flower_auth_key_1()),
            Member("clinic-b", THIRD.public_key, "FR", 800, status=Status.SUSPENDED),
        ),
        version=2,
    )


def m2() -> Manifest:
    return m2_unsigned().sign(COORDINATOR)


# ---- independent re-implementations of the documented layouts (struct + hashlib only) -----------


def _u32(n: int) -> bytes:
    return struct.pack(">I", n)


def _u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def _f64(x: float) -> bytes:
    return struct.pack(">d", x)


def _text(s: str) -> bytes:
    raw = s.encode("utf-8")
    return _u32(len(raw)) + raw


def _member_id(raw_public_key: bytes) -> str:
    return hashlib.sha256(b"weft/member-id/v1\x00" + raw_public_key).digest()[:8].hex()


def _digest_preimage(arrays: dict[str, np.ndarray]) -> bytes:
    out = [b"weft/params/v2\x00", _u32(len(arrays))]
    for name in sorted(arrays, key=lambda n: n.encode("utf-8")):
        a = arrays[name]
        data = a.astype(a.dtype.newbyteorder("<")).tobytes(order="C")
        out += [_text(name), _text(a.dtype.name), _u32(a.ndim)]
        out += [_u64(d) for d in a.shape]
        out += [_u64(len(data)), data]
    return b"".join(out)


def _update_bytes(
    *,
    header: bytes = b"WEFT\x01\x01",
    sender: str = NODE.member_id,
    num_examples: int = 1234,
    payload: str = "weights",
    metrics: bytes | None = None,
) -> bytes:
    """U1's encoding, built by hand, with one part replaced."""
    if metrics is None:
        metrics = _u32(2) + _text("train_accuracy") + _f64(0.875) + _text("train_loss") + _f64(0.25)
    return b"".join(
        [
            header,
            _text("fed-demo"),
            _text("run-0001"),
            _u32(3),
            _text(sender),
            hashlib.sha256(b"base").digest(),
            params_digest(p1()),
            _text(payload),
            _u64(num_examples),
            metrics,
        ]
    )


def _global_bytes(config: bytes) -> bytes:
    """G1's encoding, built by hand, with the config section replaced."""
    return b"".join(
        [
            b"WEFT\x01\x02",
            _text("fed-demo"),
            _text("run-0001"),
            _u32(2),
            params_digest(p1()),
            _text("digits"),
            config,
        ]
    )


# ---- the document's vectors --------------------------------------------------------------------

_HEX = re.compile(r"[0-9a-f]+")


def parse_vectors(markdown: str) -> dict[str, str]:
    """The vectors of docs/PROTOCOL.md section 11, by the rules it states there."""
    out: dict[str, str] = {}

    def add(name: str, value: str) -> None:
        assert name not in out, f"vector {name!r} appears twice"
        out[name] = value

    for block in re.findall(r"^```vector\n(.*?)^```$", markdown, flags=re.M | re.S):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if not line.strip():
                continue
            if line[0].isspace():
                assert key is not None, f"continuation line before any key: {line!r}"
                fields[key] += line
            else:
                key, sep, value = line.partition(":")
                assert sep, f"not a key: value line: {line!r}"
                fields[key] = value
        assert set(fields) == {"name", "expected"}, f"unexpected vector fields {sorted(fields)}"
        value = "".join(fields["expected"].split())
        assert _HEX.fullmatch(value), f"vector {fields['name'].strip()!r} is not lowercase hex"
        add(fields["name"].strip(), value)
    for name, body in re.findall(r"^```(?:text|json) vector=(\S+)\n(.*?)^```$", markdown, flags=re.M | re.S):
        add(name, body)
    return out


def _node_private_pem() -> str:
    return NODE._key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()


def _node_public_pem(tmp: Path) -> str:
    save_public_key(NODE.public_key, tmp / "node.pub")
    return (tmp / "node.pub").read_text()


COMPUTED: dict[str, Callable[[Path], str]] = {
    "node-public-key": lambda _: NODE.public_key.hex(),
    "node-member-id": lambda _: NODE.member_id,
    "coordinator-public-key": lambda _: COORDINATOR.public_key.hex(),
    "coordinator-member-id": lambda _: COORDINATOR.member_id,
    "third-public-key": lambda _: THIRD.public_key.hex(),
    "third-member-id": lambda _: THIRD.member_id,
    "node-private-key-pem": lambda _: _node_private_pem(),
    "node-public-key-pem": _node_public_pem,
    "params-digest-empty": lambda _: params_digest({}).hex(),
    "params-digest-1-preimage": lambda _: _digest_preimage(p1()).hex(),
    "params-digest-1": lambda _: params_digest(p1()).hex(),
    "params-digest-2": lambda _: params_digest(p2()).hex(),
    "params-digest-3": lambda _: params_digest(p3()).hex(),
    "update-envelope-1": lambda _: u1().encode().hex(),
    "update-envelope-1-signature": lambda _: sign_update(NODE, u1()).signature.hex(),
    "global-model-envelope-1": lambda _: g1().encode().hex(),
    "global-model-envelope-1-signature": lambda _: sign_global_model(COORDINATOR, g1()).signature.hex(),
    "manifest-2-body": lambda _: m2_unsigned().canonical_bytes().decode("utf-8") + "\n",
    "manifest-2-signature": lambda _: (m2().signature or b"").hex(),
    "manifest-2": lambda _: m2().to_json(),
    "small-order-public-keys": lambda _: "".join(sorted(k.hex() for k in SMALL_ORDER_KEYS)),
}


@pytest.fixture(scope="module")
def vectors() -> dict[str, str]:
    return parse_vectors(DOC.read_text(encoding="utf-8"))


def test_document_holds_exactly_the_vectors_this_file_checks(vectors: dict[str, str]) -> None:
    assert sorted(vectors) == sorted(COMPUTED)


@pytest.mark.parametrize("name", sorted(COMPUTED))
def test_vector_matches_code(name: str, vectors: dict[str, str], tmp_path: Path) -> None:
    assert vectors[name] == COMPUTED[name](tmp_path)


def test_vector_parser_joins_continuation_lines_and_reads_text_blocks() -> None:
    doc = (
        "```vector\nname: a\nexpected:\n  00ff\n  10\n```\n"
        "```vector\nname: b\nexpected: 0a0b\n```\n"
        "```text vector=c\nline 1\nline 2\n```\n"
    )
    assert parse_vectors(doc) == {"a": "00ff10", "b": "0a0b", "c": "line 1\nline 2\n"}
    with pytest.raises(AssertionError, match="appears twice"):
        parse_vectors(doc + "```vector\nname: a\nexpected: 00\n```\n")
    with pytest.raises(AssertionError, match="not lowercase hex"):
        parse_vectors("```vector\nname: x\nexpected: 0A\n```\n")


def test_member_ids_are_the_documented_fingerprint(vectors: dict[str, str]) -> None:
    for who in ("node", "coordinator", "third"):
        raw = bytes.fromhex(vectors[f"{who}-public-key"])
        assert _member_id(raw) == vectors[f"{who}-member-id"]
    assert NODE.member_id == _member_id(NODE.public_key.raw) == "4f40b571c3f73a97"


def test_key_file_vectors_have_the_documented_der(vectors: dict[str, str]) -> None:
    def der(pem: str) -> bytes:
        return base64.b64decode("".join(pem.strip().splitlines()[1:-1]))

    private = der(vectors["node-private-key-pem"])
    public = der(vectors["node-public-key-pem"])
    assert private == bytes.fromhex("302e020100300506032b657004220420") + bytes(range(32))
    assert public == bytes.fromhex("302a300506032b6570032100") + NODE.public_key.raw


def test_digest_vectors_follow_the_documented_preimage(vectors: dict[str, str]) -> None:
    preimage = bytes.fromhex(vectors["params-digest-1-preimage"])
    assert len(preimage) == 151
    assert blake3.blake3(preimage).hexdigest() == vectors["params-digest-1"]
    for arrays, name in ((p2(), "params-digest-2"), (p3(), "params-digest-3"), ({}, "empty")):
        expected = vectors[name if name != "empty" else "params-digest-empty"]
        assert blake3.blake3(_digest_preimage(arrays)).hexdigest() == expected


def test_p3_sorts_by_utf8_bytes_not_utf16_units() -> None:
    preimage = _digest_preimage(p3())
    assert preimage.index("\uff41".encode()) < preimage.index("\U0001f600".encode())
    utf16_order = sorted(p3(), key=lambda n: n.encode("utf-16-be"))
    assert utf16_order == ["\U0001f600", "\uff41"]  # the order an implementation must NOT use


def test_envelope_vectors_match_hand_built_layouts(vectors: dict[str, str]) -> None:
    assert vectors["update-envelope-1"] == _update_bytes().hex()
    config = b"".join(
        [
            _u32(4),
            _text("learning-rate") + b"f" + _f64(0.05),
            _text("local-epochs") + b"i" + struct.pack(">q", 2),
            _text("schedule") + b"s" + _text("constant"),
            _text("seed") + b"i" + struct.pack(">q", -7),
        ]
    )
    assert vectors["global-model-envelope-1"] == _global_bytes(config).hex()


@pytest.mark.parametrize(
    ("body", "signature", "domain", "key"),
    [
        (
            "update-envelope-1",
            "update-envelope-1-signature",
            b"weft/update/v1\x00",
            NODE.public_key,
        ),
        (
            "global-model-envelope-1",
            "global-model-envelope-1-signature",
            b"weft/global-model/v1\x00",
            COORDINATOR.public_key,
        ),
    ],
)
def test_signature_vectors_are_plain_ed25519_over_domain_and_body(
    vectors: dict[str, str], body: str, signature: str, domain: bytes, key: PublicKey
) -> None:
    message, sig = bytes.fromhex(vectors[body]), bytes.fromhex(vectors[signature])
    verifier = Ed25519PublicKey.from_public_bytes(key.raw)
    verifier.verify(sig, domain + message)  # raises if the documented construction is wrong
    with pytest.raises(InvalidSignature):
        verifier.verify(sig, message)


def test_decoding_the_vectors_gives_the_documented_values(vectors: dict[str, str]) -> None:
    update = UpdateEnvelope.decode(bytes.fromhex(vectors["update-envelope-1"]))
    assert update == u1()
    assert update.sender == "4f40b571c3f73a97"
    assert update.payload == "weights"
    assert dict(update.metrics) == {"train_accuracy": 0.875, "train_loss": 0.25}
    model = GlobalModelEnvelope.decode(bytes.fromhex(vectors["global-model-envelope-1"]))
    assert model == g1()
    assert {k: (type(v), v) for k, v in model.config.items()} == {
        "learning-rate": (float, 0.05),
        "local-epochs": (int, 2),
        "schedule": (str, "constant"),
        "seed": (int, -7),
    }


def test_manifest_vector_loads(vectors: dict[str, str]) -> None:
    manifest = Manifest.from_json(vectors["manifest-2"], coordinator_key=COORDINATOR.public_key)
    assert manifest == m2()
    assert [m.member_id for m in manifest] == ["14e1505a4df1e19d", "4f40b571c3f73a97"]
    assert [(m.name, m.status) for m in manifest] == [("clinic-b", "suspended"), ("hospital-a", "active")]
    assert manifest.version == 2
    assert manifest.get(NODE.member_id).flower_auth_key.startswith("ecdsa-sha2-nistp384 AAAA")  # type: ignore[union-attr]


def test_manifest_signature_vector_is_plain_ed25519_over_domain_and_canonical_body(vectors: dict[str, str]) -> None:
    body = vectors["manifest-2-body"].removesuffix("\n").encode("utf-8")
    assert len(body) == 804
    doc = json.loads(vectors["manifest-2"])
    assert doc["signature"] == vectors["manifest-2-signature"]
    del doc["signature"]
    # the documented canonical form, written out by hand: sorted keys, no whitespace, UTF-8
    assert json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() == body
    verifier = Ed25519PublicKey.from_public_bytes(COORDINATOR.public_key.raw)
    signature = bytes.fromhex(vectors["manifest-2-signature"])
    verifier.verify(signature, b"weft/manifest/v2\x00" + body)
    with pytest.raises(InvalidSignature):
        verifier.verify(signature, body)
    with pytest.raises(InvalidSignature):
        verifier.verify(signature, b"weft/manifest/v1\x00" + body)


# ---- constants the document names ----------------------------------------------------------------


def test_documented_constants() -> None:
    assert (MAGIC, VERSION) == (b"WEFT", 1)
    assert {d.name: d.value for d in Domain} == {
        "UPDATE": b"weft/update/v1\x00",
        "GLOBAL_MODEL": b"weft/global-model/v1\x00",
        "MANIFEST": b"weft/manifest/v2\x00",
        "LEDGER": b"weft/ledger/v1\x00",
        "EVALUATION": b"weft/evaluation/v1\x00",
    }
    assert frozenset({"bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"}) == DTYPES
    assert (MAX_TEXT_BYTES, MAX_BLOB_BYTES, MAX_MAP_ENTRIES) == (4096, 1 << 20, 1024)
    assert (wire.ARRAYS, wire.METRICS, wire.NUM_EXAMPLES) == ("arrays", "metrics", "num-examples")
    assert (wire.GLOBAL_RECORD, wire.UPDATE_RECORD, wire.EVALUATION_RECORD) == (
        "weft.global",
        "weft.update",
        "weft.evaluation",
    )
    assert (wire.ENVELOPE, wire.SIGNATURE) == ("envelope", "signature")


def test_reject_reasons_in_documented_order() -> None:
    assert [str(r) for r in RejectReason] == [
        "node_error",
        "unsigned",
        "malformed",
        "unknown_member",
        "bad_signature",
        "inactive_member",
        "wrong_federation",
        "wrong_run",
        "replay",
        "wrong_round",
        "stale_base",
        "shape_mismatch",
        "digest_mismatch",
        "non_finite",
        "example_count",
        "below_quality_floor",
    ]


def test_document_names_every_reason_and_record() -> None:
    doc = DOC.read_text(encoding="utf-8")
    names = [str(r) for r in RejectReason]
    names += [wire.ARRAYS, wire.METRICS, wire.NUM_EXAMPLES, wire.GLOBAL_RECORD]
    names += [wire.UPDATE_RECORD, wire.ENVELOPE, wire.SIGNATURE]
    assert [n for n in names if f"`{n}`" not in doc] == []


# ---- envelope round trips ------------------------------------------------------------------------


def test_update_envelope_round_trip() -> None:
    envelope = u1()
    body = envelope.encode()
    assert UpdateEnvelope.decode(body) == envelope
    assert UpdateEnvelope.decode(body).encode() == body


def test_update_envelope_round_trip_at_the_limits() -> None:
    envelope = UpdateEnvelope(
        federation_id="F" * 128,
        run_id="r.1_2-3",
        round=2**32 - 1,
        sender="0123456789abcdef",
        base_digest=bytes(32),
        update_digest=b"\xff" * 32,
        num_examples=2**63 - 1,
        metrics={},
    )
    body = envelope.encode()
    assert UpdateEnvelope.decode(body) == envelope
    assert body[-4:] == _u32(0)
    zero = UpdateEnvelope.decode(UpdateEnvelope(**{**_fields(envelope), "num_examples": 0, "round": 0}).encode())
    assert (zero.num_examples, zero.round) == (0, 0)


def _fields(envelope: UpdateEnvelope) -> dict[str, object]:
    return {name: getattr(envelope, name) for name in envelope.__dataclass_fields__}


def test_global_model_envelope_round_trip() -> None:
    envelope = GlobalModelEnvelope(
        federation_id="fed-demo",
        run_id="run-0001",
        round=0,
        model_digest=params_digest(p2()),
        task="digits",
        config={
            "a": -(2**63),
            "b": 2**63 - 1,
            "c": -0.0,
            "d": 1e-300,
            "e": "ünïcode ✓",
            "f": "",
            "g": 2.0,
        },
    )
    body = envelope.encode()
    decoded = GlobalModelEnvelope.decode(body)
    assert decoded == envelope
    assert decoded.encode() == body
    assert type(decoded.config["g"]) is float
    assert type(decoded.config["b"]) is int
    assert math.copysign(1.0, decoded.config["c"]) == -1.0  # type: ignore[arg-type]


def test_envelopes_are_read_only() -> None:
    envelope = u1()
    with pytest.raises(TypeError):
        envelope.metrics["train_loss"] = 1.0  # type: ignore[index]
    with pytest.raises(AttributeError):
        envelope.round = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"federation_id": "has space"}, "federation_id must match"),
        ({"run_id": ""}, "run_id must match"),
        ({"round": -1}, r"round must be an integer in \[0, 4294967295\], got -1"),
        ({"round": 2**32}, r"round must be an integer in \[0, 4294967295\], got 4294967296"),
        ({"round": True}, "round must be an integer"),
        ({"sender": "4F40B571C3F73A97"}, "sender must be a 16-hex-digit member id"),
        ({"base_digest": bytes(31)}, "base_digest must be 32 bytes"),
        ({"num_examples": 2**63}, "num_examples must be an integer"),
        ({"metrics": {"Train_Loss": 1.0}}, "metrics key 'Train_Loss' must match"),
        ({"payload": "deltas"}, "unknown payload kind 'deltas'"),
    ],
)
def test_update_envelope_refuses_bad_fields(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UpdateEnvelope(**{**_fields(u1()), **change})


def test_global_model_round_may_be_zero_but_task_must_be_an_id() -> None:
    assert GlobalModelEnvelope("f", "r", 0, bytes(32), "t").round == 0
    with pytest.raises(ValueError, match="round must be an integer in"):
        GlobalModelEnvelope("f", "r", -1, bytes(32), "t")
    with pytest.raises(ValueError, match="task must match"):
        GlobalModelEnvelope("f", "r", 0, bytes(32), "no/slash")


@pytest.mark.parametrize(
    ("envelope", "message"),
    [
        (
            lambda: UpdateEnvelope(**{**_fields(u1()), "metrics": {"x": math.nan}}),
            "metric 'x' must be a finite number",
        ),
        (
            lambda: GlobalModelEnvelope("f", "r", 0, bytes(32), "t", {"x": math.inf}),
            "only finite floats can be encoded",
        ),
        (
            lambda: GlobalModelEnvelope("f", "r", 0, bytes(32), "t", {"x": True}),
            "booleans are not allowed",
        ),
        (
            lambda: GlobalModelEnvelope("f", "r", 0, bytes(32), "t", {"x": 2**63}),
            "does not fit in i64",
        ),
        (
            lambda: GlobalModelEnvelope("f", "r", 0, bytes(32), "t", {"x": [1]}),
            "unsupported type list",
        ),
    ],
)
def test_encoding_refuses_values_without_a_canonical_form(
    envelope: Callable[[], UpdateEnvelope | GlobalModelEnvelope], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        envelope().encode()


# ---- strict decoding -----------------------------------------------------------------------------


def test_hand_built_bytes_decode() -> None:
    # positive control for the byte surgery below
    assert UpdateEnvelope.decode(_update_bytes()) == u1()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_update_bytes(header=b"WEFX\x01\x01"), "not a weft envelope (bad magic)"),
        (_update_bytes(header=b"weft\x01\x01"), "not a weft envelope (bad magic)"),
        (_update_bytes(header=b"WEFT\x02\x01"), "unsupported envelope version 2 (this build knows 1)"),
        (_update_bytes(header=b"WEFT\x00\x01"), "unsupported envelope version 0 (this build knows 1)"),
        (_update_bytes(header=b"WEFT\x01\x02"), "expected envelope kind UPDATE, got 2"),
        (_update_bytes(header=b"WEFT\x01\x03"), "expected envelope kind UPDATE, got 3"),
        (_update_bytes()[:-1], "truncated: wanted 8 bytes at offset 181"),
        (_update_bytes() + b"\x00", "1 trailing bytes"),
        (_update_bytes() + b"\x00" * 7, "7 trailing bytes"),
        (_update_bytes(payload="deltas"), "unknown payload kind 'deltas'"),
        (_update_bytes(payload="Weights"), "unknown payload kind 'Weights'"),
        (_update_bytes(sender="4F40B571C3F73A97"), "sender must be a 16-hex-digit member id"),
        (_update_bytes(num_examples=2**63), "num_examples must be an integer in"),
        (
            _update_bytes(metrics=_u32(2) + _text("train_loss") + _f64(0.25) + _text("train_accuracy") + _f64(0.875)),
            "map keys not strictly sorted at 'train_accuracy'",
        ),
        (
            _update_bytes(metrics=_u32(2) + _text("a") + _f64(1.0) + _text("a") + _f64(1.0)),
            "map keys not strictly sorted at 'a'",
        ),
        (_update_bytes(metrics=_u32(1) + _text("a") + _f64(math.nan)), "non-finite float"),
        (_update_bytes(metrics=_u32(1) + _text("a") + _f64(math.inf)), "non-finite float"),
        (_update_bytes(metrics=_u32(1) + _text("a") + _f64(-math.inf)), "non-finite float"),
        (_update_bytes(metrics=_u32(1) + _text("A") + _f64(1.0)), "metrics key 'A' must match"),
        (_update_bytes(metrics=_u32(1) + _u32(1) + b"\xff" + _f64(1.0)), "text is not valid UTF-8"),
        (_update_bytes(metrics=_u32(1) + _u32(4097)), "text of 4097 bytes exceeds 4096"),
        (_update_bytes(metrics=_u32(1025)), "map of 1025 entries exceeds 1024"),
        (_update_bytes(metrics=_u32(3) + _text("a") + _f64(1.0)), "truncated: wanted 4 bytes"),
        (b"", "truncated: wanted 4 bytes at offset 0"),
        (b"WEFT", "truncated: wanted 1 bytes at offset 4"),
    ],
)
def test_update_decoding_is_strict(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError) as info:
        UpdateEnvelope.decode(data)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (_u32(1) + _text("k") + b"x" + _f64(1.0), "unknown config value tag b'x' for key 'k'"),
        (_u32(1) + _text("k") + b"I" + struct.pack(">q", 1), "unknown config value tag b'I'"),
        (_u32(1) + _text("k") + b"b" + b"\x01", "unknown config value tag b'b'"),
        (_u32(1) + _text("k") + b"f" + _f64(math.nan), "non-finite float"),
        (
            _u32(2) + _text("b") + b"i" + _u64(1) + _text("a") + b"i" + _u64(1),
            "map keys not strictly sorted at 'a'",
        ),
        (
            _u32(2) + _text("k") + b"i" + _u64(1) + _text("k") + b"s" + _text("x"),
            "map keys not strictly sorted at 'k'",
        ),
        (_u32(1) + _text("k") + b"s" + _u32(1) + b"\x80", "text is not valid UTF-8"),
        (_u32(1) + _text("k"), "truncated: wanted 1 bytes"),
    ],
)
def test_global_model_decoding_is_strict(config: bytes, message: str) -> None:
    assert GlobalModelEnvelope.decode(_global_bytes(_u32(0))).config == {}  # positive control
    with pytest.raises(DecodeError) as info:
        GlobalModelEnvelope.decode(_global_bytes(config))
    assert message in str(info.value)


def test_kinds_do_not_cross() -> None:
    with pytest.raises(DecodeError, match="expected envelope kind GLOBAL_MODEL, got 1"):
        GlobalModelEnvelope.decode(u1().encode())
    with pytest.raises(DecodeError, match="expected envelope kind UPDATE, got 2"):
        UpdateEnvelope.decode(g1().encode())


def test_version_is_checked_before_kind() -> None:
    body = bytearray(g1().encode())
    body[4] = 9
    with pytest.raises(DecodeError, match="unsupported envelope version 9"):
        UpdateEnvelope.decode(bytes(body))


@pytest.mark.parametrize("make", [u1, g1])
def test_every_truncation_is_rejected(make: Callable[[], UpdateEnvelope | GlobalModelEnvelope]) -> None:
    envelope = make()
    body = envelope.encode()
    assert type(envelope).decode(body) == envelope  # positive control
    for n in range(len(body)):
        with pytest.raises(DecodeError):
            type(envelope).decode(body[:n])


def test_reader_primitives_are_big_endian_and_strict() -> None:
    w = Writer().u8(1).u32(2).u64(3).i64(-4).f64(0.5).text("é").blob(b"\x00\x01").digest(bytes(32))
    data = w.getvalue()
    assert data[: 1 + 4 + 8 + 8] == bytes.fromhex("01000000020000000000000003fffffffffffffffc")
    r = Reader(data)
    got = (r.u8(), r.u32(), r.u64(), r.i64(), r.f64(), r.text(), r.blob(), r.digest())
    assert got == (1, 2, 3, -4, 0.5, "é", b"\x00\x01", bytes(32))
    r.finish()
    with pytest.raises(ValueError, match="does not fit in u32"):
        Writer().u32(2**32)
    with pytest.raises(ValueError, match="does not fit in u8"):
        Writer().u8(-1)
    with pytest.raises(ValueError, match="u64 needs an int, got bool"):
        Writer().u64(True)
    with pytest.raises(ValueError, match="a digest is 32 bytes, got 31"):
        Writer().digest(bytes(31))
    with pytest.raises(ValueError, match="text longer than 4096 bytes"):
        Writer().text("x" * 4097)
    with pytest.raises(ValueError, match="map keys must be non-empty text"):
        Writer().metrics({"": 1.0})
    with pytest.raises(DecodeError, match="blob of 1048577 bytes exceeds 1048576"):
        Reader(_u32(MAX_BLOB_BYTES + 1)).blob()


def test_writer_sorts_map_keys_by_utf8_bytes() -> None:
    data = Writer().metrics({"\U0001f600": 1.0, "\uff41": 2.0, "b": 3.0, "a": 4.0}).getvalue()
    r = Reader(data)
    assert list(r.metrics()) == ["a", "b", "\uff41", "\U0001f600"]
    r.finish()


# ---- signatures ----------------------------------------------------------------------------------


def test_update_signature_verifies_and_binds_every_byte() -> None:
    blob = sign_update(NODE, u1())
    NODE.public_key.verify(Domain.UPDATE, blob.body, blob.signature)
    for i in range(len(blob.body)):
        body = bytearray(blob.body)
        body[i] ^= 0x01
        with pytest.raises(SignatureError, match="does not verify for member 4f40b571c3f73a97"):
            NODE.public_key.verify(Domain.UPDATE, bytes(body), blob.signature)
    signature = bytearray(blob.signature)
    signature[0] ^= 0x80
    with pytest.raises(SignatureError):
        NODE.public_key.verify(Domain.UPDATE, blob.body, bytes(signature))
    with pytest.raises(SignatureError):
        NODE.public_key.verify(Domain.UPDATE, blob.body, blob.signature[:63])


def test_signatures_are_domain_separated() -> None:
    body = u1().encode()
    for signed_under in Domain:
        signature = NODE.sign(signed_under, body)
        for checked_under in Domain:
            if checked_under is signed_under:
                NODE.public_key.verify(checked_under, body, signature)
            else:
                with pytest.raises(SignatureError):
                    NODE.public_key.verify(checked_under, body, signature)


def test_signature_by_another_key_fails() -> None:
    blob = sign_update(NODE, u1())
    with pytest.raises(SignatureError, match="does not verify for member ffdbada96501388d"):
        COORDINATOR.public_key.verify(Domain.UPDATE, blob.body, blob.signature)
    with pytest.raises(ValueError, match="key ffdbada96501388d cannot sign for sender 4f40b571"):
        sign_update(COORDINATOR, u1())


def test_open_global_model_verifies_before_decoding() -> None:
    blob = sign_global_model(COORDINATOR, g1())
    assert open_global_model(blob, COORDINATOR.public_key) == g1()
    with pytest.raises(SignatureError):
        open_global_model(blob, NODE.public_key)
    with pytest.raises(SignatureError):  # garbage is not even parsed without a valid signature
        open_global_model(SignedBlob(b"garbage", blob.signature), COORDINATOR.public_key)
    update_signed_as_model = SignedBlob(u1().encode(), COORDINATOR.sign(Domain.GLOBAL_MODEL, u1().encode()))
    with pytest.raises(DecodeError, match="expected envelope kind GLOBAL_MODEL"):
        open_global_model(update_signed_as_model, COORDINATOR.public_key)
    update_blob = SignedBlob(g1().encode(), COORDINATOR.sign(Domain.UPDATE, g1().encode()))
    with pytest.raises(SignatureError):
        open_global_model(update_blob, COORDINATOR.public_key)


def test_signing_is_deterministic_and_keys_from_seed_are_stable() -> None:
    assert NODE.sign(Domain.UPDATE, b"m") == NODE.sign(Domain.UPDATE, b"m")
    assert SigningKey.from_seed(bytes(range(32))).public_key == NODE.public_key
    assert repr(NODE) == "SigningKey(member_id=4f40b571c3f73a97)"


def test_public_key_parsing() -> None:
    assert PublicKey.from_hex(NODE.public_key.hex()) == NODE.public_key
    with pytest.raises(ValueError, match="public key is not hex"):
        PublicKey.from_hex("zz" * 32)
    with pytest.raises(ValueError, match="an Ed25519 public key is 32 bytes, got 31"):
        PublicKey(bytes(31))


# ---- weak public keys (docs/PROTOCOL.md section 3.1) ---------------------------------------------

_P = 2**255 - 19
_D = -121665 * pow(121666, -1, _P) % _P
_L = 2**252 + 27742317777372353535851937790883648493  # order of the prime subgroup (RFC 8032)
_IDENTITY = (0, 1)


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    """Edwards addition on -x^2 + y^2 = 1 + d x^2 y^2 (affine; complete for Ed25519)."""
    (x1, y1), (x2, y2) = a, b
    t = _D * x1 * x2 * y1 * y2 % _P
    return ((x1 * y2 + x2 * y1) * pow(1 + t, -1, _P) % _P, (y1 * y2 + x1 * x2) * pow(1 - t, -1, _P) % _P)


def _mul(k: int, point: tuple[int, int]) -> tuple[int, int]:
    out = _IDENTITY
    while k:
        if k & 1:
            out = _add(out, point)
        point, k = _add(point, point), k >> 1
    return out


def _x_for(y: int) -> int | None:
    """An x with (x, y) on the curve (RFC 8032, 5.1.3), or None."""
    x2 = (y * y - 1) * pow(_D * y * y + 1, -1, _P) % _P
    x = pow(x2, (_P + 3) // 8, _P)
    if x * x % _P != x2:
        x = x * pow(2, (_P - 1) // 4, _P) % _P
    return x if x * x % _P == x2 else None


def _encode(point: tuple[int, int]) -> bytes:
    x, y = point
    return (y | (x & 1) << 255).to_bytes(32, "little")


def _order(point: tuple[int, int]) -> int:
    return next(k for k in (1, 2, 4, 8) if _mul(k, point) == _IDENTITY)


def torsion_points() -> list[tuple[int, int]]:
    """The 8 points of order dividing 8, derived from scratch: L*Q is in the torsion subgroup for every
    curve point Q, and generates it when it has order 8; the subgroup is then {k * T : k = 0..7}."""
    y = 2
    while True:
        x = _x_for(y)
        if x is not None and _order(t := _mul(_L, (x, y))) == 8:
            return [_mul(k, t) for k in range(8)]
        y += 1


def test_small_order_list_is_the_torsion_subgroup() -> None:
    points = torsion_points()
    assert sorted(_order(pt) for pt in points) == [1, 2, 4, 4, 8, 8, 8, 8]
    assert {_encode(pt) for pt in points} == SMALL_ORDER_KEYS
    assert _encode(_IDENTITY).hex() == "01" + "00" * 31
    base = (_x_for(4 * pow(5, -1, _P) % _P), 4 * pow(5, -1, _P) % _P)  # the base point B has y = 4/5
    assert base[0] is not None and _mul(_L, base) == _IDENTITY  # sanity: the curve arithmetic is right


def _non_canonical_small_order() -> list[bytes]:
    """Encodings of small-order points that are not canonical: y + p for y < 19, and x = -0."""
    out = []
    for key in SMALL_ORDER_KEYS:
        y = int.from_bytes(key, "little") & ((1 << 255) - 1)
        sign = key[31] & 0x80
        if y + _P < 1 << 255:
            raw = bytearray((y + _P).to_bytes(32, "little"))
            out += [bytes(raw[:31] + bytes([raw[31] | s])) for s in (0, 0x80)]
        if y in (1, _P - 1) and not sign:  # x = 0: the sign bit set is an invalid "-0"
            out.append(key[:31] + bytes([key[31] | 0x80]))
    return sorted(set(out))


def test_non_canonical_small_order_encodings() -> None:
    encodings = {k.hex() for k in _non_canonical_small_order()}
    assert encodings == {
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p     = 0 (order 4)
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p + 1 = 1 (identity)
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
        "0100000000000000000000000000000000000000000000000000000000000080",  # identity, x = -0
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",  # order 2, x = -0
    }


@pytest.mark.parametrize("raw", sorted(SMALL_ORDER_KEYS), ids=lambda k: k.hex()[:8] + ".." + k.hex()[-2:])
def test_small_order_keys_are_refused(raw: bytes) -> None:
    with pytest.raises(WeakKeyError) as info:
        PublicKey(raw)
    assert str(info.value) == (
        f"refused Ed25519 public key {raw.hex()}: small-order point (a signature under it can be forged)"
    )
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("raw", _non_canonical_small_order(), ids=lambda k: k.hex()[:4] + ".." + k.hex()[-2:])
def test_non_canonical_encodings_of_small_order_points_are_refused(raw: bytes) -> None:
    with pytest.raises(WeakKeyError, match=r"non-canonical encoding|small-order point"):
        PublicKey(raw)


@pytest.mark.parametrize("y", [_P, _P + 1, _P + 2, _P + 18, (1 << 255) - 1])
def test_non_canonical_y_is_refused(y: int) -> None:
    for sign in (0, 0x80):
        raw = bytearray(y.to_bytes(32, "little"))
        raw[31] |= sign
        with pytest.raises(WeakKeyError, match=r"non-canonical encoding \(y >= 2\^255 - 19\)"):
            PublicKey(bytes(raw))


def test_bytes_that_are_not_a_curve_point_are_refused() -> None:
    y = next(y for y in range(2, 100) if _x_for(y) is None)
    with pytest.raises(WeakKeyError, match="not a point on the curve"):
        PublicKey(y.to_bytes(32, "little"))


def test_real_keys_and_the_base_point_are_accepted() -> None:
    for key in (NODE, COORDINATOR, THIRD, SigningKey.generate()):
        assert PublicKey(key.public_key.raw) == key.public_key
    PublicKey(bytes.fromhex("5866666666666666666666666666666666666666666666666666666666666666"))  # B


def test_the_identity_key_really_accepts_a_forged_signature() -> None:
    # Why the refusal matters: the library verifies R = identity, S = 0 on any message under this key.
    identity = Ed25519PublicKey.from_public_bytes(bytes.fromhex("01" + "00" * 31))
    identity.verify(bytes.fromhex("01" + "00" * 63), b"weft/update/v1\x00any update")
    with pytest.raises(WeakKeyError):
        PublicKey(bytes.fromhex("01" + "00" * 31))


def _weak_key_pem(raw: bytes) -> bytes:
    return Ed25519PublicKey.from_public_bytes(raw).public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize(
    "raw",
    [bytes.fromhex("01" + "00" * 31), bytes.fromhex("ed" + "ff" * 30 + "7f"), bytes(32)],
    ids=["identity", "non-canonical-zero", "order-4"],
)
def test_weak_public_key_files_are_refused_naming_the_file(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "weak.pub"
    path.write_bytes(_weak_key_pem(raw))
    with pytest.raises(KeyFileError) as info:
        load_public_key(path)
    assert str(info.value).startswith(f"{path}: refused Ed25519 public key {raw.hex()}: ")


# ---- parameter digest ----------------------------------------------------------------------------


def test_digest_ignores_insertion_order() -> None:
    forward = p2()
    backward = dict(reversed(list(forward.items())))
    assert list(forward) != list(backward)
    assert params_digest(forward) == params_digest(backward)


def test_digest_ignores_byte_order_and_memory_layout() -> None:
    base = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}
    expected = params_digest(base)
    assert params_digest({"w": base["w"].astype(">f4")}) == expected
    assert params_digest({"w": np.asfortranarray(base["w"])}) == expected
    strided = np.zeros((3, 8), dtype=np.float32)
    strided[:, ::2] = base["w"]
    assert params_digest({"w": strided[:, ::2]}) == expected
    assert params_digest({"w": np.float32(3.25)}) == params_digest({"w": np.array(3.25, dtype=np.float32)})


def _variants() -> dict[str, dict[str, np.ndarray]]:
    """P1 and variations of it that differ in exactly one respect."""
    weight, bias = p1()["layer.weight"], p1()["layer.bias"]
    nudged = bias.copy()
    nudged[1] = np.nextafter(nudged[1], np.float32(0))  # one ulp
    return {
        "base": p1(),
        "name": {"layer.weight": weight, "layer.biaz": bias},
        "dtype": {"layer.weight": weight, "layer.bias": bias.astype(np.float64)},
        "shape": {"layer.weight": weight.reshape(3, 2), "layer.bias": bias},
        "flat": {"layer.weight": weight.reshape(6), "layer.bias": bias},
        "value": {"layer.weight": weight, "layer.bias": nudged},
        "zero": {"layer.weight": weight, "layer.bias": np.array([0.0, -1.0], np.float32)},
        "negative-zero": {"layer.weight": weight, "layer.bias": np.array([-0.0, -1.0], np.float32)},
        "extra": {**p1(), "extra": np.zeros(1, dtype=np.int8)},
        "missing": {"layer.weight": weight},
        "empty": {},
    }


def test_digest_changes_with_name_dtype_shape_and_value() -> None:
    digests = {label: params_digest(arrays) for label, arrays in _variants().items()}
    assert len(set(digests.values())) == len(digests), digests


@pytest.mark.parametrize(
    ("array", "dtype_name"),
    [
        (np.zeros(2, dtype=np.complex64), "complex64"),
        (np.array([1, "x"], dtype=object), "object"),
        (np.array(["ab"]), "str64"),
        (np.zeros(2, dtype="datetime64[s]"), "datetime64[s]"),
        (np.zeros(2, dtype=np.uint16), "uint16"),
        (np.zeros(2, dtype=np.float128) if hasattr(np, "float128") else None, "float128"),
    ],
)
def test_digest_refuses_unsupported_dtypes(array: np.ndarray | None, dtype_name: str) -> None:
    if array is None:
        pytest.skip("no float128 on this platform")
    with pytest.raises(ValueError) as info:
        params_digest({"x": array})
    assert str(info.value) == f"array 'x' has unsupported dtype {dtype_name}"


def test_digest_refuses_bad_names() -> None:
    params_digest({"n" * 512: np.zeros(1)})  # the longest allowed name
    for name in ("", "n" * 513, "é" * 257):
        with pytest.raises(ValueError, match="must be non-empty text of at most 512 bytes"):
            params_digest({name: np.zeros(1)})


def test_every_documented_dtype_is_digestible() -> None:
    arrays = {name: np.zeros(2, dtype=name) for name in DTYPES}
    assert len(params_digest(arrays)) == 32
    assert blake3.blake3(_digest_preimage(arrays)).digest() == params_digest(arrays)


def test_digest_of_zero_size_matrix() -> None:
    arrays = {"w": np.zeros((0, 3), dtype=np.float32)}
    assert params_digest(arrays) == blake3.blake3(_digest_preimage(arrays)).digest()


def test_large_digests_hashed_on_several_threads_equal_the_plain_hash() -> None:
    arrays = {"big": np.arange(1 << 20, dtype=np.float32), "small": np.ones(3, dtype=np.int64)}  # 4 MiB: threaded
    assert params_digest(arrays) == blake3.blake3(_digest_preimage(arrays)).digest()


def test_structure() -> None:
    spec = structure(p1())
    assert spec == {
        "layer.weight": ArraySpec("float32", (2, 3)),
        "layer.bias": ArraySpec("float32", (2,)),
    }
    assert str(spec["layer.weight"]) == "float32[2, 3]"


# ---- key files -----------------------------------------------------------------------------------


def test_signing_key_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "node.key"
    save_signing_key(NODE, path)
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = load_signing_key(path)
    assert loaded.public_key == NODE.public_key
    assert loaded.sign(Domain.UPDATE, b"m") == NODE.sign(Domain.UPDATE, b"m")


def test_signing_key_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    save_signing_key(NODE, path)
    before = path.read_bytes()
    with pytest.raises(KeyFileError) as info:
        save_signing_key(COORDINATOR, path)
    assert str(info.value) == f"{path} already exists; refusing to overwrite a key"
    assert path.read_bytes() == before


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o601])
def test_signing_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "node.key"
    save_signing_key(NODE, path)
    path.chmod(mode)
    with pytest.raises(KeyFileError) as info:
        load_signing_key(path)
    assert f"fix with: chmod 600 {path}" in str(info.value)
    assert f"(mode {oct(mode)})" in str(info.value)
    path.chmod(0o600)
    assert load_signing_key(path).public_key == NODE.public_key


def test_missing_key_files_point_at_keygen(tmp_path: Path) -> None:
    path = tmp_path / "absent.key"
    with pytest.raises(KeyFileError) as info:
        load_signing_key(path)
    assert str(info.value) == (f"private key file {path} does not exist; create one with `weft keygen`")
    with pytest.raises(KeyFileError) as info:
        load_public_key(path)
    assert str(info.value) == f"public key file {path} does not exist; create one with `weft keygen`"


def test_public_key_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "pub" / "node.pub"
    save_public_key(NODE.public_key, path)
    assert path.read_text().startswith("-----BEGIN PUBLIC KEY-----\n")
    assert load_public_key(path) == NODE.public_key


def test_key_files_of_the_wrong_kind_are_refused(tmp_path: Path) -> None:
    public = tmp_path / "node.pub"
    save_public_key(NODE.public_key, public)
    public.chmod(0o600)
    with pytest.raises(KeyFileError, match="is not an unencrypted PEM private key"):
        load_signing_key(public)
    private = tmp_path / "node.key"
    save_signing_key(NODE, private)
    with pytest.raises(KeyFileError, match="is not a PEM public key"):
        load_public_key(private)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_path = tmp_path / "ec.key"
    ec_path.write_bytes(ec_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    ec_path.chmod(0o600)
    with pytest.raises(KeyFileError, match="weft needs an Ed25519 key"):
        load_signing_key(ec_path)


# ---- manifest (format and strict parsing; signing, versions and edits: tests/unit/test_manifest.py) ---------


def _manifest_doc() -> dict:
    return json.loads(m2().to_json())


def _load(doc: object) -> Manifest:
    return Manifest.from_json(json.dumps(doc))


def test_manifest_round_trip(tmp_path: Path) -> None:
    manifest = m2()
    assert Manifest.from_json(manifest.to_json()) == manifest
    path = tmp_path / "fed" / "manifest.json"
    assert manifest.save(path) == manifest
    loaded = Manifest.load(path, coordinator_key=COORDINATOR.public_key)
    assert loaded == manifest
    assert path.read_text() == manifest.to_json()
    assert loaded.get(THIRD.member_id) == Member("clinic-b", THIRD.public_key, "FR", 800, Status.SUSPENDED)
    assert loaded.get(COORDINATOR.member_id) is None
    assert len(loaded) == 2
    assert sorted(loaded.by_id) == sorted([NODE.member_id, THIRD.member_id])
    assert [m.name for m in loaded.active] == ["hospital-a"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["manifest.json"]  # no temporary file left


def test_manifest_accepts_uppercase_keys_and_writes_lowercase() -> None:
    doc = _manifest_doc()
    doc["members"][0]["public_key"] = doc["members"][0]["public_key"].upper()
    assert _load(doc).to_json() == m2().to_json()  # the signature covers the values, not the file's spelling


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(extra=1), "manifest: unknown field(s) ['extra']"),
        (lambda d: d["coordinator"].update(name="c"), "manifest: coordinator: unknown field(s)"),
        (
            lambda d: d["members"][1].update(email="x@example.org"),
            "manifest: members[1]: unknown field(s) ['email']",
        ),
        (lambda d: d.pop("federation_id"), "manifest: missing field(s) ['federation_id']"),
        (lambda d: d.pop("version"), "manifest: missing field(s) ['version']"),
        (
            lambda d: d["members"][0].pop("jurisdiction"),
            "manifest: members[0]: missing field(s) ['jurisdiction']",
        ),
        (
            lambda d: d["members"][0].pop("status"),
            "manifest: members[0]: missing field(s) ['status']",
        ),
        (
            lambda d: d.update(format="weft-manifest/v3"),
            "manifest: format must be 'weft-manifest/v2', got 'weft-manifest/v3'",
        ),
        (lambda d: d.update(members={}), "manifest: members must be a list"),
        (lambda d: d.update(federation_id=""), "manifest: federation_id: '' is not a valid federation id"),
        (lambda d: d.update(federation_id="bad id!"), "manifest: federation_id: 'bad id!' is not a valid"),
        (lambda d: d["members"][0].update(name=7), "manifest: members[0].name: 7 is not a valid name"),
        (
            lambda d: d["members"][0].update(jurisdiction=""),
            "manifest: members[0] 'clinic-b'.jurisdiction: '' is not a valid jurisdiction",
        ),
        (
            lambda d: d["members"][0].update(status="paused"),
            "manifest: members[0] 'clinic-b'.status: 'paused' is not one of active, suspended, revoked",
        ),
        (
            lambda d: d["members"][1].update(flower_auth_key="ssh-ed25519 AAAA"),
            "manifest: members[1] 'hospital-a'.flower_auth_key: not an OpenSSH public key",
        ),
        (
            lambda d: d["members"][1].update(flower_auth_key=d["members"][1]["flower_auth_key"] + " comment"),
            "manifest: members[1] 'hospital-a'.flower_auth_key: must be written as 'TYPE BASE64'",
        ),
        (
            lambda d: d["coordinator"].update(public_key="00" * 31),
            "manifest: coordinator.public_key: an Ed25519 public key is 32 bytes, got 31",
        ),
        (
            lambda d: d["members"][0].update(public_key=None),
            "manifest: members[0] 'clinic-b'.public_key: must be 64 hex digits",
        ),
        (lambda d: d.update(version=0), "manifest: version: must be an integer from 1 to 2^53 - 1, got 0"),
        (lambda d: d.update(version=2**53), "manifest: version: must be an integer from 1 to 2^53 - 1"),
        (lambda d: d.update(version="2"), "manifest: version: must be an integer from 1 to 2^53 - 1, got '2'"),
        (lambda d: d.update(signature="00" * 63), "manifest: signature must be 128 hex digits"),
        (lambda d: d.update(signature="zz" * 64), "manifest: signature must be 128 hex digits"),
    ],
)
def test_manifest_refuses_malformed_documents(edit: Callable[[dict], object], message: str) -> None:
    doc = _manifest_doc()
    _load(doc)  # positive control
    edit(doc)
    with pytest.raises(ManifestError) as info:
        _load(doc)
    assert message in str(info.value)


def test_manifest_refuses_a_member_id_that_is_not_the_fingerprint() -> None:
    doc = _manifest_doc()
    doc["members"][1]["member_id"] = THIRD.member_id  # members[1] is hospital-a (node key)
    with pytest.raises(ManifestError) as info:
        _load(doc)
    assert str(info.value) == (
        f"manifest: members[1] 'hospital-a'.member_id '{THIRD.member_id}' is not the fingerprint of its "
        f"public_key (expected {NODE.member_id})"
    )


def test_manifest_refuses_the_same_key_or_name_twice() -> None:
    doc = _manifest_doc()
    doc["members"].append({**doc["members"][0], "name": "copy"})
    with pytest.raises(ManifestError) as info:
        _load(doc)
    assert str(info.value) == "manifest: members: the same public key appears twice"
    with pytest.raises(ManifestError, match="the same public key appears twice"):
        Manifest("f", COORDINATOR.public_key, (m2().members[0], m2().members[0]))
    with pytest.raises(ManifestError, match=r"^members: name 'a' is used by two members$"):
        Manifest(
            "f", COORDINATOR.public_key, (Member("a", NODE.public_key, "DE", 1), Member("a", THIRD.public_key, "FR", 1))
        )
    with pytest.raises(ManifestError, match=r"^members: member 'c' uses the coordinator key$"):
        Manifest("f", COORDINATOR.public_key, (Member("c", COORDINATOR.public_key, "DE", 1),))


@pytest.mark.parametrize("value", [0, -1, True, False, 5.0, "5", None, 2**53])
def test_manifest_refuses_bad_max_examples(value: object) -> None:
    doc = _manifest_doc()
    doc["members"][0]["max_examples"] = value
    with pytest.raises(ManifestError) as info:
        _load(doc)
    assert str(info.value) == (
        f"manifest: members[0] 'clinic-b'.max_examples: must be an integer from 1 to 2^53 - 1, got {value!r}"
    )


def test_manifest_refuses_nan_and_infinity_literals() -> None:
    text = m2().to_json().replace('"max_examples": 800', '"max_examples": NaN')
    with pytest.raises(ManifestError, match="NaN is not a JSON value"):
        Manifest.from_json(text)


def test_manifest_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    with pytest.raises(ManifestError, match=f"manifest file {re.escape(str(path))} does not exist"):
        Manifest.load(path)
    path.write_text("{not json")
    with pytest.raises(ManifestError, match=f"^{re.escape(str(path))}: not valid JSON"):
        Manifest.load(path)
    path.write_text("[]")
    with pytest.raises(ManifestError, match=f"^{re.escape(str(path))}: expected an object$"):
        Manifest.load(path)


def test_manifest_refuses_duplicate_json_keys() -> None:
    text = m2().to_json().replace('"format"', '"federation_id": "other",\n  "format"', 1)
    with pytest.raises(ManifestError, match="repeated field"):
        Manifest.from_json(text)


# ---- signed model file ---------------------------------------------------------------------------


def _write_model(path: Path, arrays: dict[str, np.ndarray] | None = None) -> SignedBlob:
    arrays = p1() if arrays is None else arrays
    envelope = GlobalModelEnvelope("fed-demo", "run-0001", 1, params_digest(arrays), "digits")
    blob = sign_global_model(COORDINATOR, envelope)
    write_signed_model(path, arrays, blob)
    return blob


def _rewrite(path: Path, edit: Callable[[dict[str, np.ndarray]], object]) -> None:
    with np.load(path) as npz:
        entries = {name: npz[name] for name in npz.files}
    edit(entries)
    with path.open("wb") as fh:
        np.savez(fh, **entries)


def test_model_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "models" / "global.npz"
    blob = _write_model(path, p2())
    model = read_signed_model(path, COORDINATOR.public_key)
    assert model.envelope == GlobalModelEnvelope.decode(blob.body)
    assert sorted(model.arrays) == sorted(p2())
    for name, array in p2().items():
        assert model.arrays[name].dtype == array.dtype
        assert model.arrays[name].shape == array.shape
        np.testing.assert_array_equal(model.arrays[name], array)
    assert sorted(p.name for p in path.parent.iterdir()) == ["global.npz"]  # no temp file left
    with np.load(path) as npz:
        assert sorted(npz.files) == sorted([*p2(), "__weft__.envelope", "__weft__.signature"])
        assert npz["__weft__.envelope"].tobytes() == blob.body
        assert npz["__weft__.signature"].tobytes() == blob.signature


def test_model_file_takes_any_parameter_name(tmp_path: Path) -> None:
    arrays = {
        "file": np.ones(2, dtype=np.float32),
        "allow_pickle": np.zeros(1, dtype=np.int64),
        "with space/and.dots": np.ones(1, dtype=np.float16),
    }
    path = tmp_path / "global.npz"
    _write_model(path, arrays)
    with zipfile.ZipFile(path) as zf:
        names = [*arrays, "__weft__.envelope", "__weft__.signature"]
        assert sorted(zf.namelist()) == sorted(f"{name}.npy" for name in names)
        assert {info.compress_type for info in zf.infolist()} == {zipfile.ZIP_STORED}
    model = read_signed_model(path, COORDINATOR.public_key)
    assert sorted(model.arrays) == sorted(arrays)


@pytest.mark.parametrize(
    "edit",
    [
        lambda e: e.__setitem__("layer.bias", np.array([0.5, -2.0], dtype=np.float32)),
        lambda e: e.__setitem__("layer.bias", e["layer.bias"].astype(np.float64)),
        lambda e: e.__setitem__("extra", np.zeros(1, dtype=np.float32)),
        lambda e: e.pop("layer.weight"),
    ],
    ids=["value", "dtype", "extra", "missing"],
)
def test_tampered_model_file_is_refused(tmp_path: Path, edit: Callable[..., object]) -> None:
    path = tmp_path / "global.npz"
    _write_model(path)
    _rewrite(path, lambda e: None)
    read_signed_model(path, COORDINATOR.public_key)  # positive control: rewriting alone is fine
    _rewrite(path, edit)
    with pytest.raises(DecodeError) as info:
        read_signed_model(path, COORDINATOR.public_key)
    assert str(info.value) == f"{path}: arrays do not match the signed model digest"


def test_model_file_under_another_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "global.npz"
    _write_model(path)
    with pytest.raises(SignatureError):
        read_signed_model(path, NODE.public_key)


def test_model_file_with_a_tampered_envelope_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "global.npz"
    _write_model(path)

    def bump_round(entries: dict[str, np.ndarray]) -> None:
        body = bytearray(entries["__weft__.envelope"].tobytes())
        body[33] ^= 0x01  # the low byte of `round`
        entries["__weft__.envelope"] = np.frombuffer(bytes(body), dtype=np.uint8)

    _rewrite(path, bump_round)
    with pytest.raises(SignatureError):
        read_signed_model(path, COORDINATOR.public_key)


def test_model_file_without_an_envelope_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.npz"
    np.savez(path, **p1())
    with pytest.raises(DecodeError) as info:
        read_signed_model(path, COORDINATOR.public_key)
    assert str(info.value) == f"{path} carries no signed envelope"


def test_model_file_never_unpickles(tmp_path: Path) -> None:
    path = tmp_path / "global.npz"
    _write_model(path)
    _rewrite(path, lambda e: e.__setitem__("evil", np.array([1, "x"], dtype=object)))
    with pytest.raises(DecodeError, match="is not a weft model file: Object arrays cannot be"):
        read_signed_model(path, COORDINATOR.public_key)


def test_model_file_refuses_reserved_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"uses the reserved prefix __weft__\."):
        write_signed_model(tmp_path / "m.npz", {"__weft__.x": np.zeros(1)}, SignedBlob(b"b", b"s"))
    assert not (tmp_path / "m.npz").exists()


def test_model_file_that_is_not_an_archive_is_a_decode_error(tmp_path: Path) -> None:
    path = tmp_path / "model.npz"
    np.save(path.with_suffix(".npy"), np.zeros(3))
    path.with_suffix(".npy").rename(path)
    with pytest.raises(DecodeError):
        read_signed_model(path, COORDINATOR.public_key)


def test_model_file_with_an_added_exotic_array_is_a_decode_error(tmp_path: Path) -> None:
    from protocols.npz import load_npz, save_npz

    path = tmp_path / "global.npz"
    _write_model(path, p2())
    entries = load_npz(path)
    entries["extra"] = np.zeros(2, dtype=np.complex64)  # no weft model holds complex arrays
    save_npz(path, entries)
    with pytest.raises(DecodeError, match="unsupported dtype complex64"):
        read_signed_model(path, COORDINATOR.public_key)
