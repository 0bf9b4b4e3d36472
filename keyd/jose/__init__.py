"""keyd's strict JOSE layer.

Signing and JWE key unwrapping go through callables (the private key stays in
the backend); verification of incoming tokens applies keyd's own allow-lists
before any library or key sees the token.  Every failure is a keyd.errors type.

- compact: strict base64url, header parsing (no duplicates, bounded)
- jwks:    kid schemes, x5t#S256 and x5c, our public JWKs, the JWKS document
- keys:    counterparties' JWKs read into typed IssuerKeys
- jws:     making JWS, JWTs and client assertions
- jwe:     decrypting JWE addressed to us
- verify:  verifying counterparties' JWS and JWT claims
- links:   PayNet's universal link
"""

from keyd.jose.compact import (
    b64u_decode,
    b64u_encode,
    json_object_content,
    read_content,
    strict_json,
)
from keyd.jose.jwe import CekDecrypter, JweResult, decrypt_jwe, parse_jwe_header
from keyd.jose.jwks import (
    cert_thumbprint,
    jwks_document,
    kid_for,
    public_jwk,
    same_public_key,
    x5c,
)
from keyd.jose.jws import (
    PROTECTED_HEADER_NAMES,
    Signer,
    client_assertion,
    sign_jws,
    sign_jwt,
)
from keyd.jose.keys import IssuerKey, issuer_key
from keyd.jose.links import UniversalLink, parse_universal_link, universal_link_consent
from keyd.jose.verify import (
    VerifiedJws,
    check_time_claims,
    verify_jws,
    verify_jwt_claims,
)

__all__ = [
    "PROTECTED_HEADER_NAMES",
    "CekDecrypter",
    "IssuerKey",
    "JweResult",
    "Signer",
    "UniversalLink",
    "VerifiedJws",
    "b64u_decode",
    "b64u_encode",
    "cert_thumbprint",
    "check_time_claims",
    "client_assertion",
    "decrypt_jwe",
    "issuer_key",
    "json_object_content",
    "jwks_document",
    "kid_for",
    "parse_jwe_header",
    "parse_universal_link",
    "public_jwk",
    "read_content",
    "same_public_key",
    "sign_jws",
    "sign_jwt",
    "strict_json",
    "universal_link_consent",
    "verify_jws",
    "verify_jwt_claims",
    "x5c",
]
