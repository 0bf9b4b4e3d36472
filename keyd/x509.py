"""Certificates and CSRs, signed through whichever backend holds the key.

pyca/cryptography's ``CertificateBuilder.sign`` and
``CertificateSigningRequestBuilder.sign`` accept any ``rsa.RSAPrivateKey``
subclass and call its Python ``sign()``; :class:`BackendPrivateKey` sends that
call to the backend, so the private key never leaves Vault or the HSM.

Certificates that come in (``keyd cert import``) are hostile until checked:
:func:`load_chain` bounds the input and turns every parse failure into one
sentence, :func:`check_chain` refuses a chain that does not fit our key or the
platform's rules (RSA >= 2048, e = 65537, valid now, >= 12 months).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric import utils as asym_utils
from cryptography.hazmat.primitives.asymmetric.padding import AsymmetricPadding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keyd.backends.base import Backend
from keyd.clock import utc
from keyd.errors import BackendError, CertificateError
from keyd.jose.jwks import same_public_key
from keyd.jose.jwks import x5c as x5c  # re-exported: the old import path keeps working
from keyd.model import MIN_RSA_BITS, Purpose, SignScheme

if TYPE_CHECKING:
    from keyd.config import KeydSettings

CLOCK_SKEW = timedelta(minutes=5)  # not_before is backdated so a slow peer accepts it at once
MAX_INPUT = 64 * 1024
MAX_CERTS = 10
MAX_SANS = 100
REQUIRED_EXPONENT = 65537
EXPIRY_WARNING = timedelta(days=30)


class BackendPrivateKey(rsa.RSAPrivateKey):
    """An RSA private key whose only private operation is a backend ``sign``."""

    def __init__(self, backend: Backend, ref: str, public_key: rsa.RSAPublicKey) -> None:
        self._backend = backend
        self._ref = ref
        self._public_key = public_key

    def sign(
        self,
        data: bytes,
        padding: AsymmetricPadding,
        algorithm: asym_utils.Prehashed | hashes.HashAlgorithm | asym_utils.NoDigestInfo,
    ) -> bytes:
        return self._backend.sign(self._ref, data, _scheme(padding, algorithm))

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public_key

    @property
    def key_size(self) -> int:
        return self._public_key.key_size

    def decrypt(self, ciphertext: bytes, padding: AsymmetricPadding) -> bytes:
        raise BackendError("private key held by the backend: decrypt through the backend")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        raise BackendError("private key held by the backend")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        raise BackendError("private key held by the backend")

    def __copy__(self) -> BackendPrivateKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> BackendPrivateKey:
        return self


_PSS_AS_BACKENDS_SIGN = (
    padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
    padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH),
)


def _scheme(
    pad: AsymmetricPadding,
    algorithm: asym_utils.Prehashed | hashes.HashAlgorithm | asym_utils.NoDigestInfo,
) -> SignScheme:
    """The backend scheme for what cryptography asks; only the two every backend offers."""
    if isinstance(algorithm, hashes.SHA256):
        if isinstance(pad, padding.PKCS1v15):
            return SignScheme.PKCS1V15_SHA256
        # Backends sign PSS with MGF1-SHA256 and a 32-byte salt (= the hash
        # length); accept a request only when that is exactly what it asks for.
        if pad in _PSS_AS_BACKENDS_SIGN:
            return SignScheme.PSS_SHA256
    raise BackendError(
        f"backend keys sign PKCS#1 v1.5 or PSS with SHA-256 only, not "
        f"{type(pad).__name__} with {type(algorithm).__name__}"
    )


# ---------------------------------------------------------------------- making


@dataclass(frozen=True)
class Subject:
    organisation: str
    client_id: str
    country: str

    @classmethod
    def of(cls, keyd: KeydSettings) -> Subject:
        """The subject every key of this deployment is certified under ([keyd])."""
        return cls(organisation=keyd.organisation, client_id=keyd.client_id,
                   country=keyd.country)

    def name(self, purpose: Purpose) -> x509.Name:
        try:
            return x509.Name(
                [
                    x509.NameAttribute(NameOID.COUNTRY_NAME, self.country),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.organisation),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, purpose.value),
                    x509.NameAttribute(NameOID.COMMON_NAME, self.client_id),
                ]
            )
        except ValueError as e:
            raise CertificateError(f"certificate subject {self!r} is not usable: {e}") from None


def _key_usage(purpose: Purpose) -> x509.KeyUsage:
    flags = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    on = {
        Purpose.SIGNING: ("digital_signature", "content_commitment"),
        Purpose.ENCRYPTION: ("key_encipherment", "data_encipherment"),
        Purpose.TRANSPORT: ("digital_signature", "key_encipherment"),
    }[purpose]
    flags.update(dict.fromkeys(on, True))
    return x509.KeyUsage(**flags)


def _extensions(
    purpose: Purpose, public_key: rsa.RSAPublicKey
) -> list[tuple[x509.ExtensionType, bool]]:
    """(extension, critical) for a leaf of ``purpose``; shared by certificates and CSRs."""
    exts: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.SubjectKeyIdentifier.from_public_key(public_key), False),
        (_key_usage(purpose), True),
    ]
    if purpose is Purpose.TRANSPORT:
        eku = [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
        exts.append((x509.ExtendedKeyUsage(eku), False))
    return exts


def self_signed(
    backend: Backend,
    ref: str,
    public_key: rsa.RSAPublicKey,
    subject: Subject,
    purpose: Purpose,
    validity: timedelta,
    now: datetime,
) -> x509.Certificate:
    """A self-signed certificate (accepted by the platform in the sandbox)."""
    now = utc(now)
    name = subject.name(purpose)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
    )
    for ext, critical in _extensions(purpose, public_key):
        builder = builder.add_extension(ext, critical=critical)
    cert = builder.sign(BackendPrivateKey(backend, ref, public_key), hashes.SHA256())
    # The backend signed with the key under ``ref``; if that is not the key
    # the certificate names, we must not hand out a certificate that lies.
    try:
        cert.verify_directly_issued_by(cert)
    except (InvalidSignature, ValueError, TypeError) as e:
        raise BackendError(
            f"key {ref}: the backend's signature does not match the given public key"
        ) from e
    return cert


def make_csr(
    backend: Backend,
    ref: str,
    public_key: rsa.RSAPublicKey,
    subject: Subject,
    purpose: Purpose,
) -> x509.CertificateSigningRequest:
    """A PKCS#10 request for a CA, with the same subject and usages as :func:`self_signed`."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject.name(purpose))
    for ext, critical in _extensions(purpose, public_key):
        builder = builder.add_extension(ext, critical=critical)
    csr = builder.sign(BackendPrivateKey(backend, ref, public_key), hashes.SHA256())
    if not same_public_key(csr.public_key(), public_key) or not csr.is_signature_valid:
        raise BackendError(
            f"key {ref}: the backend's signature does not match the given public key"
        )
    return csr


# ---------------------------------------------------------------------- reading

_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"


def load_chain(data: bytes) -> list[x509.Certificate]:
    """PEM (one or more certificates, leaf first) or one DER certificate, bounded."""
    if not data.strip():
        raise CertificateError("no certificate found: the input is empty")
    if len(data) > MAX_INPUT:
        raise CertificateError(
            f"certificate input is {len(data)} bytes; at most {MAX_INPUT} are accepted"
        )
    if b"PRIVATE KEY-----" in data:
        # Someone pasted a key file: refuse rather than silently skip it, so it
        # does not end up stored or logged alongside the chain.
        raise CertificateError("the input contains a private key; give the certificates only")
    if b"-----BEGIN" in data:
        count = data.count(_PEM_BEGIN)
        if count == 0:
            raise CertificateError("the PEM input holds no CERTIFICATE block")
        if count > MAX_CERTS:
            raise CertificateError(f"the chain has {count} certificates; at most {MAX_CERTS}")
        try:
            chain = x509.load_pem_x509_certificates(data)
        except ValueError:
            raise CertificateError(
                "the PEM input is not a valid certificate chain (truncated or corrupt)"
            ) from None
    else:
        try:
            chain = [x509.load_der_x509_certificate(data)]
        except ValueError:
            raise CertificateError("the input is neither PEM nor a valid DER certificate") from None
    for i, cert in enumerate(chain):
        _check_sans(cert, i)
    return chain


def _check_sans(cert: x509.Certificate, index: int) -> None:
    """Parse the extensions now (cryptography is lazy) and cap the SAN count."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    except ValueError:
        raise CertificateError(f"certificate {index} has malformed extensions") from None
    if len(sans) > MAX_SANS:
        raise CertificateError(
            f"certificate {index} has {len(sans)} subject alternative names; at most {MAX_SANS}"
        )


# ---------------------------------------------------------------------- checking


def _describe(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}"


def check_chain(
    chain: list[x509.Certificate],
    public_key: rsa.RSAPublicKey,
    now: datetime,
    *,
    min_validity: timedelta = timedelta(days=365),
    production: bool,
) -> list[str]:
    """Refuse (CertificateError) a chain unfit for our key; return warnings otherwise."""
    if not chain:
        raise CertificateError("the chain is empty")
    now = utc(now)
    leaf = chain[0]
    warnings: list[str] = []

    try:
        leaf_key = leaf.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError("the certificate's public key cannot be parsed") from None
    if not isinstance(leaf_key, rsa.RSAPublicKey):
        raise CertificateError(f"the certificate's key is {type(leaf_key).__name__}, not RSA")
    if leaf_key.key_size < MIN_RSA_BITS:
        raise CertificateError(
            f"the certificate's RSA key is {leaf_key.key_size} bits; at least {MIN_RSA_BITS}"
        )
    e = leaf_key.public_numbers().e
    if e != REQUIRED_EXPONENT:
        # e = 3 is the classic weak exponent (Bleichenbacher's forgeries on
        # sloppy verifiers); the platform and keyd accept 65537 only.
        raise CertificateError(f"the certificate's RSA public exponent is {e}; only 65537")
    if not same_public_key(leaf_key, public_key):
        raise CertificateError("the certificate's public key is not this key's public key")

    for i, cert in enumerate(chain):
        what = "the certificate" if i == 0 else f"chain certificate {i} ({_describe(cert)})"
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        if end <= now:
            raise CertificateError(f"{what} expired at {end.isoformat()}")
        if start > now:
            raise CertificateError(f"{what} is not valid before {start.isoformat()}")

    total = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    if total < min_validity:
        msg = (
            f"the certificate is valid for {total.days} days; the platform requires "
            f"at least {min_validity.days}"
        )
        if production:
            raise CertificateError(msg)
        warnings.append(msg + " (accepted in the sandbox)")
    left = leaf.not_valid_after_utc - now
    if left < EXPIRY_WARNING:
        warnings.append(f"the certificate expires in {left.days} days")

    for i in range(len(chain) - 1):
        _check_link(chain[i], chain[i + 1], i)
    if production and len(chain) == 1 and leaf.issuer == leaf.subject:
        warnings.append("the certificate is self-signed; the platform accepts that in the sandbox")
    return warnings


def _check_link(child: x509.Certificate, parent: x509.Certificate, i: int) -> None:
    """``child`` (chain[i]) must be issued and signed by ``parent`` (chain[i + 1])."""
    if child.issuer != parent.subject:
        raise CertificateError(
            f"chain certificate {i} is issued by {child.issuer.rfc4514_string()!r}, but the "
            f"next one is {parent.subject.rfc4514_string()!r}: wrong order or wrong issuer"
        )
    try:
        constraints = parent.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        constraints = None
    if constraints is None or not constraints.ca:
        raise CertificateError(f"chain certificate {i + 1} is not a CA certificate")
    try:
        child.verify_directly_issued_by(parent)
    except InvalidSignature:
        raise CertificateError(
            f"chain certificate {i} is not signed by chain certificate {i + 1}"
        ) from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CertificateError(
            f"chain certificate {i}'s signature by certificate {i + 1} cannot be verified"
        ) from None


# ---------------------------------------------------------------------- encoding


def chain_pem(chain: list[x509.Certificate]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in chain)
