"""Certificates and CSRs signed through a backend, and the checks on imported chains."""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keyd.backends.base import GeneratedKey
from keyd.backends.local import LocalBackend
from keyd.config import KeydSettings
from keyd.errors import BackendError, CertificateError
from keyd.jose.jwks import cert_thumbprint, x5c
from keyd.model import Purpose
from keyd.x509 import (
    BackendPrivateKey,
    Subject,
    chain_pem,
    check_chain,
    load_chain,
    make_csr,
    self_signed,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
YEAR = timedelta(days=397)
SUBJECT = Subject(organisation="Example Bhd", client_id="client-123", country="MY")



def test_the_subject_is_read_from_the_keyd_section() -> None:
    keyd = SimpleNamespace(organisation="Example Bhd", client_id="client-123", country="MY",
                           mode="sandbox")
    assert Subject.of(cast(KeydSettings, keyd)) == SUBJECT

@pytest.fixture
def backend(tmp_path: Path) -> Iterator[LocalBackend]:
    backend = LocalBackend(tmp_path / "keys", os.urandom(32))
    yield backend
    backend.close()


@pytest.fixture
def key(backend: LocalBackend) -> GeneratedKey:
    return backend.generate(Purpose.SIGNING, 2048)


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(
    subject_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    *,
    signer: rsa.RSAPrivateKey | None = None,
    subject: x509.Name | None = None,
    issuer: x509.Name | None = None,
    not_before: datetime = NOW - timedelta(days=1),
    validity: timedelta = YEAR,
    ca: bool = False,
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    """A certificate built with cryptography directly, independent of keyd."""
    signer = signer or rsa.generate_private_key(65537, 2048)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject or name("leaf"))
        .issuer_name(issuer or subject or name("leaf"))
        .public_key(subject_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + validity)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(signer, hashes.SHA256())


def pem(*certs: x509.Certificate) -> bytes:
    return chain_pem(list(certs)).encode()


# ------------------------------------------------------------------ making


def test_self_signed_certificate_verifies_and_has_subject_usage_validity(
    backend: LocalBackend, key: GeneratedKey
) -> None:
    cert = self_signed(backend, key.ref, key.public_key, SUBJECT, Purpose.SIGNING, YEAR, NOW)
    cert.verify_directly_issued_by(cert)
    key.public_key.verify(
        cert.signature,
        cert.tbs_certificate_bytes,
        padding.PKCS1v15(),
        hashes.SHA256(),
    )
    assert cert.subject.rfc4514_string() == "CN=client-123,OU=signing,O=Example Bhd,C=MY"
    assert cert.issuer == cert.subject
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=5)
    assert cert.not_valid_after_utc == NOW + YEAR
    assert cert.signature_algorithm_oid == x509.SignatureAlgorithmOID.RSA_WITH_SHA256
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.content_commitment
    assert not usage.key_encipherment and not usage.key_cert_sign
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key)
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert check_chain([cert], key.public_key, NOW, production=False) == []


def test_encryption_certificate_has_encipherment_usages(backend: LocalBackend) -> None:
    key = backend.generate(Purpose.ENCRYPTION, 2048)
    cert = self_signed(backend, key.ref, key.public_key, SUBJECT, Purpose.ENCRYPTION, YEAR, NOW)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_encipherment and usage.data_encipherment
    assert not usage.digital_signature
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == (
        "encryption"
    )


def test_transport_certificate_has_client_and_server_auth(backend: LocalBackend) -> None:
    key = backend.generate(Purpose.TRANSPORT, 2048)
    cert = self_signed(backend, key.ref, key.public_key, SUBJECT, Purpose.TRANSPORT, YEAR, NOW)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}


def test_two_certificates_get_different_serials(backend: LocalBackend, key: GeneratedKey) -> None:
    a = self_signed(backend, key.ref, key.public_key, SUBJECT, Purpose.SIGNING, YEAR, NOW)
    b = self_signed(backend, key.ref, key.public_key, SUBJECT, Purpose.SIGNING, YEAR, NOW)
    assert a.serial_number != b.serial_number


def test_self_signed_refuses_a_public_key_that_is_not_the_refs(
    backend: LocalBackend, key: GeneratedKey
) -> None:
    other = rsa.generate_private_key(65537, 2048).public_key()
    with pytest.raises(BackendError, match=key.ref):
        self_signed(backend, key.ref, other, SUBJECT, Purpose.SIGNING, YEAR, NOW)


def test_csr_verifies_with_subject_and_extensions(backend: LocalBackend, key: GeneratedKey) -> None:
    csr = make_csr(backend, key.ref, key.public_key, SUBJECT, Purpose.TRANSPORT)
    assert csr.is_signature_valid
    csr_key = csr.public_key()
    assert isinstance(csr_key, rsa.RSAPublicKey)
    assert csr_key.public_numbers() == key.public_key.public_numbers()
    assert csr.subject.rfc4514_string() == "CN=client-123,OU=transport,O=Example Bhd,C=MY"
    eku = csr.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    pem_text = csr.public_bytes(serialization.Encoding.PEM)
    assert x509.load_pem_x509_csr(pem_text).is_signature_valid


def test_bad_subject_country_is_certificate_error(backend: LocalBackend, key: GeneratedKey) -> None:
    bad = Subject(organisation="Example Bhd", client_id="c", country="MYS")
    with pytest.raises(CertificateError, match="subject"):
        make_csr(backend, key.ref, key.public_key, bad, Purpose.SIGNING)


def test_backend_private_key_signs_pss_through_the_backend(
    backend: LocalBackend, key: GeneratedKey
) -> None:
    adapter = BackendPrivateKey(backend, key.ref, key.public_key)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
    signature = adapter.sign(b"data", pss, hashes.SHA256())
    key.public_key.verify(
        signature,
        b"data",
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
        hashes.SHA256(),
    )
    assert adapter.key_size == 2048
    assert adapter.public_key() is key.public_key


def test_backend_private_key_refuses_other_schemes_and_private_material(
    backend: LocalBackend, key: GeneratedKey
) -> None:
    adapter = BackendPrivateKey(backend, key.ref, key.public_key)
    refused = [
        (padding.PKCS1v15(), hashes.SHA1()),  # noqa: S303 - refused on purpose
        (padding.PKCS1v15(), hashes.SHA384()),
        (padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=20), hashes.SHA256()),
        (padding.PSS(mgf=padding.MGF1(hashes.SHA1()), salt_length=32), hashes.SHA256()),  # noqa: S303
    ]
    for pad, algorithm in refused:
        with pytest.raises(BackendError, match="SHA-256 only"):
            adapter.sign(b"data", pad, algorithm)
    with pytest.raises(BackendError, match="held by the backend"):
        adapter.private_numbers()
    with pytest.raises(BackendError, match="held by the backend"):
        adapter.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    with pytest.raises(BackendError, match="held by the backend"):
        adapter.decrypt(b"x", padding.PKCS1v15())


# ------------------------------------------------------------------ encoding


def test_thumbprint_pem_and_x5c_encodings(backend: LocalBackend, key: GeneratedKey) -> None:
    cert = self_signed(backend, key.ref, key.public_key, SUBJECT, Purpose.SIGNING, YEAR, NOW)
    der = cert.public_bytes(serialization.Encoding.DER)
    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    assert cert_thumbprint(cert) == expected and len(expected) == 43 and "=" not in expected
    assert x5c([cert]) == [base64.b64encode(der).decode()]
    assert load_chain(chain_pem([cert]).encode()) == [cert]


# ------------------------------------------------------------------ loading


def test_load_chain_reads_pem_chain_in_order_and_single_der() -> None:
    leaf_key = rsa.generate_private_key(65537, 2048)
    a = make_cert(leaf_key.public_key(), subject=name("a"))
    b = make_cert(leaf_key.public_key(), subject=name("b"))
    assert load_chain(pem(a, b)) == [a, b]
    assert load_chain(a.public_bytes(serialization.Encoding.DER)) == [a]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"   \n", "empty"),
        (b"\x30\x82\x01\x00garbage", "neither PEM nor a valid DER"),
        (os.urandom(512), "neither PEM nor a valid DER"),
        (b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", "not a valid"),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "no CERTIFICATE"),
        (b"x" * (64 * 1024 + 1), "at most 65536"),
    ],
)
def test_malformed_input_is_one_clear_certificate_error(data: bytes, reason: str) -> None:
    with pytest.raises(CertificateError, match=reason):
        load_chain(data)


def test_truncated_pem_is_certificate_error() -> None:
    cert = make_cert(rsa.generate_private_key(65537, 2048).public_key())
    whole = pem(cert)
    for cut in (len(whole) // 2, len(whole) - 30):
        with pytest.raises(CertificateError, match="truncated or corrupt"):
            load_chain(whole[:cut])


def test_pem_with_a_private_key_is_refused() -> None:
    private = rsa.generate_private_key(65537, 2048)
    cert = make_cert(private.public_key())
    key_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(CertificateError, match="private key"):
        load_chain(pem(cert) + key_pem)


def test_more_than_ten_certificates_are_refused() -> None:
    cert = make_cert(rsa.generate_private_key(65537, 2048).public_key())
    with pytest.raises(CertificateError, match="11 certificates; at most 10"):
        load_chain(pem(*[cert] * 11))


def test_certificate_with_10000_sans_is_refused_cleanly() -> None:
    """Short names keep the DER under the 64 KiB cap, so the SAN limit is what refuses it."""
    sans: list[x509.GeneralName] = [x509.DNSName("a")] * 10_000
    cert = make_cert(rsa.generate_private_key(65537, 2048).public_key(), sans=sans)
    der = cert.public_bytes(serialization.Encoding.DER)
    assert len(der) < 64 * 1024
    with pytest.raises(CertificateError, match="10000 subject alternative names; at most 100"):
        load_chain(der)
    with pytest.raises(CertificateError, match="10000 subject alternative names"):
        load_chain(pem(cert))


def test_a_hundred_sans_are_accepted() -> None:
    sans: list[x509.GeneralName] = [x509.DNSName(f"h{i}.example") for i in range(100)]
    cert = make_cert(rsa.generate_private_key(65537, 2048).public_key(), sans=sans)
    assert load_chain(pem(cert)) == [cert]


# ------------------------------------------------------------------ checking


@pytest.fixture
def our_cert(backend: LocalBackend, key: GeneratedKey) -> x509.Certificate:
    return self_signed(backend, key.ref, key.public_key, SUBJECT, Purpose.SIGNING, YEAR, NOW)


def test_our_own_certificate_passes_in_production_with_only_a_self_signed_warning(
    key: GeneratedKey, our_cert: x509.Certificate
) -> None:
    warnings = check_chain([our_cert], key.public_key, NOW, production=True)
    assert len(warnings) == 1 and "self-signed" in warnings[0]


def test_certificate_for_another_key_is_refused(our_cert: x509.Certificate) -> None:
    other = rsa.generate_private_key(65537, 2048).public_key()
    with pytest.raises(CertificateError, match="not this key's public key"):
        check_chain([our_cert], other, NOW, production=False)


def test_rsa_1024_is_refused() -> None:
    weak = rsa.generate_private_key(65537, 1024).public_key()  # noqa: S505 - the weak case
    with pytest.raises(CertificateError, match="1024 bits; at least 2048"):
        check_chain([make_cert(weak)], weak, NOW, production=False)


def test_public_exponent_3_is_refused() -> None:
    e3 = rsa.generate_private_key(3, 2048).public_key()
    with pytest.raises(CertificateError, match="exponent is 3; only 65537"):
        check_chain([make_cert(e3)], e3, NOW, production=False)


def test_non_rsa_key_is_refused(key: GeneratedKey) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(CertificateError, match="not RSA"):
        check_chain([make_cert(ec_key)], key.public_key, NOW, production=False)


def test_expired_certificate_is_refused(key: GeneratedKey, our_cert: x509.Certificate) -> None:
    later = NOW + YEAR + timedelta(seconds=1)
    with pytest.raises(CertificateError, match="expired"):
        check_chain([our_cert], key.public_key, later, production=False)


def test_not_yet_valid_certificate_is_refused(
    key: GeneratedKey, our_cert: x509.Certificate
) -> None:
    earlier = NOW - timedelta(minutes=6)
    with pytest.raises(CertificateError, match="not valid before"):
        check_chain([our_cert], key.public_key, earlier, production=False)


def test_short_validity_warns_in_sandbox_and_is_refused_in_production(
    backend: LocalBackend, key: GeneratedKey
) -> None:
    short = self_signed(
        backend, key.ref, key.public_key, SUBJECT, Purpose.SIGNING, timedelta(days=90), NOW
    )
    warnings = check_chain([short], key.public_key, NOW, production=False)
    assert any("90 days" in w and "at least 365" in w for w in warnings)
    with pytest.raises(CertificateError, match="90 days"):
        check_chain([short], key.public_key, NOW, production=True)


def test_near_expiry_is_a_warning(key: GeneratedKey, our_cert: x509.Certificate) -> None:
    late = NOW + YEAR - timedelta(days=10)
    warnings = check_chain([our_cert], key.public_key, late, production=False)
    assert any("expires in 10 days" in w for w in warnings)


@pytest.fixture
def ca() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    ca_key = rsa.generate_private_key(65537, 2048)
    ca_cert = make_cert(
        ca_key.public_key(),
        signer=ca_key,
        subject=name("Test CA"),
        validity=timedelta(days=3650),
        ca=True,
    )
    return ca_key, ca_cert


def test_ca_issued_chain_is_accepted_through_load_and_check(
    backend: LocalBackend, key: GeneratedKey, ca: tuple[rsa.RSAPrivateKey, x509.Certificate]
) -> None:
    ca_key, ca_cert = ca
    csr = make_csr(backend, key.ref, key.public_key, SUBJECT, Purpose.SIGNING)
    rsa_key = csr.public_key()
    assert isinstance(rsa_key, rsa.RSAPublicKey)
    leaf = make_cert(rsa_key, signer=ca_key, subject=csr.subject, issuer=ca_cert.subject)
    chain = load_chain(pem(leaf, ca_cert))
    assert check_chain(chain, key.public_key, NOW, production=True) == []
    assert (
        x5c(chain)[1] == base64.b64encode(ca_cert.public_bytes(serialization.Encoding.DER)).decode()
    )


def test_chain_in_wrong_order_is_refused(
    key: GeneratedKey, ca: tuple[rsa.RSAPrivateKey, x509.Certificate]
) -> None:
    ca_key, ca_cert = ca
    leaf = make_cert(key.public_key, signer=ca_key, subject=name("leaf"), issuer=ca_cert.subject)
    ca_public = ca_cert.public_key()
    assert isinstance(ca_public, rsa.RSAPublicKey)
    with pytest.raises(CertificateError, match="wrong order or wrong issuer"):
        check_chain([ca_cert, leaf], ca_public, NOW, production=False)
    with pytest.raises(CertificateError, match="wrong order or wrong issuer"):
        check_chain([leaf, leaf], key.public_key, NOW, production=False)


def test_chain_with_a_wrong_issuer_name_is_refused(
    key: GeneratedKey, ca: tuple[rsa.RSAPrivateKey, x509.Certificate]
) -> None:
    ca_key, ca_cert = ca
    leaf = make_cert(key.public_key, signer=ca_key, subject=name("leaf"), issuer=name("Other CA"))
    with pytest.raises(CertificateError, match="wrong order or wrong issuer"):
        check_chain([leaf, ca_cert], key.public_key, NOW, production=False)


def test_chain_whose_signature_is_not_the_issuers_is_refused(
    key: GeneratedKey, ca: tuple[rsa.RSAPrivateKey, x509.Certificate]
) -> None:
    """Right issuer name, but signed by an impostor key."""
    _, ca_cert = ca
    impostor = rsa.generate_private_key(65537, 2048)
    leaf = make_cert(key.public_key, signer=impostor, subject=name("leaf"), issuer=ca_cert.subject)
    with pytest.raises(CertificateError, match="not signed by chain certificate 1"):
        check_chain([leaf, ca_cert], key.public_key, NOW, production=False)


def test_chain_whose_issuer_is_not_a_ca_is_refused(key: GeneratedKey) -> None:
    issuer_key = rsa.generate_private_key(65537, 2048)
    not_ca = make_cert(issuer_key.public_key(), signer=issuer_key, subject=name("Not a CA"))
    leaf = make_cert(
        key.public_key, signer=issuer_key, subject=name("leaf"), issuer=name("Not a CA")
    )
    with pytest.raises(CertificateError, match="not a CA"):
        check_chain([leaf, not_ca], key.public_key, NOW, production=False)


def test_expired_intermediate_is_refused(key: GeneratedKey) -> None:
    ca_key = rsa.generate_private_key(65537, 2048)
    old_ca = make_cert(
        ca_key.public_key(),
        signer=ca_key,
        subject=name("Old CA"),
        not_before=NOW - timedelta(days=400),
        validity=timedelta(days=300),
        ca=True,
    )
    leaf = make_cert(key.public_key, signer=ca_key, subject=name("leaf"), issuer=name("Old CA"))
    with pytest.raises(CertificateError, match="chain certificate 1.*expired"):
        check_chain([leaf, old_ca], key.public_key, NOW, production=False)


def test_empty_chain_is_refused(key: GeneratedKey) -> None:
    with pytest.raises(CertificateError, match="empty"):
        check_chain([], key.public_key, NOW, production=False)
