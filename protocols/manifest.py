"""The federation manifest: who is a member, with which keys, jurisdiction and status; signed by the coordinator.

Stored as JSON (docs/PROTOCOL.md, section 7), format `weft-manifest/v2`. The coordinator signs the
canonical bytes of the body (every field but `signature`) under `Domain.MANIFEST`; a manifest file
that is not signed, or whose signature does not verify under its own coordinator key (or, when the
reader names one, under the coordinator key it trusts), is refused. Versions only grow: every edit
(`with_member`, `with_status`) gives version + 1, `save` refuses to replace a file by anything that is
not its successor (`check_successor`), and a revoked member stays revoked.

Construction validates every value (names, ids, counts, statuses, keys), so an invalid manifest can
neither be built nor written; loading is strict: unknown fields, a member id that is not the
fingerprint of its key, duplicates and out-of-range values fail with a message that names the field
and, inside `members`, the member.
"""

from __future__ import annotations

import enum
import json
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from protocols.envelope import ID_PATTERN
from protocols.errors import ManifestDecodeError, ManifestError, SignatureError
from protocols.identity import Domain, PublicKey, SigningKey, flower_auth_public_key

FORMAT = "weft-manifest/v2"
RETIRED_FORMATS = frozenset({"weft-manifest/v1"})
"""Formats this version refuses, with a migration hint (v1 manifests were never signed)."""
MAX_INTEGER = 2**53 - 1
"""Largest `version` / `max_examples`: every JSON implementation reads integers up to 2^53 - 1 exactly."""
MAX_MANIFEST_BYTES = 64 << 20
"""Largest manifest file read (64 MiB: a member takes about 500 bytes)."""
ID_RULE = "1-128 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"


class Status(enum.StrEnum):
    """A member's standing. Only `active` members' updates are accepted; `revoked` is final."""

    ACTIVE = "active"
    SUSPENDED = "suspended"
    REVOKED = "revoked"


@dataclass(frozen=True)
class Member:
    """One partner institution. Every field is validated on construction (`ManifestError` names it)."""

    name: str
    """Human-readable name, unique in the manifest (e.g. "hospital-a"); an id (`ID_PATTERN`)."""
    public_key: PublicKey
    """The Ed25519 key that signs this member's updates."""
    jurisdiction: str
    """Where the member's data lives (e.g. an ISO 3166 code); an id (`ID_PATTERN`)."""
    max_examples: int
    """The most training examples this member may claim in one update (1 ..= 2^53 - 1)."""
    status: Status = Status.ACTIVE
    """active, suspended or revoked."""
    flower_auth_key: str = ""
    """The node's Flower SuperNode authentication public key (`ecdsa-sha2-nistp384 AAAA...`), or empty."""

    def __post_init__(self) -> None:
        _check_id(self.name, "name")
        if not isinstance(self.public_key, PublicKey):
            raise ManifestError("public_key: must be a PublicKey")
        _check_id(self.jurisdiction, "jurisdiction")
        _check_integer(self.max_examples, "max_examples")
        try:
            object.__setattr__(self, "status", Status(self.status))
        except ValueError:
            choices = ", ".join(s.value for s in Status)
            raise ManifestError(f"status: {self.status!r} is not one of {choices}") from None
        if not isinstance(self.flower_auth_key, str):
            raise ManifestError("flower_auth_key: must be text")
        if self.flower_auth_key:
            try:
                normal = flower_auth_public_key(self.flower_auth_key)
            except ValueError as exc:
                raise ManifestError(f"flower_auth_key: {exc}") from exc
            if normal != self.flower_auth_key:
                raise ManifestError("flower_auth_key: must be written as 'TYPE BASE64' (one space, no comment)")

    @property
    def member_id(self) -> str:
        """Fingerprint of the member's key."""
        return self.public_key.member_id

    @property
    def active(self) -> bool:
        """Whether this member's updates may be accepted."""
        return self.status is Status.ACTIVE

    def to_json(self) -> dict[str, Any]:
        """The member's JSON object (as signed and as written)."""
        return {
            "flower_auth_key": self.flower_auth_key,
            "jurisdiction": self.jurisdiction,
            "max_examples": self.max_examples,
            "member_id": self.member_id,
            "name": self.name,
            "public_key": self.public_key.hex(),
            "status": self.status.value,
        }


@dataclass(frozen=True)
class Manifest:
    """Membership of one federation, at one version; `signature` is the coordinator's, or None in memory.

    `Manifest(federation_id, coordinator_key, members)` builds an unsigned version 1 for in-memory use;
    only the coordinator's key can `sign` it, and only a signed manifest can be written (`to_json`, `save`).
    A signature given to the constructor must verify, so a Manifest never carries a stale one.
    """

    federation_id: str
    coordinator_key: PublicKey
    members: tuple[Member, ...]
    version: int = 1
    signature: bytes | None = None
    _by_id: Mapping[str, Member] = field(init=False, repr=False, compare=False)
    _active: tuple[Member, ...] = field(init=False, repr=False, compare=False)
    _canonical: bytes | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        _check_id(self.federation_id, "federation_id")
        if not isinstance(self.coordinator_key, PublicKey):
            raise ManifestError("coordinator.public_key: must be a PublicKey")
        _check_integer(self.version, "version")
        if not all(isinstance(m, Member) for m in self.members):
            raise ManifestError("members: must hold Member values")
        members = tuple(sorted(self.members, key=lambda m: m.member_id))
        object.__setattr__(self, "members", members)
        by_id = {m.member_id: m for m in members}
        if len(by_id) != len(members):
            raise ManifestError("members: the same public key appears twice")
        repeated = sorted(n for n, count in Counter(m.name for m in members).items() if count > 1)
        if repeated:
            raise ManifestError(f"members: name {repeated[0]!r} is used by two members")
        if (clash := by_id.get(self.coordinator_key.member_id)) is not None:
            raise ManifestError(f"members: member {clash.name!r} uses the coordinator key")
        object.__setattr__(self, "_by_id", MappingProxyType(by_id))
        # built once: the round loop reads these per reply, and a manifest can hold thousands of members
        object.__setattr__(self, "_active", tuple(m for m in members if m.active))
        object.__setattr__(self, "_canonical", None)
        if self.signature is not None:
            self._verify_signature()

    # ---- lookups -------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Member]:
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)

    def get(self, member_id: str) -> Member | None:
        """The member with this id, or None."""
        return self._by_id.get(member_id)

    @property
    def by_id(self) -> Mapping[str, Member]:
        """Members keyed by member id (built once, read-only)."""
        return self._by_id

    @property
    def active(self) -> tuple[Member, ...]:
        """The members whose updates may be accepted (computed once)."""
        return self._active

    def find(self, name_or_id: str) -> Member:
        """The member with this name or member id; `ManifestError` if there is none."""
        member = self._by_id.get(name_or_id) or next((m for m in self.members if m.name == name_or_id), None)
        if member is None:
            raise ManifestError(f"member: no member named {name_or_id!r} or with that id in this manifest")
        return member

    # ---- edits: each gives the next version, unsigned --------------------------------------------------

    def with_member(self, member: Member) -> Manifest:
        """The next version, with `member` admitted."""
        if member.member_id in self._by_id:
            old = self._by_id[member.member_id]
            raise ManifestError(f"key: member {member.member_id} is already in the manifest (as {old.name!r})")
        return self._next(members=(*self.members, member))

    def with_status(self, member_id: str, status: Status | str) -> Manifest:
        """The next version, with the member's status changed; revocation is final."""
        member = self.find(member_id)
        status = Status(status)
        if member.status is Status.REVOKED:
            raise ManifestError(f"member: {member.name!r} is revoked; revocation is final")
        if member.status is status:
            raise ManifestError(f"member: {member.name!r} is already {status.value}")
        changed = replace(member, status=status)
        return self._next(members=tuple(changed if m is member else m for m in self.members))

    def _next(self, **changes: Any) -> Manifest:
        if self.version >= MAX_INTEGER:
            raise ManifestError(f"version: {self.version} is the last version a manifest can have")
        return replace(self, version=self.version + 1, signature=None, **changes)

    # ---- signing -------------------------------------------------------------------------------------

    def body(self) -> dict[str, Any]:
        """Every field but the signature, as JSON values (members sorted by member id)."""
        return {
            "coordinator": {"public_key": self.coordinator_key.hex()},
            "federation_id": self.federation_id,
            "format": FORMAT,
            "members": [m.to_json() for m in self.members],
            "version": self.version,
        }

    def canonical_bytes(self) -> bytes:
        """What the coordinator signs: the body as JSON, keys sorted, no whitespace, UTF-8 (computed once)."""
        if self._canonical is None:
            object.__setattr__(self, "_canonical", canonical_json(self.body()))
        assert self._canonical is not None
        return self._canonical

    def sign(self, key: SigningKey) -> Manifest:
        """This manifest signed by `key`, which must be the manifest's coordinator key."""
        if key.public_key != self.coordinator_key:
            raise ManifestError(
                f"signing key {key.member_id} is not this manifest's coordinator key "
                f"{self.coordinator_key.member_id}; only the coordinator can sign it"
            )
        return replace(self, signature=key.sign(Domain.MANIFEST, self.canonical_bytes()))

    def _verify_signature(self) -> None:
        assert self.signature is not None
        try:
            self.coordinator_key.verify(Domain.MANIFEST, self.canonical_bytes(), self.signature)
        except (SignatureError, ValueError) as exc:
            raise ManifestError(
                f"signature: does not verify under the manifest's coordinator key {self.coordinator_key.member_id} "
                "(the manifest was changed after signing, or signed by another key)"
            ) from exc

    # ---- files ---------------------------------------------------------------------------------------

    def to_json(self) -> str:
        """The signed manifest as canonical JSON text (2-space indentation, sorted keys, one final newline)."""
        if self.signature is None:
            raise ManifestError("manifest is not signed; sign it with the coordinator key before writing it")
        doc = {**self.body(), "signature": self.signature.hex()}
        return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "manifest", coordinator_key: PublicKey | None = None) -> Manifest:
        """Parse, validate and verify; errors name `source`, the field and the member.

        With `coordinator_key`, the manifest must also be signed by exactly that key (the reader's
        trusted coordinator), not just by the key it names itself.
        """
        if len(text) > MAX_MANIFEST_BYTES:
            raise ManifestDecodeError(
                f"{source}: {len(text)} characters is too large for a manifest (at most {MAX_MANIFEST_BYTES})"
            )
        try:
            doc = json.loads(text, object_pairs_hook=_unique_fields, parse_constant=_no_constant)
        except json.JSONDecodeError as exc:
            raise ManifestDecodeError(
                f"{source}: not valid JSON ({exc}); a manifest is the JSON file `weft manifest init` writes"
            ) from exc
        except ManifestError as exc:
            raise ManifestDecodeError(f"{source}: {exc}") from exc
        except RecursionError:
            raise ManifestDecodeError(f"{source}: JSON nested too deeply to be a manifest") from None
        except ValueError as exc:  # e.g. an integer literal of more digits than Python converts
            raise ManifestDecodeError(f"{source}: not a valid manifest ({exc})") from exc
        if not isinstance(doc, dict):
            raise ManifestDecodeError(f"{source}: expected an object")
        fmt = doc.get("format")
        if isinstance(fmt, str) and fmt in RETIRED_FORMATS:
            raise ManifestError(
                f"{source}: format {fmt!r} is no longer supported (v1 manifests were never signed); "
                "re-create it with `weft manifest init` and `weft manifest add` (docs/PROTOCOL.md, section 7)"
            )
        if "format" in doc and fmt != FORMAT:
            raise ManifestError(f"{source}: format must be {FORMAT!r}, got {fmt!r}")
        if "format" in doc and "signature" not in doc:
            raise ManifestError(f"{source}: not signed (no signature field); only a signed manifest is accepted")
        _fields(doc, source, {"format", "federation_id", "version", "coordinator", "members", "signature"})
        coord = doc["coordinator"]
        _fields(coord, f"{source}: coordinator", {"public_key"})
        if not isinstance(doc["members"], list):
            raise ManifestError(f"{source}: members must be a list")
        members = tuple(_member(m, f"{source}: members[{i}]") for i, m in enumerate(doc["members"]))
        signature = doc["signature"]
        if not isinstance(signature, str) or len(signature) != 128:
            raise ManifestError(f"{source}: signature must be 128 hex digits")
        try:
            raw_signature = bytes.fromhex(signature)
        except ValueError:
            raise ManifestError(f"{source}: signature must be 128 hex digits") from None
        try:
            manifest = cls(
                federation_id=doc["federation_id"],
                coordinator_key=_key(coord, f"{source}: coordinator"),
                members=members,
                version=doc["version"],
                signature=raw_signature,
            )
        except ManifestError as exc:
            raise ManifestError(f"{source}: {exc}") from exc
        if coordinator_key is not None and manifest.coordinator_key != coordinator_key:
            raise ManifestError(
                f"{source}: signed by coordinator key {manifest.coordinator_key.member_id}, not by the trusted "
                f"coordinator key {coordinator_key.member_id}; refusing it"
            )
        return manifest

    def save(self, path: Path, key: SigningKey | None = None) -> Manifest:
        """Write atomically (signed by `key` if given, else already signed); return what was written.

        An existing file is replaced only by its successor (`check_successor`): a higher version of the
        same federation under the same coordinator key that keeps every revoked member revoked.
        """
        manifest = self.sign(key) if key is not None else self
        text = manifest.to_json()
        if path.exists():
            check_successor(Manifest.load(path), manifest)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return manifest

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "manifest", coordinator_key: PublicKey | None = None) -> Manifest:
        """Parse UTF-8 manifest bytes as `from_json` does; bytes that are no manifest raise `ManifestDecodeError`."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestDecodeError(
                f"{source}: {len(data)} bytes is too large for a manifest (at most {MAX_MANIFEST_BYTES})"
            )
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestDecodeError(
                f"{source}: not UTF-8 text (byte {exc.start}); a manifest is the JSON file `weft manifest init` writes"
            ) from None
        return cls.from_json(text, source=source, coordinator_key=coordinator_key)

    @classmethod
    def load(cls, path: Path, coordinator_key: PublicKey | None = None) -> Manifest:
        """Read, validate and verify a manifest file (against `coordinator_key` too, when given)."""
        if path.is_dir():
            raise ManifestError(f"manifest file {path} is a folder; give the manifest's JSON file")
        if not path.is_file():
            raise ManifestError(f"manifest file {path} does not exist; create one with `weft manifest init`")
        try:
            with path.open("rb") as fh:
                data = fh.read(MAX_MANIFEST_BYTES + 1)
        except OSError as exc:
            raise ManifestError(f"cannot read manifest file {path}: {exc.strerror or exc}") from exc
        return cls.from_bytes(data, source=str(path), coordinator_key=coordinator_key)


def check_successor(old: Manifest, new: Manifest) -> None:
    """Raise `ManifestError` unless `new` may replace `old`.

    Same federation, same coordinator key, a strictly greater version, and every member revoked in
    `old` still present and revoked in `new` (revocation is final).
    """
    if new.federation_id != old.federation_id:
        raise ManifestError(f"federation_id: {new.federation_id!r} cannot replace federation {old.federation_id!r}")
    if new.coordinator_key != old.coordinator_key:
        raise ManifestError(
            f"coordinator.public_key: {new.coordinator_key.member_id} cannot replace coordinator key "
            f"{old.coordinator_key.member_id}"
        )
    if new.version <= old.version:
        raise ManifestError(f"version: {new.version} does not follow version {old.version}; versions only grow")
    for member in old.members:
        if member.status is Status.REVOKED:
            after = new.get(member.member_id)
            if after is None or after.status is not Status.REVOKED:
                raise ManifestError(f"member: {member.name!r} ({member.member_id}) is revoked; revocation is final")


def canonical_json(value: Any) -> bytes:
    """JSON with sorted keys and no whitespace, UTF-8 (RFC 8785 for weft's manifests: text and integers only)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _check_id(value: object, name: str) -> None:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ManifestError(f"{name}: {value!r} is not a valid {name.replace('_', ' ')} ({ID_RULE})")


def _check_integer(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_INTEGER:
        raise ManifestError(f"{name}: must be an integer from 1 to 2^53 - 1, got {value!r}")


def _unique_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ManifestError(f"repeated field(s) {repeated} in one JSON object")
    return dict(pairs)


def _no_constant(name: str) -> None:
    raise ManifestError(f"{name} is not a JSON value")


def _member(doc: Any, where: str) -> Member:
    _fields(
        doc, where, {"member_id", "name", "public_key", "jurisdiction", "flower_auth_key", "status", "max_examples"}
    )
    if isinstance(doc["name"], str) and ID_PATTERN.fullmatch(doc["name"]):
        where = f"{where} {doc['name']!r}"  # from here on, errors name the member
    public_key = _key(doc, where)
    try:
        member = Member(
            name=doc["name"],
            public_key=public_key,
            jurisdiction=doc["jurisdiction"],
            max_examples=doc["max_examples"],
            status=doc["status"],
            flower_auth_key=doc["flower_auth_key"],
        )
    except ManifestError as exc:
        raise ManifestError(f"{where}.{exc}") from exc
    if doc["member_id"] != member.member_id:
        raise ManifestError(
            f"{where}.member_id {doc['member_id']!r} is not the fingerprint of its public_key "
            f"(expected {member.member_id})"
        )
    return member


def _fields(doc: Any, where: str, expected: set[str]) -> None:
    if not isinstance(doc, dict):
        raise ManifestError(f"{where}: expected an object")
    missing, unknown = expected - doc.keys(), doc.keys() - expected
    if missing:
        raise ManifestError(f"{where}: missing field(s) {sorted(missing)}")
    if unknown:
        raise ManifestError(f"{where}: unknown field(s) {sorted(unknown)}")


def _key(doc: dict[str, Any], where: str) -> PublicKey:
    value = doc["public_key"]
    try:
        if not isinstance(value, str):
            raise ValueError("must be 64 hex digits")
        return PublicKey.from_hex(value)
    except ValueError as exc:  # includes WeakKeyError: the message names the member and why its key is refused
        raise ManifestError(f"{where}.public_key: {exc}") from exc
