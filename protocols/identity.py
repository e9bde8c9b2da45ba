"""Ed25519 identities: key files, signatures with domain separation, member ids.

A member id is a short fingerprint of the public key: the first 8 bytes of
SHA-256(b"weft/member-id/v1\\x00" || raw public key), as 16 lowercase hex digits.
Every signature is made over `domain || message`, where the domain names the kind of
structure (see `Domain`), so a signature over one kind can never be replayed as another.

A `PublicKey` is refused on construction when its encoding is weak (docs/PROTOCOL.md, section 3.1):
a small-order point (OpenSSL accepts forged signatures for these, e.g. any message under the
identity point), a non-canonical encoding (y >= p) or bytes that are not a point of the curve.
Every key read from a file or a manifest is therefore checked.

A node also holds a Flower authentication key pair (SuperNode auth in Flower 1.42: ECDSA on a NIST
curve, OpenSSH format); `create_flower_auth_key` writes one, `flower_auth_public_key` checks one.
"""

from __future__ import annotations

import enum
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, rsa, x448, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocols.errors import KeyFileError, SignatureError, WeakKeyError

MEMBER_ID_DOMAIN = b"weft/member-id/v1\x00"

_P = 2**255 - 19
"""The field prime of Curve25519."""
_D = -121665 * pow(121666, -1, _P) % _P
"""The twisted Edwards curve constant d of Ed25519 (RFC 8032, section 5.1)."""
SMALL_ORDER_KEYS = frozenset(
    bytes.fromhex(h)
    for h in (
        "0100000000000000000000000000000000000000000000000000000000000000",  # identity (order 1)
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # order 2 (y = p - 1)
        "0000000000000000000000000000000000000000000000000000000000000000",  # order 4 (y = 0)
        "0000000000000000000000000000000000000000000000000000000000000080",  # order 4 (y = 0, x odd)
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",  # order 8
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",  # order 8
    )
)
"""The canonical encodings of the 8 points of order 1, 2, 4 or 8 (the torsion subgroup of Ed25519)."""
_SMALL_ORDER_Y = frozenset(int.from_bytes(k, "little") & ((1 << 255) - 1) for k in SMALL_ORDER_KEYS)
FLOWER_AUTH_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
"""NIST curves Flower 1.42 accepts for SuperNode authentication keys (the OpenSSH ECDSA curves)."""


class Domain(enum.Enum):
    """Signature domains. The value is prefixed to the message before signing."""

    UPDATE = b"weft/update/v1\x00"
    GLOBAL_MODEL = b"weft/global-model/v1\x00"
    MANIFEST = b"weft/manifest/v2\x00"
    """Manifest format v2 (`weft/manifest/v1` was reserved but never used: v1 manifests were unsigned)."""
    LEDGER = b"weft/ledger/v1\x00"
    """One record of a run's hash-chained ledger (protocols.ledger)."""
    EVALUATION = b"weft/evaluation/v1\x00"
    """A node's evaluation reply: which global model it evaluated, on how many examples, with what metrics."""


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key (32 raw bytes)."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != 32:
            raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(self.raw)}")
        weakness = key_weakness(self.raw)
        if weakness:
            raise WeakKeyError(f"refused Ed25519 public key {self.raw.hex()}: {weakness}")

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


def key_weakness(raw: bytes) -> str | None:
    """Why the 32-byte encoding `raw` is refused as a public key, or None if it is acceptable.

    `y` is the little-endian integer of `raw` without its top bit (the sign of x). Refused, in this order:
    y >= p (a non-canonical encoding); y of a small-order point, whatever the sign bit (this covers the
    identity, the 7 other torsion points and the invalid "x = -0" encodings); no x with x^2 =
    (y^2 - 1) / (d y^2 + 1), i.e. not a point of the curve.
    """
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    if y >= _P:
        return "non-canonical encoding (y >= 2^255 - 19)"
    if y in _SMALL_ORDER_Y:
        return "small-order point (a signature under it can be forged)"
    x2 = (y * y - 1) * pow(_D * y * y + 1, -1, _P) % _P
    if x2 and pow(x2, (_P - 1) // 2, _P) != 1:  # Euler's criterion: x^2 has no square root mod p
        return "not a point on the curve"
    return None


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
    except UnsupportedAlgorithm as exc:
        raise KeyFileError(f"{path}: {_first_line(exc)}; {_NEEDS_PRIVATE}") from exc
    except (ValueError, TypeError) as exc:
        raise KeyFileError(
            f"{path} is not an unencrypted PEM private key ({_first_line(exc)}); {_NEEDS_PRIVATE}"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds {_algorithm(key)} private key; {_NEEDS_PRIVATE}")
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
    except UnsupportedAlgorithm as exc:
        raise KeyFileError(f"{path}: {_first_line(exc)}; {_NEEDS_PUBLIC}") from exc
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a PEM public key ({_first_line(exc)}); {_NEEDS_PUBLIC}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} holds {_algorithm(key)} public key; {_NEEDS_PUBLIC}")
    try:
        return PublicKey(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    except WeakKeyError as exc:
        raise KeyFileError(f"{path}: {exc}") from exc


# ---- Flower SuperNode authentication keys (transport identity; weft's own identity stays Ed25519) ----------


def create_flower_auth_key(private_path: Path, public_path: Path, comment: str = "") -> str:
    """Create a Flower 1.42 SuperNode authentication key pair; return the public key as `TYPE BASE64`.

    ECDSA on NIST P-384, as `ssh-keygen -t ecdsa -b 384` makes: the private key in OpenSSH format
    (`flower-supernode --auth-supernode-private-key`, mode 600), the public key as one OpenSSH line
    (`flwr supernode register`). Neither file is ever overwritten.
    """
    for path in (private_path, public_path):
        if path.exists():
            raise KeyFileError(f"{path} already exists; refusing to overwrite a key")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _create(private_path, private, 0o600)
    _create(public_path, public + (f" {comment}".encode() if comment else b"") + b"\n", 0o644)
    return public.decode()


def flower_auth_public_key(text: str) -> str:
    """Check an OpenSSH public key line for Flower SuperNode auth; return it as `TYPE BASE64` (no comment).

    Raises ValueError unless it is an ECDSA key on a NIST curve (what `flwr supernode register` accepts).
    """
    try:
        key = serialization.load_ssh_public_key(text.strip().encode())
    except (ValueError, UnsupportedAlgorithm, UnicodeEncodeError, NotImplementedError) as exc:
        # cryptography raises NotImplementedError for an ECDSA key line with a compressed point
        raise ValueError(f"not an OpenSSH public key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, FLOWER_AUTH_CURVES):
        raise ValueError("Flower SuperNode auth needs an ECDSA key on a NIST curve (e.g. ecdsa-sha2-nistp384)")
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def load_flower_auth_public_key(path: Path) -> str:
    """Read a Flower auth public key file (one OpenSSH line) as `TYPE BASE64`; errors name the file."""
    data = _read_key_file(path, "Flower auth public key")
    try:
        return flower_auth_public_key(data.decode("ascii"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise KeyFileError(
            f"{path}: {_first_line(exc)}; expected one OpenSSH line 'ecdsa-sha2-nistp384 AAAA...' "
            "(NAME.flower.pub from `weft keys new --kind node`)"
        ) from exc


_NEEDS_PRIVATE = "weft needs an Ed25519 key (a PKCS#8 PEM private key): create one with `weft keygen`"
_NEEDS_PUBLIC = "weft needs an Ed25519 key (a PEM public key): the NAME.pub that `weft keygen` writes"


def _algorithm(key: object) -> str:
    """'an RSA', 'an EC (secp256r1)', 'an Ed448' ...: what a loaded key is, for a message."""
    kinds: tuple[tuple[tuple[type, ...], str], ...] = (
        ((rsa.RSAPrivateKey, rsa.RSAPublicKey), "an RSA"),
        ((ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey), "an EC"),
        ((dsa.DSAPrivateKey, dsa.DSAPublicKey), "a DSA"),
        ((ed448.Ed448PrivateKey, ed448.Ed448PublicKey), "an Ed448"),
        ((x25519.X25519PrivateKey, x25519.X25519PublicKey), "an X25519"),
        ((x448.X448PrivateKey, x448.X448PublicKey), "an X448"),
    )
    text = next((label for types, label in kinds if isinstance(key, types)), f"a {type(key).__name__}")
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        text += f" ({key.curve.name})"
    return text


def _first_line(exc: BaseException) -> str:
    """The exception's message on one line."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _create(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as exc:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key") from exc
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _read_key_file(path: Path, what: str) -> bytes:
    if path.is_dir():
        raise KeyFileError(f"{what} file {path} is a folder; give the key file itself")
    if not path.is_file():
        raise KeyFileError(f"{what} file {path} does not exist; create one with `weft keygen`")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} file {path}: {exc.strerror}") from exc
