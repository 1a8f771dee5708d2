"""Credentials for a secure deployment: a CA-signed SuperLink certificate, SuperNode keys."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_ssh_private_key,
    load_ssh_public_key,
)

from fl_ec.credentials import make_certificates, make_supernode_key
from fl_ec.deploy import up
from fl_ec.errors import FlEcError


def test_the_superlink_certificate_is_signed_by_the_new_ca_for_loopback(tmp_path):
    paths = make_certificates(tmp_path)
    ca = x509.load_pem_x509_certificate(paths.ca_certificate.read_bytes())
    certificate = x509.load_pem_x509_certificate(paths.certificate.read_bytes())
    certificate.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    for key in (paths.key, paths.ca_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_a_supernode_key_pair_is_openssh_ecdsa_as_flower_reads_it(tmp_path):
    key = make_supernode_key(tmp_path, "node-0")
    private = load_ssh_private_key(key.private_key.read_bytes(), password=None)
    public = load_ssh_public_key(key.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert key.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert stat.S_IMODE(key.private_key.stat().st_mode) == 0o600


def test_authentication_without_tls_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(FlEcError, match="--auth needs --tls"):
        up(2, tmp_path / "deploy", tmp_path / "home", tls=False, auth=True)
    assert not (tmp_path / "deploy").exists()
