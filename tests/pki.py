"""Certificates made by the tests (no key is ever committed): a CA, a server certificate
for localhost / 127.0.0.1 and a client certificate it signed, and a stranger CA whose
client certificate the server must refuse."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_FOR = datetime.timedelta(days=2)


@dataclass(frozen=True)
class Identity:
    certificate: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: Identity
    client: Identity
    stranger: Identity  # signed by a CA the server does not trust
    stranger_ca: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, path: Path) -> Path:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    path.chmod(0o600)
    return path


def _write_certificate(certificate: x509.Certificate, path: Path) -> Path:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path


def _builder(
    subject: str, issuer: str, public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALID_FOR)
    )


def _authority(name: str, folder: Path) -> tuple[ec.EllipticCurvePrivateKey, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        _builder(name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, _write_certificate(certificate, folder / f"{name}.pem")


def _issue(
    name: str,
    issuer: tuple[ec.EllipticCurvePrivateKey, str],
    usage: x509.ObjectIdentifier,
    folder: Path,
    server: bool = False,
) -> Identity:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(name, issuer[1], key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    certificate = builder.sign(issuer[0], hashes.SHA256())
    return Identity(
        _write_certificate(certificate, folder / f"{name}.pem"),
        _write_key(key, folder / f"{name}.key"),
    )


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca = _authority("abdoserve-test-ca", folder)
    stranger_key, stranger_ca = _authority("stranger-ca", folder)
    signer = (ca_key, "abdoserve-test-ca")
    return Pki(
        ca=ca,
        server=_issue("server", signer, ExtendedKeyUsageOID.SERVER_AUTH, folder, server=True),
        client=_issue("client", signer, ExtendedKeyUsageOID.CLIENT_AUTH, folder),
        stranger=_issue(
            "stranger", (stranger_key, "stranger-ca"), ExtendedKeyUsageOID.CLIENT_AUTH, folder
        ),
        stranger_ca=stranger_ca,
    )


def make_rsa_server(folder: Path) -> Identity:
    """A self-signed RSA server certificate: the only kind that can agree on the old
    RSA-key-exchange suites (AES128-SHA), which an ECDSA certificate never offers."""
    folder.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    certificate = _builder("rsa-server", "rsa-server", key.public_key()).sign(key, hashes.SHA256())
    return Identity(
        _write_certificate(certificate, folder / "rsa-server.pem"),
        _write_key(key, folder / "rsa-server.key"),
    )
