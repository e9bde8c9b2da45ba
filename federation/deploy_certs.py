"""Development TLS material for a weft deployment, and checks on what an operator brings.

`weft coordinator dev-certs --out DIR --host NAME...` writes a development CA (`ca.crt`, `ca.key`)
and a SuperLink server certificate (`server.pem`, `server.key`) signed by it. Real deployments bring
their own certificates; both kinds are checked the same way at start (`check_server_cert`).

The server certificate names `localhost`, `127.0.0.1` and `::1` besides the given hosts: the
ServerApp's SuperExec, `flwr run`, `flwr ls` and `flwr supernode register` all reach the SuperLink
over loopback and verify that name. The CA carries critical BasicConstraints and KeyUsage, and both
certificates carry key identifiers, because Python 3.13's default `VERIFY_X509_STRICT` rejects a CA
without them.

`write_flower_auth_key` writes a SuperNode authentication key pair in the format Flower 1.42 needs
(EC P-384, OpenSSH), the same as `ssh-keygen -t ecdsa -b 384 -N "" -f NAME.flower`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.errors import ConfigError

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.pem", "server.key"
"""File names in a certificate folder (`--certs DIR`)."""
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
"""Names every SuperLink certificate must carry: weft's own tools reach the SuperLink over loopback."""
DEV_VALIDITY_DAYS = 365


@dataclass(frozen=True)
class CertFiles:
    """The three files a SuperLink needs (and a node's root certificate, `ca`)."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_folder(cls, folder: Path) -> CertFiles:
        """The standard names in `folder`; each must exist."""
        files = cls(folder / CA_CERT, folder / SERVER_CERT, folder / SERVER_KEY)
        for path in (files.ca, files.cert, files.key):
            if not path.is_file():
                raise ConfigError(f"certs: {path} does not exist (expected {CA_CERT}, {SERVER_CERT}, {SERVER_KEY})")
        return files


def write_dev_certs(out: Path, hosts: list[str]) -> CertFiles:
    """Write a development CA and a server certificate for `hosts` (plus loopback) into `out`."""
    for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY):
        if (out / name).exists():
            raise FileExistsError(f"{out / name} already exists; refusing to overwrite certificates")
    names = list(dict.fromkeys([*LOOPBACK_NAMES, *hosts]))
    for host in names:
        _check_host(host)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _ca_certificate(ca_key)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _server_certificate(server_key, ca_key, ca_cert, names)
    out.mkdir(parents=True, exist_ok=True)
    _write_private(out / CA_KEY, ca_key)
    _write_private(out / SERVER_KEY, server_key)
    (out / CA_CERT).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (out / SERVER_CERT).write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return CertFiles(out / CA_CERT, out / SERVER_CERT, out / SERVER_KEY)


def check_server_cert(path: Path) -> None:
    """Refuse a server certificate that does not name 127.0.0.1 (weft's tools connect over loopback)."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"certs: {path} is not a PEM certificate ({exc})") from exc
    try:
        ips = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.IPAddress
        )
    except x509.ExtensionNotFound:
        ips = []
    if ipaddress.ip_address("127.0.0.1") not in ips:
        raise ConfigError(
            f"certs: {path} does not name IP 127.0.0.1 in its subjectAltName; the SuperLink's own "
            "ServerApp and weft's flwr calls connect over loopback (see `weft coordinator dev-certs`)"
        )


def write_flower_auth_key(out: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.flower.key (OpenSSH EC P-384 private key, mode 600) and NAME.flower.pub."""
    private, public = out / f"{name}.flower.key", out / f"{name}.flower.pub"
    for path in (private, public):
        if path.exists():
            raise FileExistsError(f"{path} already exists; refusing to overwrite a key")
    key = ec.generate_private_key(ec.SECP384R1())
    out.mkdir(parents=True, exist_ok=True)
    _write_secret(
        private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    openssh = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public.write_bytes(openssh + f" {name}\n".encode())
    return private, public


def check_flower_private_key(path: Path) -> None:
    """Refuse a SuperNode key Flower cannot use (it needs an OpenSSH EC key); the line names the file."""
    if not path.is_file():
        raise ConfigError(f"flower-key: {path} does not exist")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"flower-key: {path} is not an unencrypted OpenSSH private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"flower-key: {path} is not an EC key; Flower needs ecdsa (e.g. ssh-keygen -t ecdsa -b 384)")


def _check_host(host: str) -> None:
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise ConfigError(f"host: {host!r} is not a host name or IP address")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return builder.not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(
        now + dt.timedelta(days=DEV_VALIDITY_DAYS)
    )


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name("weft development CA"))
        .issuer_name(_name("weft development CA"))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    return _validity(builder).sign(key, hashes.SHA384())


def _server_certificate(
    key: ec.EllipticCurvePrivateKey, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, names: list[str]
) -> x509.Certificate:
    sans: list[x509.GeneralName] = []
    for host in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(names[-1] if len(names) > len(LOOPBACK_NAMES) else "localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    return _validity(builder).sign(ca_key, hashes.SHA384())


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_secret(path, pem)


def _write_secret(path: Path, data: bytes) -> None:
    """Create `path` with mode 600 before any byte is written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
