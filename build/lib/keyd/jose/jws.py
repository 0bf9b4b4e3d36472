"""Making JWS and JWTs with a key held in a backend.

The private key never reaches Python: a ``Signer`` returns the PS256
signature (RSASSA-PSS, SHA-256, MGF1-SHA256, 32-byte salt) over the JWS
signing input, and keyd builds every security-relevant header itself.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from keyd.errors import BadRequest, Forbidden
from keyd.jose.compact import MAX_HEADER_BYTES, b64u_encode, show

Signer = Callable[[bytes], bytes]

# Headers that decide how a token is verified or which key is used: keyd sets
# them, a caller never does (THREATS "escalation": caller-set alg, jku, crit).
PROTECTED_HEADER_NAMES = frozenset(
    {"alg", "kid", "crit", "b64", "jku", "jwk", "x5u", "x5c", "x5t", "x5t#S256", "zip", "enc"}
)
MESSAGE_CLAIMS = ("iss", "iat", "jti")  # PayNet's message-signing profile, named in crit
MAX_TTL = 86400
ASSERTION_TTL = 600  # private_key_jwt: exp = iat + 600 (PayNet)


def _json(value: Any, what: str) -> bytes:
    try:
        return json.dumps(
            value, separators=(",", ":"), allow_nan=False, ensure_ascii=False
        ).encode()
    except (TypeError, ValueError, RecursionError) as e:
        raise BadRequest(f"{what} is not serialisable as JSON: {e}") from e


def _timestamp(now: datetime) -> int:
    if now.tzinfo is None:
        raise BadRequest("now must be timezone-aware")
    return int(now.timestamp())


def _compact(signer: Signer, header: dict[str, Any], payload: bytes, *, detached: bool) -> str:
    encoded_header = _json(header, "the JWS header")
    if len(encoded_header) > MAX_HEADER_BYTES:
        raise BadRequest(f"the JWS header is over {MAX_HEADER_BYTES} bytes")
    h = b64u_encode(encoded_header)
    p = b64u_encode(payload)
    signature = signer(f"{h}.{p}".encode("ascii"))
    return f"{h}..{b64u_encode(signature)}" if detached else f"{h}.{p}.{b64u_encode(signature)}"


def _check_extra(extra: Mapping[str, Any] | None, reserved: frozenset[str]) -> dict[str, Any]:
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise BadRequest(f"header must be a JSON object, not {type(extra).__name__}")
    for name in extra:
        if not isinstance(name, str):
            raise BadRequest(f"header member names are strings, not {show(name)}")
        if name in reserved:
            raise Forbidden(f"header member {show(name)} is set by keyd")
    return dict(extra)


def sign_jws(
    signer: Signer,
    kid: str,
    payload: bytes,
    *,
    extra_header: Mapping[str, Any] | None = None,
    detached: bool = False,
    claims_in_header: bool = False,
    iss: str | None = None,
    now: datetime | None = None,
) -> str:
    """A PS256 compact JWS; ``detached`` gives ``header..signature``.

    ``claims_in_header`` is PayNet's message-signing profile: the protected
    header also carries ``iss``, ``iat`` and a fresh ``jti``, and ``crit``
    names them so a verifier that does not check them must refuse the token.
    """
    if not isinstance(payload, bytes):
        raise BadRequest(f"the JWS payload must be bytes, not {type(payload).__name__}")
    reserved = PROTECTED_HEADER_NAMES | (
        frozenset(MESSAGE_CLAIMS) if claims_in_header else frozenset()
    )
    header: dict[str, Any] = {"alg": "PS256", "kid": kid, **_check_extra(extra_header, reserved)}
    if claims_in_header:
        if not isinstance(iss, str) or not iss:
            raise BadRequest("claims_in_header needs the issuer (iss)")
        if now is None:
            raise BadRequest("claims_in_header needs the current time")
        header.update(
            {
                "iss": iss,
                "iat": _timestamp(now),
                "jti": str(uuid.uuid4()),
                "crit": list(MESSAGE_CLAIMS),
            }
        )
    return _compact(signer, header, payload, detached=detached)


def _check_ttl(ttl: object) -> int:
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 1 <= ttl <= MAX_TTL:
        raise BadRequest(f"ttl must be an integer from 1 to {MAX_TTL} seconds, not {show(ttl)}")
    return ttl


def sign_jwt(
    signer: Signer, kid: str, claims: Mapping[str, Any], *, ttl: int, now: datetime
) -> str:
    """A PS256 JWT; ``iat``, ``exp`` (= iat + ttl) and ``jti`` are added where absent."""
    ttl = _check_ttl(ttl)
    if not isinstance(claims, Mapping):
        raise BadRequest(f"claims must be a JSON object, not {type(claims).__name__}")
    body = dict(claims)
    for name in ("iat", "exp", "nbf"):
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise BadRequest(f"claim {name} must be an integer NumericDate, not {show(value)}")
    body.setdefault("iat", _timestamp(now))
    body.setdefault("exp", body["iat"] + ttl)
    body.setdefault("jti", str(uuid.uuid4()))
    header = {"alg": "PS256", "kid": kid, "typ": "JWT"}
    return _compact(signer, header, _json(body, "the JWT claims"), detached=False)


def client_assertion(
    signer: Signer, kid: str, *, client_id: str, audience: str, now: datetime
) -> str:
    """A ``private_key_jwt`` client assertion exactly as PayNet specifies it."""
    if not isinstance(client_id, str) or not client_id:
        raise BadRequest("client_id must be a non-empty string")
    if not isinstance(audience, str) or not audience:
        raise BadRequest("audience must be a non-empty string")
    iat = _timestamp(now)
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "iat": iat,
        "exp": iat + ASSERTION_TTL,
        "jti": str(uuid.uuid4()),
    }
    header = {"alg": "PS256", "kid": kid}
    return _compact(signer, header, _json(claims, "the assertion claims"), detached=False)
