"""Our public keys as JWKs: kid schemes, JWK members, the JWKS document."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keyd.errors import BadRequest
from keyd.jose.compact import MAX_KID_CHARS, b64u_encode, show
from keyd.model import KidScheme


def _uint(value: int) -> str:
    """A JWK unsigned integer: big-endian, minimal length (RFC 7518 6.3.1)."""
    return b64u_encode(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def _thumbprint_input(public_key: rsa.RSAPublicKey) -> bytes:
    """RFC 7638 3.2: the required members only, sorted, no whitespace."""
    numbers = public_key.public_numbers()
    members = {"e": _uint(numbers.e), "kty": "RSA", "n": _uint(numbers.n)}
    return json.dumps(members, sort_keys=True, separators=(",", ":")).encode("ascii")


def cert_thumbprint(cert: x509.Certificate) -> str:
    """``x5t#S256``: base64url (no padding) SHA-256 of the certificate's DER."""
    return b64u_encode(hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest())


def x5c(chain: list[x509.Certificate]) -> list[str]:
    """JWK ``x5c``: standard base64 (with padding, not base64url) DER, leaf
    first (RFC 7517 4.7)."""
    return [
        base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode("ascii") for c in chain
    ]


def same_public_key(a: object, b: object) -> bool:
    """Both the same RSA key, or both the same EC key (curve and point)."""
    if isinstance(a, rsa.RSAPublicKey) and isinstance(b, rsa.RSAPublicKey):
        return a.public_numbers() == b.public_numbers()
    if isinstance(a, ec.EllipticCurvePublicKey) and isinstance(b, ec.EllipticCurvePublicKey):
        return a.public_numbers() == b.public_numbers()
    return False


def kid_for(
    scheme: KidScheme,
    cert: x509.Certificate | None,
    public_key: rsa.RSAPublicKey,
    assigned: str | None = None,
) -> str:
    """The kid a key is published under, by the ecosystem's scheme (SPEC "Key kinds")."""
    if scheme is KidScheme.X5T_S256:
        if cert is None:
            raise BadRequest("kid scheme x5t#S256 needs the key's certificate")
        # A thumbprint of someone else's certificate would name the wrong key.
        if not same_public_key(public_key, cert.public_key()):
            raise BadRequest("the certificate's public key is not this key")
        return cert_thumbprint(cert)
    if scheme is KidScheme.RFC7638:
        return b64u_encode(hashlib.sha256(_thumbprint_input(public_key)).digest())
    if scheme is KidScheme.OB_UK:
        # UK OB directory: the RFC 7638 thumbprint computed with SHA-1 (27 chars).
        digest = hashlib.sha1(_thumbprint_input(public_key), usedforsecurity=False).digest()
        return b64u_encode(digest)
    if scheme is KidScheme.ASSIGNED:
        if not isinstance(assigned, str) or not assigned.strip():
            raise BadRequest("kid scheme 'assigned' needs the directory-assigned kid")
        if (
            len(assigned) > MAX_KID_CHARS
            or not assigned.isprintable()
            or assigned != assigned.strip()
        ):
            raise BadRequest(
                f"assigned kid {show(assigned)} is not a printable string "
                f"of at most {MAX_KID_CHARS} characters"
            )
        return assigned
    raise BadRequest(f"unknown kid scheme {show(scheme)}")


def public_jwk(
    public_key: rsa.RSAPublicKey,
    *,
    kid: str,
    use: str,
    alg: str | None,
    chain: list[x509.Certificate],
) -> dict[str, Any]:
    """Public members only: a private number can never reach this dict."""
    numbers = public_key.public_numbers()
    jwk: dict[str, Any] = {
        "kty": "RSA",
        "n": _uint(numbers.n),
        "e": _uint(numbers.e),
        "kid": kid,
        "use": use,
    }
    if alg is not None:
        jwk["alg"] = alg
    if chain:
        if not same_public_key(public_key, chain[0].public_key()):
            raise BadRequest(f"the leaf certificate of kid {show(kid)} does not hold its key")
        jwk["x5c"] = x5c(chain)
        jwk["x5t#S256"] = cert_thumbprint(chain[0])
    return jwk


def jwks_document(keys: list[dict[str, Any]]) -> bytes:
    """Canonical JSON (sorted keys, no spaces): the same keys give the same bytes,
    so an ETag derived from the content survives a restart."""
    return json.dumps({"keys": keys}, sort_keys=True, separators=(",", ":")).encode("utf-8")
