"""Credentials for a secure deployment: a certificate authority, a SuperLink certificate,
and one key pair per SuperNode -- made with the ``cryptography`` package.

- :func:`make_certificates`: a new CA (ECDSA P-384) and a SuperLink certificate it signs
  for the given host names and IP addresses, PEM files as ``flower-superlink
  --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`` and ``flower-supernode
  --root-certificates`` take them.
- :func:`make_supernode_key`: an ECDSA P-384 key pair in OpenSSH format, the format
  Flower's SuperNode authentication reads: the public half is registered with
  ``flwr supernode register``, the private half given to ``flower-supernode
  --auth-supernode-private-key``.

Private keys are written readable by their owner only. The CA's key stays in the same
folder: whoever holds it can sign certificates the SuperNodes will trust.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_FOR = dt.timedelta(days=365)


@dataclass(frozen=True)
class Certificates:
    """PEM files: the CA's certificate (and key), the SuperLink's certificate and key."""

    ca_certificate: Path
    ca_key: Path
    certificate: Path
    key: Path


@dataclass(frozen=True)
class SupernodeKey:
    """One SuperNode's key pair, OpenSSH format."""

    private_key: Path
    public_key: Path


def make_certificates(
    folder: Path, hosts: Sequence[str] = ("localhost", "127.0.0.1")
) -> Certificates:
    """A new CA in ``folder`` and a SuperLink certificate it signs, valid for ``hosts``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fl-ec deployment CA")])
    ca = (
        _builder(ca_name, ca_name, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    certificate = (
        _builder(subject, ca_name, key.public_key(), now)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = Certificates(
        folder / "ca.crt", folder / "ca.key", folder / "superlink.crt", folder / "superlink.key"
    )
    paths.ca_certificate.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.certificate.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    _write_private(paths.ca_key, _pem(ca_key))
    _write_private(paths.key, _pem(key))
    return paths


def make_supernode_key(folder: Path, name: str) -> SupernodeKey:
    """A new key pair ``<name>`` / ``<name>.pub`` in ``folder`` for SuperNode authentication."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    paths = SupernodeKey(folder / name, folder / f"{name}.pub")
    _write_private(
        paths.private_key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    paths.public_key.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return paths


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, now: dt.datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate a little clock skew
        .not_valid_after(now + VALID_FOR)
    )


def _key_usage(signs_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not signs_certificates,  # ECDHE key exchange for the server
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
