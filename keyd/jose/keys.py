"""Counterparties' public keys: a JWK from their JWKS read into a typed value.

A JWKS entry is untrusted input (THREATS "Counterparty JWKS"), so
:func:`issuer_key` keeps only a sound public key: RSA of 2048-8192 bits with
an odd modulus and an odd e >= 65537 below it, or an EC point on P-256, P-384
or P-521.  Every integer goes through the strict base64url decoder.  What
comes out, an :class:`IssuerKey`, holds a pyca/cryptography public key and the
JWK members that restrict its use; the verifier checks those against the
token, and nothing private or token-supplied (``x5u``, ``d``) survives.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keyd.errors import InvalidToken
from keyd.jose.compact import b64u_decode, show
from keyd.model import MIN_RSA_BITS, PRIVATE_JWK_MEMBERS

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

# Over 8192 bits is no stronger in practice, and each verify with it costs the
# worker thread far more: refused too.
MAX_RSA_BITS = 8192
MIN_RSA_EXPONENT = 65537

# JWK key_ops (RFC 7517 4.3) and the use each belongs to: a JWK stating both
# must not contradict itself.
_OPERATION_USE = {
    "sign": "sig", "verify": "sig",
    "encrypt": "enc", "decrypt": "enc", "wrapKey": "enc", "unwrapKey": "enc",
    "deriveKey": "enc", "deriveBits": "enc",
}


class Curve(StrEnum):
    """The JWK ``crv`` keyd accepts, with pyca's curve and the coordinate size."""

    P256 = "P-256"
    P384 = "P-384"
    P521 = "P-521"

    @property
    def curve(self) -> ec.EllipticCurve:
        curves: dict[str, ec.EllipticCurve] = {
            "P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()
        }
        return curves[self.value]

    @property
    def coordinate_bytes(self) -> int:
        return {"P-256": 32, "P-384": 48, "P-521": 66}[self.value]

    @classmethod
    def of(cls, key: ec.EllipticCurvePublicKey) -> Curve | None:
        names = {c.curve.name: c for c in cls}
        return names.get(key.curve.name)


class KeyFamily(StrEnum):
    """The JWK ``kty`` keyd verifies with; each JWS ``alg`` needs one of them."""

    RSA = "RSA"
    EC = "EC"


@dataclass(frozen=True)
class IssuerKey:
    """One public key of a counterparty, as its JWKS publishes it.

    ``use``, ``alg`` and ``key_ops`` are the JWK's own restrictions (None when
    it states none); the verifier refuses a token that breaks one.
    """

    kid: str
    public: PublicKey
    use: str | None = None
    alg: str | None = None
    key_ops: tuple[str, ...] | None = None

    @property
    def family(self) -> KeyFamily:
        return KeyFamily.RSA if isinstance(self.public, rsa.RSAPublicKey) else KeyFamily.EC

    @property
    def curve(self) -> Curve | None:
        """The EC curve; None for an RSA key."""
        return Curve.of(self.public) if isinstance(self.public, ec.EllipticCurvePublicKey) else None

    @property
    def may_verify(self) -> bool:
        """Neither ``use`` nor ``key_ops`` rules out verifying signatures."""
        return self.use in (None, "sig") and (self.key_ops is None or "verify" in self.key_ops)


def _uint(entry: dict[str, Any], name: str) -> int:
    text = entry.get(name)
    if not isinstance(text, str) or not text:
        raise InvalidToken(f"{name} is missing")
    return int.from_bytes(b64u_decode(text, InvalidToken, name), "big")


def _rsa(entry: dict[str, Any]) -> rsa.RSAPublicKey:
    n, e = _uint(entry, "n"), _uint(entry, "e")
    if not MIN_RSA_BITS <= n.bit_length() <= MAX_RSA_BITS:
        raise InvalidToken(
            f"RSA modulus of {n.bit_length()} bits is outside {MIN_RSA_BITS}-{MAX_RSA_BITS}"
        )
    if n % 2 == 0:
        raise InvalidToken("RSA modulus is even (not a product of two odd primes)")
    if e < MIN_RSA_EXPONENT or e % 2 == 0 or e >= n:
        raise InvalidToken(f"RSA exponent {show(e)} is not an odd number >= 65537 below n")
    try:
        return rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError as err:
        raise InvalidToken(f"RSA key is invalid: {err}") from err


def _ec(entry: dict[str, Any]) -> ec.EllipticCurvePublicKey:
    crv = entry.get("crv")
    if not isinstance(crv, str) or crv not in tuple(Curve):
        raise InvalidToken(f"EC curve {show(crv)} is not P-256, P-384 or P-521")
    curve = Curve(crv)
    size = curve.coordinate_bytes
    for name in ("x", "y"):
        text = entry.get(name)
        # Fixed length: a coordinate with its leading zeros stripped is not a JWK's.
        if not isinstance(text, str) or len(text) != (size * 4 + 2) // 3:
            raise InvalidToken(f"EC {name} is not {size} bytes")
    try:
        # public_key() checks the point is on the curve (invalid-curve attacks).
        return ec.EllipticCurvePublicNumbers(
            _uint(entry, "x"), _uint(entry, "y"), curve.curve
        ).public_key()
    except ValueError as err:
        raise InvalidToken(f"EC point is invalid: {err}") from err


def _optional_text(entry: dict[str, Any], name: str) -> str | None:
    value = entry.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidToken(f"{name} {show(value)} is not a string")
    return value


def _key_ops(entry: dict[str, Any]) -> tuple[str, ...] | None:
    """RFC 7517 4.3: distinct operations, each fitting ``use`` when both are given."""
    if "key_ops" not in entry:
        return None
    ops = entry["key_ops"]
    if not isinstance(ops, list) or any(isinstance(op, (list, dict)) for op in ops):
        raise InvalidToken(f"key_ops {show(ops)} is not a list of operations")
    if len(set(ops)) != len(ops) or len(ops) > len(_OPERATION_USE):
        raise InvalidToken(f"key_ops {show(ops)} repeats an operation")
    if "use" in entry and any(_OPERATION_USE.get(op) != entry["use"] for op in ops):
        raise InvalidToken(f"key_ops {show(ops)} contradict use {show(entry['use'])}")
    # Only a string can name an operation; other entries restrict nothing.
    return tuple(op for op in ops if isinstance(op, str))


def issuer_key(entry: dict[str, Any]) -> IssuerKey:
    """The sound public key of one JWKS entry, or InvalidToken saying why not.

    The caller has vetted ``kid`` (present, unique, bounded).
    """
    private = PRIVATE_JWK_MEMBERS & set(entry)
    if private:
        # A counterparty publishing private numbers is broken; do not use it.
        raise InvalidToken(f"has private members {sorted(private)}")
    kty = entry.get("kty")
    if kty == KeyFamily.RSA:
        public: PublicKey = _rsa(entry)
    elif kty == KeyFamily.EC:
        public = _ec(entry)
    else:
        raise InvalidToken(f"kty {show(kty)} is not RSA or EC")
    return IssuerKey(
        kid=str(entry["kid"]),
        public=public,
        use=_optional_text(entry, "use"),
        alg=_optional_text(entry, "alg"),
        key_ops=_key_ops(entry),
    )
