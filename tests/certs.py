"""Certificates for tests, made directly with cryptography."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


def self_signed(key: rsa.RSAPrivateKey, now: datetime, name: str = "keyd test",
                days: int = 397) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=days))
        .sign(key, hashes.SHA256())
    )


def ca_sign(csr_pem: bytes, ca: str = "Console Test CA") -> tuple[bytes, str]:
    """A fresh CA's certificate (PEM, 397 days) for the CSR, and the CA's name."""
    csr = x509.load_pem_x509_csr(csr_pem)
    ca_key = rsa.generate_private_key(65537, 2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca)])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(ca_name)
            .public_key(csr.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=397))
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), ca
