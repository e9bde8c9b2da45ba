"""The run ledger: an append-only, hash-chained, coordinator-signed record of every round.

One file, `ledger.jsonl`, one record per line (docs/PROTOCOL.md, "Ledger"):

    {"body": {...}, "signature": "<128 hex>"}

- `body` always holds `ledger` (format version, 1), `seq` (0, 1, 2, ...), `prev` (hex SHA-256 of the
  previous line's bytes without its newline; 64 zeros for seq 0), `kind`, `federation_id` and `run_id`,
  plus the fields of its kind (`start`, `round`, `evaluation`, `failure`, `resume`, `end`). A round is
  committed by its `round` record, before its model is sent anywhere; its `evaluation` record (the signed
  evaluations of that model) follows.
- `signature` is the coordinator's Ed25519 signature, under `Domain.LEDGER`, of the canonical JSON of
  `body` (sorted keys, no spaces, UTF-8, no NaN or infinity).
- A line is written with one `write(2)` and fsynced; a crash can only leave a torn last line, which
  `read_ledger` reports (`torn_tail`) and a resumed coordinator cuts off before appending.

Editing, reordering, dropping or inserting a line breaks the chain or a signature; `verify_chain` names the
first line where that happens. What the records claim (the aggregates) is checked by `protocols.audit`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocols.errors import DecodeError, SignatureError
from protocols.files import append_line
from protocols.identity import Domain, PublicKey, SigningKey

LEDGER_FILE = "ledger.jsonl"
FORMAT = 1
GENESIS = "0" * 64
KINDS = ("start", "round", "evaluation", "failure", "resume", "end")
MAX_LINE_BYTES = 64 * 1024 * 1024
"""A ledger line is refused above this size (a round of thousands of contributions stays far below it)."""


def canonical(value: Any) -> bytes:
    """Canonical JSON: sorted keys, no spaces, UTF-8; NaN and infinity are refused (ValueError)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


@dataclass(frozen=True)
class LedgerEntry:
    """One signed ledger record."""

    body: dict[str, Any]
    signature: bytes
    line: bytes
    """The line's bytes as stored, without the newline (what the next record's `prev` hashes)."""
    number: int
    """1-based line number in the file (for messages)."""

    @property
    def seq(self) -> int:
        """Position in the chain."""
        return int(self.body["seq"])

    @property
    def kind(self) -> str:
        """`start`, `round`, `failure`, `resume` or `end`."""
        return str(self.body["kind"])

    @property
    def digest(self) -> str:
        """Hex SHA-256 of the stored line: the next record's `prev`."""
        return hashlib.sha256(self.line).hexdigest()


def encode_entry(body: Mapping[str, Any], key: SigningKey) -> bytes:
    """The signed line (without its newline) for `body`."""
    signature = key.sign(Domain.LEDGER, canonical(dict(body)))
    return canonical({"body": dict(body), "signature": signature.hex()})


def decode_line(line: bytes, number: int) -> LedgerEntry:
    """Parse one stored line; raise DecodeError naming the line for anything malformed."""
    where = f"ledger line {number}"
    if len(line) > MAX_LINE_BYTES:
        raise DecodeError(f"{where}: {len(line)} bytes, more than the {MAX_LINE_BYTES} a record may have")
    try:
        doc = json.loads(line.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DecodeError(f"{where}: not a JSON record ({type(exc).__name__})") from exc
    if not isinstance(doc, dict) or set(doc) != {"body", "signature"}:
        raise DecodeError(f"{where}: a record has exactly the keys body and signature")
    body, signature = doc["body"], doc["signature"]
    if not isinstance(body, dict) or not isinstance(signature, str):
        raise DecodeError(f"{where}: body must be an object and signature a hex string")
    try:
        sig = bytes.fromhex(signature)
    except ValueError as exc:
        raise DecodeError(f"{where}: signature is not hex") from exc
    if len(sig) != 64:
        raise DecodeError(f"{where}: signature must be 64 bytes, got {len(sig)}")
    try:
        exact = canonical(doc) == line
    except ValueError:
        exact = False
    if not exact:  # one byte sequence per record: the last line, which no `prev` covers, cannot be rewritten either
        raise DecodeError(f"{where}: not in canonical form (sorted keys, no spaces, lowercase hex)")
    for name, kind in (("ledger", int), ("seq", int), ("prev", str), ("kind", str), ("run_id", str)):
        if not isinstance(body.get(name), kind) or isinstance(body.get(name), bool):
            raise DecodeError(f"{where}: body.{name} is missing or not a {kind.__name__}")
    if body["ledger"] != FORMAT:
        raise DecodeError(f"{where}: ledger format {body['ledger']} is not supported (this weft reads {FORMAT})")
    if body["kind"] not in KINDS:
        raise DecodeError(f"{where}: unknown record kind {str(body['kind'])[:40]!r}")
    return LedgerEntry(body, sig, line, number)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a ledger")


@dataclass(frozen=True)
class LedgerRead:
    """The records of a ledger file, and what a crash may have left after them."""

    entries: list[LedgerEntry]
    valid_bytes: int
    """Bytes of the file that hold whole records (a resumed coordinator truncates to this)."""
    torn_tail: bool
    """Whether the file ends with a partial line (no newline): the mark of a crash mid-write."""


def read_ledger(path: Path) -> LedgerRead:
    """Read every record; a last line without its newline is reported as torn, never parsed."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DecodeError(f"{path}: cannot read the ledger ({exc.strerror or exc})") from exc
    entries: list[LedgerEntry] = []
    offset = 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines[:-1], start=1):
        entries.append(decode_line(line, number))
        offset += len(line) + 1
    return LedgerRead(entries, offset, torn_tail=bool(lines[-1]))


def verify_chain(entries: list[LedgerEntry], coordinator: PublicKey) -> list[str]:
    """Every break in sequence, chain or signature, in order; empty when the ledger is intact."""
    problems: list[str] = []
    prev = GENESIS
    first = entries[0].body if entries else {}
    for i, entry in enumerate(entries):
        where = f"ledger line {entry.number}"
        body = entry.body
        if entry.seq != i:
            problems.append(f"{where}: seq is {entry.seq}, expected {i} (a record was dropped, inserted or moved)")
        if body["prev"] != prev:
            problems.append(f"{where}: prev does not match the hash of the line before (the chain is broken)")
        try:
            coordinator.verify(Domain.LEDGER, canonical(body), entry.signature)
        except (SignatureError, ValueError):
            problems.append(f"{where}: the coordinator's signature does not verify (the record was altered)")
        if i == 0 and entry.kind != "start":
            problems.append(f"{where}: the first record must be kind start, not {entry.kind}")
        if i > 0 and entry.kind == "start":
            problems.append(f"{where}: a second start record")
        for name in ("federation_id", "run_id"):
            if body.get(name) != first.get(name):
                problems.append(f"{where}: {name} differs from the start record's")
        prev = entry.digest
    return problems


class LedgerWriter:
    """Appends signed, chained records to `ledger.jsonl`."""

    def __init__(self, path: Path, key: SigningKey, federation_id: str, run_id: str) -> None:
        self.path, self._key = path, key
        self._ids = {"federation_id": federation_id, "run_id": run_id}
        self._seq, self._prev = 0, GENESIS

    @classmethod
    def continuing(cls, path: Path, key: SigningKey, last: LedgerEntry) -> LedgerWriter:
        """A writer that appends after `last` (the file must already be cut back to it)."""
        writer = cls(path, key, str(last.body.get("federation_id", "")), str(last.body["run_id"]))
        writer._seq, writer._prev = last.seq + 1, last.digest
        return writer

    def append(self, kind: str, fields: Mapping[str, Any]) -> LedgerEntry:
        """Sign and append one record of `kind`; returns it as stored."""
        if kind not in KINDS:
            raise ValueError(f"unknown ledger record kind {kind!r}")
        body = {**fields, **self._ids, "ledger": FORMAT, "seq": self._seq, "prev": self._prev, "kind": kind}
        line = encode_entry(body, self._key)
        append_line(self.path, line + b"\n")
        entry = LedgerEntry(body, bytes.fromhex(json.loads(line)["signature"]), line, self._seq + 1)
        self._seq, self._prev = self._seq + 1, entry.digest
        return entry
