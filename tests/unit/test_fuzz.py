"""Property-based tests: every decoder a user or a peer can feed either succeeds or raises its documented error.

Random bytes and mutations of valid encodings (bit flips, truncations, insertions, appended bytes, random JSON)
go to the envelope decoders, the manifest loader, the key-file loaders and the signed model file reader. Each
must return a value or raise `protocols`' error family (DecodeError / ManifestError / KeyFileError /
SignatureError), never another exception, and never hang. No example database is written (`database=None`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import (
    EvaluationEnvelope,
    GlobalModelEnvelope,
    KeyFileError,
    Manifest,
    ManifestError,
    Member,
    ProtocolError,
    SignedBlob,
    SigningKey,
    Status,
    UpdateEnvelope,
    create_flower_auth_key,
    load_flower_auth_public_key,
    load_public_key,
    load_signing_key,
    open_global_model,
    params_digest,
    read_signed_model,
    save_public_key,
    save_signing_key,
    sign_evaluation,
    sign_global_model,
    sign_update,
    write_signed_model,
)
from protocols.errors import DecodeError, ManifestDecodeError
from protocols.npz import load_npz

COORDINATOR = SigningKey.from_seed(bytes([1]) * 32)
NODE = SigningKey.from_seed(bytes([2]) * 32)
OTHER = SigningKey.from_seed(bytes([3]) * 32)
DIGEST_A = bytes(range(32))
DIGEST_B = bytes(range(32, 64))

SCALE = int(os.environ.get("WEFT_FUZZ_SCALE", "1"))
"""Multiplies every example count (WEFT_FUZZ_SCALE=50: a long hunt); 1 keeps the file to seconds."""
FAST = settings(
    max_examples=500 * SCALE, deadline=5000, database=None, suppress_health_check=[HealthCheck.too_slow]
)  # fmt: skip
SLOW = settings(
    max_examples=150 * SCALE, deadline=10_000, database=None, suppress_health_check=[HealthCheck.too_slow]
)  # fmt: skip
"""For properties that touch files (key files, model files): fewer examples, so the file runs in seconds."""


# ---- mutations ---------------------------------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """`valid` with 1-4 random edits: bit flips, byte overwrites, truncations, insertions, deletions, appends."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "append"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        else:
            data += draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


def bytes_from(valid: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes, and (mostly) mutations of `valid`."""
    return st.one_of(st.binary(max_size=256), mutated(valid), mutated(valid), mutated(valid))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


# ---- envelopes ---------------------------------------------------------------------------------------------

UPDATE = UpdateEnvelope(
    federation_id="fed-a",
    run_id="run-1",
    round=3,
    sender=NODE.member_id,
    base_digest=DIGEST_A,
    update_digest=DIGEST_B,
    num_examples=120,
    metrics={"train_loss": 0.25, "train_accuracy": 0.875},
)
GLOBAL = GlobalModelEnvelope(
    federation_id="fed-a",
    run_id="run-1",
    round=2,
    model_digest=DIGEST_A,
    task="digits",
    config={"local_epochs": 2, "learning_rate": 0.05, "optimizer": "sgd"},
)
EVALUATION = EvaluationEnvelope(
    federation_id="fed-a",
    run_id="run-1",
    round=2,
    sender=NODE.member_id,
    model_digest=DIGEST_A,
    num_examples=40,
    metrics={"eval_loss": 0.5},
)
UPDATE_BLOB = sign_update(NODE, UPDATE)
GLOBAL_BLOB = sign_global_model(COORDINATOR, GLOBAL)
EVALUATION_BLOB = sign_evaluation(NODE, EVALUATION)


@pytest.mark.parametrize(
    ("decode", "valid"),
    [
        (UpdateEnvelope.decode, UPDATE_BLOB.body),
        (GlobalModelEnvelope.decode, GLOBAL_BLOB.body),
        (EvaluationEnvelope.decode, EVALUATION_BLOB.body),
    ],
    ids=["update", "global-model", "evaluation"],
)
def test_envelope_decoders_raise_only_decode_error(decode: Callable[[bytes], object], valid: bytes) -> None:
    assert decode(valid) is not None  # the valid encoding round-trips

    @FAST
    @given(data=bytes_from(valid))
    def check(data: bytes) -> None:
        try:
            envelope = decode(data)
        except DecodeError:
            return
        assert envelope.encode() == data  # type: ignore[attr-defined]  # canonical: what decodes re-encodes as is

    check()


@FAST
@given(body=bytes_from(GLOBAL_BLOB.body), signature=st.one_of(st.just(GLOBAL_BLOB.signature), st.binary(max_size=80)))
def test_open_global_model_raises_only_protocol_errors(body: bytes, signature: bytes) -> None:
    try:
        envelope = open_global_model(SignedBlob(body, signature), COORDINATOR.public_key)
    except ProtocolError:
        return
    assert envelope.encode() == body


# ---- manifest ----------------------------------------------------------------------------------------------


def _valid_manifest() -> Manifest:
    member = Member("hospital-a", NODE.public_key, "DE", 1000)
    other = Member("hospital-b", OTHER.public_key, "FR", 50, status=Status.SUSPENDED)
    return Manifest("fed-a", COORDINATOR.public_key, (member, other), version=3).sign(COORDINATOR)


MANIFEST_TEXT = _valid_manifest().to_json()
MANIFEST_DOC = json.loads(MANIFEST_TEXT)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path to a value inside the JSON document `doc`."""
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from _paths(value, (*prefix, index))


MANIFEST_PATHS = list(_paths(MANIFEST_DOC))[1:]


def _replaced(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    doc = json.loads(json.dumps(doc))
    target = doc
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return doc


@st.composite
def manifest_documents(draw: st.DrawFn) -> bytes:
    """A valid manifest with one value replaced by random JSON (or one field removed / added)."""
    path = draw(st.sampled_from(MANIFEST_PATHS))
    edit = draw(st.sampled_from(["replace", "remove", "add"]))
    if edit == "replace":
        doc = _replaced(MANIFEST_DOC, path, draw(JSON))
    else:
        doc = json.loads(MANIFEST_TEXT)
        target = doc
        for step in path[:-1]:
            target = target[step]
        if edit == "remove":
            del target[path[-1]]
        elif isinstance(target, dict):
            target[draw(st.text(max_size=10))] = draw(JSON)
        else:
            target.append(draw(JSON))
    return json.dumps(doc).encode()


def test_the_valid_manifest_loads() -> None:
    assert Manifest.from_bytes(MANIFEST_TEXT.encode(), coordinator_key=COORDINATOR.public_key).version == 3


@FAST
@given(
    data=st.one_of(
        bytes_from(MANIFEST_TEXT.encode()),
        manifest_documents(),
        JSON.map(lambda doc: json.dumps(doc).encode()),
        st.text(max_size=200).map(str.encode),
    )
)
def test_manifest_loader_raises_only_manifest_errors(data: bytes) -> None:
    try:
        manifest = Manifest.from_bytes(data, source="fuzzed.json")
    except ManifestError as exc:
        assert str(exc).startswith("fuzzed.json") or "manifest" in str(exc), str(exc)
        return
    assert manifest.signature is not None  # only a signed manifest that verifies loads


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b"{" * 100_000, "not valid JSON"),
        (b"1" * 5000, "not a valid manifest"),
        (b"hello", "not valid JSON"),
        (b"[1, 2]", "expected an object"),
    ],
    ids=["not-utf8", "deep", "deep-open", "huge-integer", "not-json", "list"],
)
def test_manifest_bytes_that_are_no_manifest_raise_decode_error(data: bytes, what: str) -> None:
    with pytest.raises(ManifestDecodeError, match=what) as info:
        Manifest.from_bytes(data, source="m.json")
    assert isinstance(info.value, DecodeError) and isinstance(info.value, ManifestError)
    assert str(info.value).startswith("m.json: ")


# ---- key files ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-keys")


def _pem(save: Callable[[Path], None], folder: Path, name: str) -> bytes:
    path = folder / name
    save(path)
    return path.read_bytes()


@SLOW
@given(data=st.data())
def test_key_loaders_raise_only_key_file_errors(key_dir: Path, data: st.DataObject) -> None:
    private = _cached(key_dir, "valid.key", lambda p: save_signing_key(NODE, p))
    public = _cached(key_dir, "valid.pub", lambda p: save_public_key(NODE.public_key, p))
    flower = _cached(key_dir, "valid.flower.pub", lambda p: create_flower_auth_key(p.with_suffix(".key"), p))
    for load, valid in ((load_signing_key, private), (load_public_key, public), (load_flower_auth_public_key, flower)):
        fuzzed = data.draw(bytes_from(valid))
        path = key_dir / "fuzzed"
        path.write_bytes(fuzzed)
        path.chmod(0o600)
        try:
            load(path)
        except KeyFileError as exc:
            assert str(path) in str(exc), str(exc)


_CACHE: dict[str, bytes] = {}


def _cached(folder: Path, name: str, save: Callable[[Path], object]) -> bytes:
    if name not in _CACHE:
        save(folder / name)
        _CACHE[name] = (folder / name).read_bytes()
    return _CACHE[name]


# ---- signed model files ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    arrays = {"0.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "0.bias": np.zeros(2, dtype=np.float32)}
    envelope = GlobalModelEnvelope("fed-a", "run-1", 3, params_digest(arrays), "digits", {"local_epochs": 1})
    path = tmp_path_factory.mktemp("fuzz-model") / "global_model.npz"
    write_signed_model(path, arrays, sign_global_model(COORDINATOR, envelope))
    assert read_signed_model(path, COORDINATOR.public_key).envelope == envelope
    return path.read_bytes()


@st.composite
def npz_entries_replaced(draw: st.DrawFn, valid: bytes) -> bytes:
    """The valid model file with one entry replaced by a random small array (any dtype and shape)."""
    with zipfile.ZipFile(io.BytesIO(valid)) as zf:
        names = zf.namelist()
        entries = {name: zf.read(name) for name in names}
    name = draw(st.sampled_from(names))
    dtype = draw(st.sampled_from(["u1", "<f8", "<f4", "<i8", "?", "<U3", "<c8", "V4"]))
    shape = draw(st.sampled_from([(), (0,), (3,), (64,), (2, 2), (8, 8), (1, 1, 1)]))
    array = np.zeros(shape, dtype=dtype)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=False)
    entries[name] = buf.getvalue()
    if draw(st.booleans()):
        del entries[draw(st.sampled_from(names))]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        for entry, raw in entries.items():
            zf.writestr(entry, raw)
    return out.getvalue()


@SLOW
@given(data=st.data())
def test_signed_model_reader_raises_only_protocol_errors(
    tmp_path_factory: pytest.TempPathFactory, model_bytes: bytes, data: st.DataObject
) -> None:
    fuzzed = data.draw(st.one_of(bytes_from(model_bytes), npz_entries_replaced(model_bytes)))
    path = _scratch(tmp_path_factory) / "fuzzed.npz"
    path.write_bytes(fuzzed)
    try:
        model = read_signed_model(path, COORDINATOR.public_key)
    except ProtocolError as exc:
        assert str(path) in str(exc) or "signature" in str(exc), str(exc)
        return
    assert model.envelope.model_digest == params_digest(model.arrays)


@SLOW
@given(data=st.data())
def test_load_npz_raises_only_read_errors(
    tmp_path_factory: pytest.TempPathFactory, model_bytes: bytes, data: st.DataObject
) -> None:
    """`load_npz` turns whatever a damaged archive makes zipfile or numpy raise (BadZipFile, an unknown compression
    method's NotImplementedError, an encrypted entry's RuntimeError, ...) into DecodeError; only OSError passes."""
    path = _scratch(tmp_path_factory) / "fuzzed-plain.npz"
    path.write_bytes(data.draw(bytes_from(model_bytes)))
    with contextlib.suppress(DecodeError, OSError):
        load_npz(path)


_SCRATCH: list[Path] = []


def _scratch(factory: pytest.TempPathFactory) -> Path:
    if not _SCRATCH:
        _SCRATCH.append(factory.mktemp("fuzz-scratch"))
    return _SCRATCH[0]


# ---- ledger lines ----------------------------------------------------------------------------------------

LEDGER_LINE = __import__("protocols.ledger", fromlist=["encode_entry"]).encode_entry(
    {"ledger": 1, "seq": 0, "prev": "0" * 64, "kind": "start", "federation_id": "fed-a", "run_id": "run-1",
     "task": "digits", "rounds": 3, "rule": {"rule": "fedavg"}},
    COORDINATOR,
)  # fmt: skip


def test_the_valid_ledger_line_decodes() -> None:
    from protocols.ledger import decode_line

    assert decode_line(LEDGER_LINE, 1).kind == "start"


@FAST
@given(data=bytes_from(LEDGER_LINE))
def test_ledger_line_decoder_raises_only_decode_error(data: bytes) -> None:
    from protocols.ledger import decode_line

    with contextlib.suppress(DecodeError):
        decode_line(data, 1)


@FAST
@given(doc=JSON)
def test_ledger_lines_of_random_json_raise_decode_error(doc: Any) -> None:
    from protocols.ledger import decode_line

    with contextlib.suppress(DecodeError):
        decode_line(json.dumps({"body": doc, "signature": "00" * 64}).encode(), 1)


@SLOW
@given(data=st.data())
def test_the_audit_never_crashes_on_a_fuzzed_ledger(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    from protocols.audit import verify_run

    folder = _scratch(tmp_path_factory) / "audit"
    folder.mkdir(exist_ok=True)
    lines = data.draw(st.lists(bytes_from(LEDGER_LINE), min_size=1, max_size=3))
    (folder / "ledger.jsonl").write_bytes(b"\n".join(lines) + data.draw(st.sampled_from([b"\n", b""])))
    verdict = verify_run(folder)  # a verdict, never an exception
    assert isinstance(verdict.problems, list)
