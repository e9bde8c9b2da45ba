"""The federation manifest: who is a member, with which public key and jurisdiction.

Stored as JSON (docs/PROTOCOL.md, "Manifest"). Loading is strict: unknown fields, a member id that
is not the fingerprint of its key, duplicates and out-of-range values fail with a message that
names the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocols.envelope import ID_PATTERN
from protocols.errors import ManifestError
from protocols.identity import PublicKey

FORMAT = "weft-manifest/v1"


@dataclass(frozen=True)
class Member:
    """One partner institution."""

    name: str
    """Human-readable name (e.g. "hospital-a")."""
    public_key: PublicKey
    """The key that signs this member's updates."""
    jurisdiction: str
    """Where the member's data lives (e.g. an ISO 3166 code)."""
    max_examples: int
    """The most training examples this member may claim in one update."""

    @property
    def member_id(self) -> str:
        """Fingerprint of the member's key."""
        return self.public_key.member_id


@dataclass(frozen=True)
class Manifest:
    """Membership of one federation."""

    federation_id: str
    coordinator_key: PublicKey
    members: tuple[Member, ...]

    def __post_init__(self) -> None:
        ids = [m.member_id for m in self.members]
        if len(set(ids)) != len(ids):
            raise ManifestError("members: the same public key appears twice")

    def __iter__(self) -> Iterator[Member]:
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)

    def get(self, member_id: str) -> Member | None:
        """The member with this id, or None."""
        return self.by_id.get(member_id)

    @property
    def by_id(self) -> Mapping[str, Member]:
        """Members keyed by member id."""
        return {m.member_id: m for m in self.members}

    def to_json(self) -> str:
        """Canonical JSON text (sorted keys, members sorted by id)."""
        doc = {
            "format": FORMAT,
            "federation_id": self.federation_id,
            "coordinator": {"public_key": self.coordinator_key.hex()},
            "members": [
                {
                    "member_id": m.member_id,
                    "name": m.name,
                    "public_key": m.public_key.hex(),
                    "jurisdiction": m.jurisdiction,
                    "max_examples": m.max_examples,
                }
                for m in sorted(self.members, key=lambda m: m.member_id)
            ],
        }
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "manifest") -> Manifest:
        """Parse and validate; errors name `source` and the field."""
        try:
            doc = json.loads(text, object_pairs_hook=_unique_fields)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{source}: not valid JSON ({exc})") from exc
        _fields(doc, source, {"format", "federation_id", "coordinator", "members"})
        if doc["format"] != FORMAT:
            raise ManifestError(f"{source}: format must be {FORMAT!r}, got {doc['format']!r}")
        coord = doc["coordinator"]
        _fields(coord, f"{source}: coordinator", {"public_key"})
        if not isinstance(doc["members"], list):
            raise ManifestError(f"{source}: members must be a list")
        members = tuple(_member(m, f"{source}: members[{i}]") for i, m in enumerate(doc["members"]))
        federation_id = _text(doc, "federation_id", source)
        if not ID_PATTERN.fullmatch(federation_id):
            raise ManifestError(f"{source}.federation_id must match {ID_PATTERN.pattern}")
        return cls(
            federation_id=federation_id,
            coordinator_key=_key(coord, f"{source}: coordinator"),
            members=members,
        )

    def save(self, path: Path) -> None:
        """Write as JSON."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> Manifest:
        """Read and validate a manifest file."""
        if not path.is_file():
            raise ManifestError(f"manifest file {path} does not exist")
        return cls.from_json(path.read_text(), source=str(path))


def _unique_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ManifestError(f"repeated field(s) {repeated} in one JSON object")
    return dict(pairs)


def _member(doc: Any, where: str) -> Member:
    _fields(doc, where, {"member_id", "name", "public_key", "jurisdiction", "max_examples"})
    max_examples = doc["max_examples"]
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise ManifestError(f"{where}.max_examples must be a positive integer")
    member = Member(
        name=_text(doc, "name", where),
        public_key=_key(doc, where),
        jurisdiction=_text(doc, "jurisdiction", where),
        max_examples=max_examples,
    )
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


def _text(doc: dict[str, Any], name: str, where: str) -> str:
    value = doc[name]
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{where}.{name} must be non-empty text")
    return value


def _key(doc: dict[str, Any], where: str) -> PublicKey:
    try:
        return PublicKey.from_hex(doc["public_key"])
    except (ValueError, TypeError) as exc:
        raise ManifestError(f"{where}.public_key: {exc}") from exc
