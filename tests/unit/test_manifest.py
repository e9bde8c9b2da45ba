"""protocols.manifest: the signed, versioned manifest (docs/PROTOCOL.md section 7).

Signing over the canonical body, pinning the trusted coordinator key, tampering, versions that only
grow, member status (revocation is final), weak member keys named in the error, the v1 refusal.
Format details and strict parsing are in tests/unit/test_protocols.py, next to the document's vectors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from protocols import (
    Domain,
    Manifest,
    ManifestError,
    Member,
    PublicKey,
    SigningKey,
    Status,
    check_successor,
)
from protocols.identity import SMALL_ORDER_KEYS

COORDINATOR = SigningKey.from_seed(bytes(range(32, 64)))
OTHER_COORDINATOR = SigningKey.from_seed(bytes([5]) * 32)
A = SigningKey.from_seed(bytes([11]) * 32)
B = SigningKey.from_seed(bytes([12]) * 32)
C = SigningKey.from_seed(bytes([13]) * 32)


def unsigned(*members: Member, version: int = 1, key: SigningKey = COORDINATOR) -> Manifest:
    return Manifest("fed-a", key.public_key, members, version=version)


def two_members() -> Manifest:
    return unsigned(Member("a", A.public_key, "DE", 10), Member("b", B.public_key, "FR", 20)).sign(COORDINATOR)


# ---- in memory --------------------------------------------------------------------------------------


def test_in_memory_manifest_needs_no_signature() -> None:
    manifest = unsigned(Member("a", A.public_key, "DE", 10))
    assert (manifest.version, manifest.signature) == (1, None)
    assert manifest.get(A.member_id) == Member("a", A.public_key, "DE", 10, Status.ACTIVE, "")
    assert manifest.get(A.member_id).active  # type: ignore[union-attr]


def test_by_id_is_built_once() -> None:
    manifest = two_members()
    assert manifest.by_id is manifest.by_id
    assert dict(manifest.by_id) == {A.member_id: manifest.find("a"), B.member_id: manifest.find("b")}
    with pytest.raises(TypeError):
        manifest.by_id[C.member_id] = manifest.members[0]  # type: ignore[index]
    assert "_by_id" not in repr(manifest)


def test_members_are_kept_sorted_by_member_id() -> None:
    one = unsigned(Member("a", A.public_key, "DE", 10), Member("b", B.public_key, "FR", 20))
    other = unsigned(Member("b", B.public_key, "FR", 20), Member("a", A.public_key, "DE", 10))
    assert one == other
    assert [m.member_id for m in one] == sorted([A.member_id, B.member_id])


def test_find_by_name_or_id() -> None:
    manifest = two_members()
    assert manifest.find("a") == manifest.find(A.member_id) == manifest.get(A.member_id)
    with pytest.raises(ManifestError, match=r"^member: no member named 'zz' or with that id in this manifest$"):
        manifest.find("zz")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Member("", A.public_key, "DE", 1), "name: '' is not a valid name (1-128 characters of"),
        (lambda: Member("a b", A.public_key, "DE", 1), "name: 'a b' is not a valid name"),
        (lambda: Member("a", A.public_key, "", 1), "jurisdiction: '' is not a valid jurisdiction"),
        (lambda: Member("a", A.public_key, "DE", 0), "max_examples: must be an integer from 1 to 2^53 - 1, got 0"),
        (lambda: Member("a", A.public_key, "DE", 1, "gone"), "status: 'gone' is not one of active, suspended, revoked"),
        (lambda: Member("a", "00" * 32, "DE", 1), "public_key: must be a PublicKey"),  # type: ignore[arg-type]
        (
            lambda: Manifest("bad id!", COORDINATOR.public_key, ()),
            "federation_id: 'bad id!' is not a valid federation id",
        ),
        (lambda: Manifest("f", COORDINATOR.public_key, (), version=0), "version: must be an integer from 1 to"),
        (lambda: Manifest("f", COORDINATOR.public_key, (), version=True), "version: must be an integer from 1 to"),
    ],
)
def test_construction_validates_and_names_the_field(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ManifestError) as info:
        build()
    assert str(info.value).startswith(message)


# ---- signing ----------------------------------------------------------------------------------------


def test_only_the_coordinator_key_can_sign() -> None:
    manifest = unsigned(Member("a", A.public_key, "DE", 10))
    with pytest.raises(ManifestError) as info:
        manifest.sign(A)
    assert str(info.value) == (
        f"signing key {A.member_id} is not this manifest's coordinator key {COORDINATOR.member_id}; "
        "only the coordinator can sign it"
    )
    signed = manifest.sign(COORDINATOR)
    assert signed.signature == COORDINATOR.sign(Domain.MANIFEST, manifest.canonical_bytes())
    assert signed.canonical_bytes() == manifest.canonical_bytes()  # the signature is not part of the body


def test_canonical_bytes_are_sorted_compact_json() -> None:
    manifest = unsigned(Member("a", A.public_key, "DE", 10), version=7)
    body = manifest.canonical_bytes()
    assert body == json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    assert body.startswith(b'{"coordinator":{"public_key":"' + COORDINATOR.public_key.hex().encode() + b'"}')
    assert body.endswith(b'"status":"active"}],"version":7}')


def test_a_stale_signature_cannot_be_carried_over() -> None:
    from dataclasses import replace

    signed = two_members()
    with pytest.raises(ManifestError, match=r"^signature: does not verify under the manifest's coordinator key"):
        replace(signed, version=signed.version + 1)


def test_unsigned_manifest_cannot_be_written(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="manifest is not signed"):
        unsigned().save(tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()
    written = unsigned().save(tmp_path / "m.json", COORDINATOR)
    assert written.signature is not None
    assert Manifest.load(tmp_path / "m.json") == written


# ---- loading: signature and trusted coordinator key -----------------------------------------------------


@pytest.fixture
def manifest_file(tmp_path: Path) -> Path:
    path = tmp_path / "manifest.json"
    two_members().save(path)
    return path


def _edit(path: Path, change: Callable[[dict], object]) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc, indent=2))


def _status(doc: dict, name: str, status: str) -> None:
    next(m for m in doc["members"] if m["name"] == name)["status"] = status


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["members"][0].update(max_examples=d["members"][0]["max_examples"] + 1),
        lambda d: d["members"][0].update(jurisdiction="US"),
        lambda d: d["members"][0].update(name="mallory"),
        lambda d: _status(d, "a", "suspended"),
        lambda d: d.update(version=d["version"] + 1),
        lambda d: d.update(federation_id="fed-b"),
        lambda d: d["members"].pop(0),
        lambda d: d.update(coordinator={"public_key": OTHER_COORDINATOR.public_key.hex()}),
    ],
    ids=["member-cap", "member-jurisdiction", "member-name", "status", "version", "federation", "dropped", "swap-key"],
)
def test_tampered_manifest_is_refused(manifest_file: Path, change: Callable[[dict], object]) -> None:
    Manifest.load(manifest_file, COORDINATOR.public_key)  # positive control
    _edit(manifest_file, change)
    with pytest.raises(ManifestError) as info:
        Manifest.load(manifest_file)
    assert str(info.value).startswith(f"{manifest_file}: signature: does not verify under the manifest's coordinator")


def test_swapped_member_key_is_refused(manifest_file: Path) -> None:
    def swap(doc: dict) -> None:
        doc["members"][0].update(public_key=C.public_key.hex(), member_id=C.member_id)

    _edit(manifest_file, swap)
    with pytest.raises(ManifestError, match="signature: does not verify"):
        Manifest.load(manifest_file)


def test_signature_removed_is_refused(manifest_file: Path) -> None:
    _edit(manifest_file, lambda d: d.pop("signature"))
    with pytest.raises(ManifestError) as info:
        Manifest.load(manifest_file)
    assert str(info.value) == (f"{manifest_file}: not signed (no signature field); only a signed manifest is accepted")


def test_re_signed_by_another_coordinator_is_refused_by_a_pinned_reader(tmp_path: Path) -> None:
    # An attacker swaps in their own coordinator key and signs with it: self-consistent, but not trusted.
    forged = unsigned(Member("a", A.public_key, "DE", 10), key=OTHER_COORDINATOR).sign(OTHER_COORDINATOR)
    path = tmp_path / "manifest.json"
    forged.save(path)
    assert Manifest.load(path) == forged  # only its own key: verifies
    with pytest.raises(ManifestError) as info:
        Manifest.load(path, coordinator_key=COORDINATOR.public_key)
    assert str(info.value) == (
        f"{path}: signed by coordinator key {OTHER_COORDINATOR.member_id}, not by the trusted coordinator key "
        f"{COORDINATOR.member_id}; refusing it"
    )


def test_v1_manifest_is_refused_with_a_migration_hint(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    v1 = {
        "coordinator": {"public_key": COORDINATOR.public_key.hex()},
        "federation_id": "fed-a",
        "format": "weft-manifest/v1",
        "members": [],
    }
    path.write_text(json.dumps(v1))
    with pytest.raises(ManifestError) as info:
        Manifest.load(path)
    assert str(info.value) == (
        f"{path}: format 'weft-manifest/v1' is no longer supported (v1 manifests were never signed); re-create it "
        "with `weft manifest init` and `weft manifest add` (docs/PROTOCOL.md, section 7)"
    )


# ---- weak member keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize("weak", sorted(SMALL_ORDER_KEYS), ids=lambda k: k.hex()[:8] + ".." + k.hex()[-2:])
def test_small_order_member_key_is_refused_naming_the_member(manifest_file: Path, weak: bytes) -> None:
    def plant(doc: dict) -> None:
        member = next(m for m in doc["members"] if m["name"] == "b")
        member["public_key"] = weak.hex()

    _edit(manifest_file, plant)
    with pytest.raises(ManifestError) as info:
        Manifest.load(manifest_file)
    index = [m["name"] for m in json.loads(manifest_file.read_text())["members"]].index("b")
    assert str(info.value) == (
        f"{manifest_file}: members[{index}] 'b'.public_key: refused Ed25519 public key {weak.hex()}: "
        "small-order point (a signature under it can be forged)"
    )


def test_non_canonical_coordinator_key_is_refused(manifest_file: Path) -> None:
    _edit(manifest_file, lambda d: d.update(coordinator={"public_key": "ed" + "ff" * 30 + "7f"}))
    with pytest.raises(ManifestError, match=r"coordinator\.public_key: refused .*: non-canonical encoding"):
        Manifest.load(manifest_file)


# ---- versions and edits ---------------------------------------------------------------------------------


def test_every_edit_gives_the_next_version_unsigned() -> None:
    v1 = unsigned().sign(COORDINATOR)
    v2 = v1.with_member(Member("a", A.public_key, "DE", 10))
    v3 = v2.with_member(Member("b", B.public_key, "FR", 20))
    v4 = v3.with_status(A.member_id, Status.SUSPENDED)
    v5 = v4.with_status("a", "active")
    v6 = v5.with_status("b", "revoked")
    assert [m.version for m in (v1, v2, v3, v4, v5, v6)] == [1, 2, 3, 4, 5, 6]
    assert all(m.signature is None for m in (v2, v3, v4, v5, v6))
    assert [(m.name, m.status.value) for m in v6] == [(m.name, {"a": "active", "b": "revoked"}[m.name]) for m in v6]
    assert [m.name for m in v6.active] == ["a"]
    for old, new in ((v1, v2), (v2, v3), (v3, v4), (v4, v5), (v5, v6), (v1, v6)):
        check_successor(old, new)


def test_revocation_is_final() -> None:
    revoked = two_members().with_status("a", Status.REVOKED)
    for status in (Status.ACTIVE, Status.SUSPENDED):
        with pytest.raises(ManifestError, match=r"^member: 'a' is revoked; revocation is final$"):
            revoked.with_status("a", status)
    with pytest.raises(ManifestError, match=f"^key: member {A.member_id} is already in the manifest"):
        revoked.with_member(Member("a-again", A.public_key, "DE", 10))  # a revoked key cannot come back either


def test_status_change_to_the_same_status_is_refused() -> None:
    with pytest.raises(ManifestError, match=r"^member: 'a' is already active$"):
        two_members().with_status("a", Status.ACTIVE)


def test_adding_a_duplicate_member_is_refused() -> None:
    manifest = two_members()
    with pytest.raises(ManifestError, match=f"key: member {A.member_id} is already in the manifest \\(as 'a'\\)"):
        manifest.with_member(Member("other", A.public_key, "DE", 10))
    with pytest.raises(ManifestError, match="members: name 'a' is used by two members"):
        manifest.with_member(Member("a", C.public_key, "DE", 10))


@pytest.mark.parametrize(
    ("new", "message"),
    [
        (lambda old: Manifest("fed-a", old.coordinator_key, old.members, version=old.version), "version: 2 does not"),
        (lambda old: Manifest("fed-a", old.coordinator_key, old.members, version=1), "version: 1 does not follow"),
        (lambda old: Manifest("fed-b", old.coordinator_key, old.members, version=3), "federation_id: 'fed-b' cannot"),
        (
            lambda old: Manifest("fed-a", OTHER_COORDINATOR.public_key, old.members, version=3),
            "coordinator.public_key:",
        ),
        (
            lambda old: Manifest("fed-a", old.coordinator_key, (Member("b", B.public_key, "FR", 20),), version=3),
            "member: 'a'",
        ),
        (
            lambda old: Manifest(
                "fed-a", old.coordinator_key, (Member("a", A.public_key, "DE", 10), old.get(B.member_id)), version=3
            ),
            "member: 'a'",
        ),
    ],
    ids=["same-version", "lower-version", "other-federation", "other-coordinator", "revoked-dropped", "revoked-back"],
)
def test_check_successor_refuses(new: Callable[[Manifest], Manifest], message: str) -> None:
    old = two_members().with_status("a", Status.REVOKED)  # version 2, 'a' revoked
    assert old.version == 2
    with pytest.raises(ManifestError) as info:
        check_successor(old, new(old))
    assert str(info.value).startswith(message)


def test_save_replaces_a_file_only_by_its_successor(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    v1 = two_members().save(path)
    v2 = v1.with_status("a", Status.SUSPENDED).save(path, COORDINATOR)
    assert Manifest.load(path) == v2
    before = path.read_text()
    for stale in (v1, v2, Manifest("fed-a", COORDINATOR.public_key, v2.members, version=1).sign(COORDINATOR)):
        with pytest.raises(ManifestError, match="versions only grow"):
            stale.save(path)
    other = Manifest("fed-a", OTHER_COORDINATOR.public_key, (), version=9).sign(OTHER_COORDINATOR)
    with pytest.raises(ManifestError, match=r"coordinator.public_key"):
        other.save(path)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_save_refuses_to_replace_a_file_it_cannot_verify(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text("{}")
    with pytest.raises(ManifestError, match="missing field"):
        two_members().save(path)
    assert path.read_text() == "{}"


def test_weak_key_error_is_a_value_error_for_old_callers() -> None:
    with pytest.raises(ValueError, match="small-order point"):
        PublicKey.from_hex("01" + "00" * 31)
