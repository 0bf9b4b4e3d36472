"""Verifying JWS from counterparties, under allow-lists keyd enforces itself.

Common JOSE libraries' defaults are far wider than keyd's profile (RS256,
duplicate header members, keys from the token's own headers), so every rule
below is checked here *before* any key is looked up, and the signature itself
is checked with pyca/cryptography on the public key of the configured JWKS
(an :class:`~keyd.jose.keys.IssuerKey`).
Order matters: cheap structural refusals first, the key lookup after the
header is known to be acceptable, the replay record only after the
signature is good (otherwise forged tokens could burn genuine jtis).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography import exceptions as crypto_exceptions
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from keyd.errors import BadRequest, InvalidSignature, InvalidToken
from keyd.jose.compact import (
    b64u_decode,
    b64u_encode,
    decode_header,
    header_kid,
    show,
    split_compact,
    strict_json,
)
from keyd.jose.keys import Curve, IssuerKey, KeyFamily, PublicKey
from keyd.model import MIN_RSA_BITS

KeyLookup = Callable[[str], IssuerKey | None]  # IssuerKeys.key
ReplayCheck = Callable[[str, datetime], bool]  # (jti, keep until) -> seen before?


@dataclass(frozen=True)
class _Alg:
    family: KeyFamily
    digest: type[hashes.HashAlgorithm]
    curve: Curve | None = None  # for EC: the one curve this alg signs on


# How each of ISSUER_ALGORITHMS (keyd.model) is checked; the per-issuer
# allow-list narrows them.
_ALGS = {
    "PS256": _Alg(KeyFamily.RSA, hashes.SHA256),
    "PS384": _Alg(KeyFamily.RSA, hashes.SHA384),
    "PS512": _Alg(KeyFamily.RSA, hashes.SHA512),
    "ES256": _Alg(KeyFamily.EC, hashes.SHA256, Curve.P256),
    "ES384": _Alg(KeyFamily.EC, hashes.SHA384, Curve.P384),
    "ES512": _Alg(KeyFamily.EC, hashes.SHA512, Curve.P521),
}
# A token never names its own key: only the configured JWKS counts, and we make
# no outbound request on a token's say-so (SSRF to 169.254.169.254 and friends).
_KEY_FROM_TOKEN = ("jku", "x5u", "jwk", "x5c")
# JWE-only parameters have no meaning in a JWS; one carrying them is a confused
# or crafted token (a JWE header grafted onto a signature), so it is refused.
_JWE_ONLY = ("enc", "zip", "p2c", "p2s", "epk", "apu", "apv", "iv", "tag")
# RFC 7515 4.1.11: crit must not name header parameters the JWS spec defines.
_STANDARD_NAMES = frozenset(
    {
        "alg",
        "jku",
        "jwk",
        "kid",
        "x5u",
        "x5c",
        "x5t",
        "x5t#S256",
        "typ",
        "cty",
        "crit",
        "enc",
        "zip",
    }
)
# What keyd understands: RFC 7797 b64 and PayNet's message-signing claims.
_UNDERSTOOD_CRIT = frozenset({"b64", "iss", "iat", "jti"})
MAX_JTI_CHARS = 256


@dataclass(frozen=True)
class VerifiedJws:
    header: dict[str, Any]
    payload: bytes
    kid: str


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_crit(header: dict[str, Any]) -> frozenset[str]:
    if "crit" not in header:
        return frozenset()
    crit = header["crit"]
    if not isinstance(crit, list) or not crit:
        raise InvalidToken(f"crit must be a non-empty list of names, not {show(crit)}")
    names: set[str] = set()
    for name in crit:
        if not isinstance(name, str) or name in names:
            raise InvalidToken(f"crit holds {show(name)}: names must be distinct strings")
        if name in _STANDARD_NAMES:
            raise InvalidToken(f"crit must not name the standard header {show(name)}")
        if name not in _UNDERSTOOD_CRIT:
            raise InvalidToken(f"crit names {show(name)}, which keyd does not understand")
        if name not in header:
            raise InvalidToken(f"crit names {show(name)} but the header does not carry it")
        names.add(name)
    return frozenset(names)


def _check_b64(header: dict[str, Any], crit: frozenset[str]) -> bool:
    """RFC 7797: b64 is a boolean, and b64=false only counts when crit names it."""
    if "b64" not in header:
        return True
    b64 = header["b64"]
    if not isinstance(b64, bool):
        raise InvalidToken(f"b64 must be true or false, not {show(b64)}")
    if not b64 and "b64" not in crit:
        # A verifier unaware of RFC 7797 would read the payload differently.
        raise InvalidToken("b64=false must be named in crit")
    return b64


def _check_iat(
    header: dict[str, Any], now: datetime, max_future: timedelta, max_age: timedelta | None
) -> int | None:
    if "iat" not in header:
        return None
    iat = header["iat"]
    if not _is_int(iat):
        raise InvalidToken(f"iat must be an integer NumericDate, not {show(iat)}")
    current = int(now.timestamp())
    if iat > current + int(max_future.total_seconds()):
        raise InvalidToken(f"iat {iat} is {iat - current} s in the future")
    if max_age is not None and iat < current - int(max_age.total_seconds()):
        raise InvalidToken(
            f"iat {iat} is {current - iat} s old; the limit is {int(max_age.total_seconds())} s"
        )
    return int(iat)


def _check_jti(header: dict[str, Any]) -> str | None:
    if "jti" not in header:
        return None
    jti = header["jti"]
    if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_CHARS:
        raise InvalidToken(
            f"jti must be a string of 1 to {MAX_JTI_CHARS} characters, not {show(jti)}"
        )
    return jti


def _check_required(header: dict[str, Any], require: Sequence[str]) -> None:
    missing = [name for name in require if name not in header]
    if missing:
        raise InvalidToken(
            f"the header lacks {', '.join(missing)}, which this issuer's profile requires"
        )


def _check_iss(header: dict[str, Any], expected: str | None) -> None:
    if "iss" not in header:
        return
    if not isinstance(header["iss"], str) or not header["iss"]:
        raise InvalidToken(f"iss must be a non-empty string, not {show(header['iss'])}")
    if expected is not None and header["iss"] != expected:  # exact: no substrings, no case games
        raise InvalidToken(f"iss {show(header['iss'])} is not this issuer's ({expected!r})")


def _payload(segment: str, payload_b64: str | None, b64: bool) -> tuple[bytes, bytes]:
    """(payload bytes, the payload part of the signing input)."""
    if segment == "":
        if payload_b64 is None:
            raise BadRequest("a detached JWS needs the payload it signs (payload_b64)")
        payload = b64u_decode(payload_b64, BadRequest, "payload_b64")
        # RFC 7797: with b64=false the signing input holds the raw payload bytes.
        return payload, (b64u_encode(payload).encode("ascii") if b64 else payload)
    if not b64:
        raise InvalidToken("b64=false is accepted only with a detached payload")
    payload = b64u_decode(segment, InvalidToken, "the JWS payload")
    if payload_b64 is not None and payload_b64 != segment:
        raise InvalidToken("payload_b64 differs from the payload the JWS carries")
    return payload, segment.encode("ascii")


def _public_key(key: IssuerKey | None, alg: str, kid: str) -> PublicKey:
    """The verification key, refused unless its type, curve and use fit ``alg``."""
    spec = _ALGS[alg]
    if not isinstance(key, IssuerKey):
        raise InvalidSignature(f"kid {show(kid)} has no usable key")
    if key.use is not None and key.use != "sig":
        raise InvalidToken(f"kid {show(kid)} is a {show(key.use)} key, not a signing key")
    if key.key_ops is not None and "verify" not in key.key_ops:
        raise InvalidToken(f"kid {show(kid)} does not allow verify (key_ops {show(key.key_ops)})")
    if key.alg not in (None, alg):
        raise InvalidToken(f"kid {show(kid)} is pinned to alg {show(key.alg)}, not {alg}")
    if key.family is not spec.family or key.curve is not spec.curve:
        raise InvalidToken(
            f"alg {alg} needs a {spec.family} {spec.curve or ''} key; kid {show(kid)} is "
            f"{key.family} {key.curve or ''}".replace("  ", " ").rstrip()
        )
    if isinstance(key.public, rsa.RSAPublicKey) and key.public.key_size < MIN_RSA_BITS:
        raise InvalidToken(f"kid {show(kid)} is not an RSA key of at least {MIN_RSA_BITS} bits")
    return key.public


def _check_signature(public: PublicKey, alg: str, signature: bytes, data: bytes) -> None:
    spec = _ALGS[alg]
    digest = spec.digest()
    try:
        if isinstance(public, rsa.RSAPublicKey):
            # RFC 7518 3.3/3.5 and RFC 8017 8.1.2: the signature is exactly as
            # long as the modulus.  OpenSSL pads a short one with leading zeros
            # and accepts it, which makes two encodings of one signature.
            size = (public.key_size + 7) // 8
            if len(signature) != size:
                raise InvalidSignature(
                    f"an {alg} signature with this key is {size} bytes, not {len(signature)}"
                )
            # RFC 7518 3.5: the PSS salt is as long as the hash output.
            pss = padding.PSS(mgf=padding.MGF1(spec.digest()), salt_length=digest.digest_size)
            public.verify(signature, data, pss, digest)
            return
        coord = spec.curve.coordinate_bytes if spec.curve else 0
        if len(signature) != 2 * coord:  # JWS ECDSA is raw r||s, fixed length
            raise InvalidSignature(f"an {alg} signature is {2 * coord} bytes, not {len(signature)}")
        r = int.from_bytes(signature[:coord], "big")
        s = int.from_bytes(signature[coord:], "big")
        public.verify(encode_dss_signature(r, s), data, ec.ECDSA(digest))
    except (crypto_exceptions.InvalidSignature, ValueError) as e:
        raise InvalidSignature("the JWS signature does not verify") from e


def verify_jws(
    compact: str,
    keys: KeyLookup,
    *,
    algorithms: Sequence[str],
    now: datetime,
    payload_b64: str | None = None,
    iat_max_age: timedelta | None = None,
    max_future: timedelta = timedelta(seconds=10),
    replay: ReplayCheck | None = None,
    expected_iss: str | None = None,
    require: Sequence[str] = (),
    check_payload: Callable[[bytes], None] | None = None,
) -> VerifiedJws:
    """Verify a compact (or detached, ``h..s``) JWS against the issuer's keys.

    ``expected_iss``: when given, a header ``iss`` must equal it exactly;
    without it a ``crit`` naming ``iss`` is refused, since nothing here could
    validate the value that ``crit`` says must be understood.  ``require``:
    header members every message of this issuer carries.  With ``replay``, a
    ``jti`` is remembered until its ``iat`` leaves the accepted window, so a
    ``jti`` without ``iat`` (no bound on how long to remember it) is refused.
    ``check_payload`` runs on the verified payload before the jti is
    recorded, so a token refused for its claims changes nothing.
    """
    if isinstance(algorithms, str):  # "PS256" is a Sequence too; never match substrings
        algorithms = (algorithms,)
    h_seg, p_seg, s_seg = split_compact(compact, 3, "JWS")
    header = decode_header(h_seg, "JWS")
    alg = header.get("alg")
    # Case-sensitive membership: "none", "None", "HS256", "RS256" all stop here,
    # before any key is looked up.
    if not isinstance(alg, str) or alg not in algorithms or alg not in _ALGS:
        allowed = sorted(a for a in algorithms if a in _ALGS)
        raise InvalidToken(f"alg {show(alg)} is not accepted from this issuer (allowed: {allowed})")
    for name in _KEY_FROM_TOKEN:
        if name in header:
            raise InvalidToken(f"header {name!r} is refused: keys come only from the issuer's JWKS")
    for name in _JWE_ONLY:
        if name in header:
            raise InvalidToken(f"header {name!r} belongs to a JWE, not a JWS")
    kid = header_kid(header, "JWS")
    _check_required(header, require)
    crit = _check_crit(header)
    if "iss" in crit and expected_iss is None:
        raise InvalidToken(
            "crit names iss, but no expected iss is configured for this issuer, so it "
            "cannot be validated (set [issuers.<name>] iss)"
        )
    b64 = _check_b64(header, crit)
    _check_iss(header, expected_iss)
    iat = _check_iat(header, now, max_future, iat_max_age)
    jti = _check_jti(header)
    if jti is not None and replay is not None and (iat is None or iat_max_age is None):
        raise InvalidToken("a jti without an iat (and an iat window) cannot be checked for "
                           "replay; the message must carry iat")
    if not s_seg:
        raise InvalidToken("the JWS signature is empty")
    signature = b64u_decode(s_seg, InvalidToken, "the JWS signature")
    payload, signed_payload = _payload(p_seg, payload_b64, b64)

    public = _public_key(keys(kid), alg, kid)
    _check_signature(public, alg, signature, h_seg.encode("ascii") + b"." + signed_payload)
    if check_payload is not None:
        check_payload(payload)

    if jti is not None and replay is not None and iat is not None and iat_max_age is not None:
        # Remember the jti for as long as the token could still be accepted:
        # until its iat is older than the window (plus the leeway).  (iat is
        # within the window here, so fromtimestamp cannot overflow.)
        keep_until = datetime.fromtimestamp(iat, now.tzinfo) + iat_max_age + max_future
        if replay(jti, keep_until):
            raise InvalidToken(f"jti {show(jti)} has been seen before (replay)")
    return VerifiedJws(header=header, payload=payload, kid=kid)


def _numeric_date(claims: dict[str, Any], name: str) -> int | None:
    if name not in claims:
        return None
    value = claims[name]
    # int only: "123", True and 1e308 are refused rather than compared (a float
    # that large overflows datetime, and a bool is an int to Python).
    if not _is_int(value):
        raise InvalidToken(f"claim {name} must be an integer NumericDate, not {show(value)}")
    return int(value)


def check_time_claims(
    claims: dict[str, Any], *, now: datetime, leeway: timedelta, what: str = "the JWT"
) -> None:
    """``exp``, ``nbf`` and ``iat``, where present, are integer NumericDates
    and hold at ``now`` give or take ``leeway``."""
    current = int(now.timestamp())
    skew = int(leeway.total_seconds())
    exp = _numeric_date(claims, "exp")
    nbf = _numeric_date(claims, "nbf")
    iat = _numeric_date(claims, "iat")
    if exp is not None and exp + skew <= current:
        raise InvalidToken(f"{what} expired at {exp} ({current - exp} s ago)")
    if nbf is not None and nbf > current + skew:
        raise InvalidToken(f"{what} is not valid before {nbf} ({nbf - current} s from now)")
    if iat is not None and iat > current + skew:
        raise InvalidToken(f"{what} iat {iat} is {iat - current} s in the future")


def verify_jwt_claims(
    payload: bytes,
    *,
    now: datetime,
    issuer: str | None,
    audience: str | None,
    max_future: timedelta = timedelta(seconds=10),
    require: Sequence[str] = ("exp",),
) -> dict[str, Any]:
    """Check a verified JWT's claims: types, time window, exact iss and aud."""
    claims = strict_json(payload, "the JWT claims")
    if not isinstance(claims, dict):
        raise InvalidToken(f"the JWT claims are a JSON {type(claims).__name__}, not an object")
    for name in require:
        if name not in claims:
            raise InvalidToken(f"the JWT has no {name} claim")
    check_time_claims(claims, now=now, leeway=max_future)
    if issuer is not None:
        iss = claims.get("iss")
        # Exact string equality: a list or a substring never matches.
        if not isinstance(iss, str) or iss != issuer:
            raise InvalidToken(f"the JWT iss {show(iss)} is not {show(issuer)}")
    if audience is not None:
        aud = claims.get("aud")
        ok = (
            aud == audience
            if isinstance(aud, str)
            else (
                isinstance(aud, list) and all(isinstance(a, str) for a in aud) and audience in aud
            )
        )
        if not ok:
            raise InvalidToken(f"the JWT aud {show(aud)} does not name {show(audience)}")
    return claims
