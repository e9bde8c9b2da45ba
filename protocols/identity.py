"""Ed25519 identities: key files, signatures with domain separation, member ids.

A member id is a short fingerprint of the public key: the first 8 bytes of
SHA-256(b"weft/member-id/v1\\x00" || raw public key), as 16 lowercase hex digits.
Every signature is made over `domain || message`, where the domain names the kind of
structure (see `Domain`), so a signature over one kind can never be replayed as another.
"""

from __future__ import annotations

import enum
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocols.errors import KeyFileError, SignatureError

MEMBER_ID_DOMAIN = b"weft/member-id/v1\x00"


class Domain(enum.Enum):
    """Signature domains. The value is prefixed to the message before signing."""

    UPDATE = b"weft/update/v1\x00"
    GLOBAL_MODEL = b"weft/global-model/v1\x00"
    MANIFEST = b"weft/manifest/v1\x00"


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key (32 raw bytes)."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != 32:
            raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(self.raw)}")

    @property
    def member_id(self) -> str:
        """The short fingerprint used as this key's member id."""
        return hashlib.sha256(MEMBER_ID_DOMAIN + self.raw).digest()[:8].hex()

    def hex(self) -> str:
        """The raw key as 64 hex digits."""
        return self.raw.hex()

    @classmethod
    def from_hex(cls, text: str) -> PublicKey:
        """Parse 64 hex digits."""
        try:
            raw = bytes.fromhex(text)
        except ValueError as exc:
            raise ValueError("public key is not hex") from exc
        return cls(raw)

    def verify(self, domain: Domain, message: bytes, signature: bytes) -> None:
        """Raise `SignatureError` unless `signature` is this key's over `domain || message`."""
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, domain.value + message)
        except InvalidSignature as exc:
            raise SignatureError(f"signature does not verify for member {self.member_id}") from exc


class SigningKey:
    """An Ed25519 private key. Never serialised except by `save_signing_key`."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_key = PublicKey(raw)

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh random key."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        """A key from 32 seed bytes (test vectors and reproducible simulations only)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def member_id(self) -> str:
        """The member id of the public half."""
        return self.public_key.member_id

    def sign(self, domain: Domain, message: bytes) -> bytes:
        """Sign `domain || message`; Ed25519 signatures are deterministic."""
        return self._key.sign(domain.value + message)

    def __repr__(self) -> str:
        return f"SigningKey(member_id={self.member_id})"


def save_signing_key(key: SigningKey, path: Path) -> None:
    """Write `key` as unencrypted PKCS#8 PEM, readable by the owner only; never overwrites."""
    pem = key._key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key") from exc
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)


def load_signing_key(path: Path) -> SigningKey:
    """Read a key written by `save_signing_key`; refuse files others can read."""
    data = _read_key_file(path, "private key")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"private key {path} is readable by others (mode {oct(mode & 0o777)}); fix with: chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, weft needs an Ed25519 key")
    return SigningKey(key)


def save_public_key(key: PublicKey, path: Path) -> None:
    """Write a public key as SubjectPublicKeyInfo PEM (readable by openssl)."""
    pem = Ed25519PublicKey.from_public_bytes(key.raw).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pem)


def load_public_key(path: Path) -> PublicKey:
    """Read a public key written by `save_public_key`."""
    data = _read_key_file(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, weft needs an Ed25519 key")
    return PublicKey(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def _read_key_file(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise KeyFileError(f"{what} file {path} does not exist; create one with `weft keygen`")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} file {path}: {exc.strerror}") from exc
