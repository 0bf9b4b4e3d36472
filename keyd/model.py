"""Value types shared by every layer.  Capabilities live on the types."""

from __future__ import annotations

from enum import StrEnum


class Mode(StrEnum):
    SANDBOX = "sandbox"
    PRODUCTION = "production"


class Purpose(StrEnum):
    TRANSPORT = "transport"
    SIGNING = "signing"
    ENCRYPTION = "encryption"

    @property
    def jwk_use(self) -> str:
        return {"transport": "tls", "signing": "sig", "encryption": "enc"}[self.value]

    @property
    def jwk_alg(self) -> str | None:
        """The `alg` published in the JWKS (transport keys carry none)."""
        return {
            "transport": None, "signing": "PS256", "encryption": OaepHash.SHA256.jwe_alg
        }[self.value]

    @property
    def signs_tokens(self) -> bool:
        return self is Purpose.SIGNING

    @property
    def decrypts_tokens(self) -> bool:
        return self is Purpose.ENCRYPTION


class KeyState(StrEnum):
    AWAITING_CERTIFICATE = "awaiting_certificate"
    PENDING = "pending"
    ACTIVE = "active"
    RETIRED = "retired"
    DESTROYED = "destroyed"
    REVOKED = "revoked"

    @property
    def published(self) -> bool:
        """In the public JWKS (SPEC invariant: pending, active and retired)."""
        return self in (KeyState.PENDING, KeyState.ACTIVE, KeyState.RETIRED)

    @property
    def may_sign(self) -> bool:
        return self is KeyState.ACTIVE

    @property
    def may_decrypt(self) -> bool:
        """A JWE addressed to any published kid decrypts."""
        return self.published


class SignScheme(StrEnum):
    """The RSA signature schemes a backend must offer."""

    PSS_SHA256 = "pss-sha256"  # JWS PS256: MGF1-SHA256, salt length 32 (= hash)
    PKCS1V15_SHA256 = "pkcs1v15-sha256"  # X.509 certificates and CSRs


class OaepHash(StrEnum):
    """The OAEP digests JWE key management may use (MGF1 uses the same digest)."""

    SHA256 = "sha256"  # RSA-OAEP-256
    SHA1 = "sha1"  # RSA-OAEP

    @property
    def jwe_alg(self) -> str:
        """The JWE ``alg`` of RSA-OAEP with this digest (RFC 7518 4.3)."""
        return {"sha256": "RSA-OAEP-256", "sha1": "RSA-OAEP"}[self.value]

    @classmethod
    def by_jwe_alg(cls) -> dict[str, OaepHash]:
        """JWE ``alg`` -> digest: the key management algorithms keyd decrypts."""
        return {h.jwe_alg: h for h in cls}


class KidScheme(StrEnum):
    X5T_S256 = "x5t#S256"  # PayNet: the certificate's SHA-256 thumbprint
    RFC7638 = "rfc7638"  # RFC 7638 JWK thumbprint, SHA-256
    OB_UK = "ob-uk"  # UK OB directory: RFC 7638 thumbprint with SHA-1
    ASSIGNED = "assigned"  # a directory assigns it; pinned at certificate import


# JWK members that hold private or secret key material (RFC 7518 6.3.2, 6.4):
# never published, never logged, and a counterparty's JWK carrying one is dropped.
# The JWS algorithms an issuer's allow-list ([issuers.<name>] algorithms) may
# name; keyd.jose.verify holds how each is checked.  RS256 (PKCS#1 v1.5), HS*
# and "none" are absent on purpose.
ISSUER_ALGORITHMS = frozenset({"PS256", "PS384", "PS512", "ES256", "ES384", "ES512"})

PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

# The smallest RSA modulus keyd makes, publishes, imports a certificate for or
# verifies a counterparty's signature with (NIST SP 800-131A: 112-bit security).
MIN_RSA_BITS = 2048
ALLOWED_KEY_SIZES = (MIN_RSA_BITS, 3072, 4096)
