"""Every THREATS "Tokens" row against keyd.jose, each asserting the exact error class.

Tokens are crafted by hand (a header dict or raw bytes, signed for real with
PS256 unless the case is about the signature), so each case fails only on the
rule it is about.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from joserfc import jwe as joserfc_jwe
from joserfc.errors import SecurityWarning
from joserfc.jwk import OctKey, RSAKey

from keyd.errors import (
    BadRequest,
    DecryptionFailed,
    InvalidSignature,
    InvalidToken,
    KeydError,
    PayloadTooLarge,
)
from keyd.jose import (
    b64u_decode,
    b64u_encode,
    decrypt_jwe,
    parse_jwe_header,
    universal_link_consent,
    verify_jws,
    verify_jwt_claims,
)
from keyd.jose.jwks import public_jwk
from keyd.jose.keys import IssuerKey
from keyd.model import OaepHash

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
T = int(NOW.timestamp())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ENC_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
SIG, ENC, ECK = "sig-kid", "enc-kid", "ec-kid"


def _jwk(public: Any, kid: str, use: str) -> IssuerKey:
    return IssuerKey(kid=kid, public=public, use=use)


KEYS = {
    SIG: _jwk(RSA_KEY.public_key(), SIG, "sig"),
    ENC: _jwk(ENC_KEY.public_key(), ENC, "enc"),
    ECK: _jwk(EC_KEY.public_key(), ECK, "sig"),
}


class Lookup:
    """The issuer's key set; records every kid asked for (a lookup is a failure
    for cases that must be refused before any key is touched)."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __call__(self, kid: str) -> Any:
        self.asked.append(kid)
        return KEYS.get(kid)


def pss(digest: hashes.HashAlgorithm) -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)


def sign_with(alg: str, data: bytes) -> bytes:
    if alg == "PS256":
        return RSA_KEY.sign(data, pss(hashes.SHA256()), hashes.SHA256())
    if alg == "PS384":
        return RSA_KEY.sign(data, pss(hashes.SHA384()), hashes.SHA384())
    if alg == "RS256":
        return RSA_KEY.sign(data, padding.PKCS1v15(), hashes.SHA256())
    if alg == "ES256":
        r, s = decode_dss_signature(EC_KEY.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    raise AssertionError(alg)


def make(
    header: dict[str, Any] | bytes,
    payload: bytes = b"hello",
    *,
    sign_alg: str = "PS256",
    detached: bool = False,
    b64: bool = True,
) -> str:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    h = b64u_encode(raw)
    p = b64u_encode(payload) if b64 else payload.decode()
    signature = sign_with(sign_alg, f"{h}.{p}".encode())
    return f"{h}.{'' if detached else p}.{b64u_encode(signature)}"


def ok_header(**extra: Any) -> dict[str, Any]:
    return {"alg": "PS256", "kid": SIG, **extra}


def verify(token: Any, lookup: Lookup | None = None, **kw: Any) -> Any:
    kw.setdefault("algorithms", ["PS256"])
    kw.setdefault("now", NOW)
    return verify_jws(token, lookup or Lookup(), **kw)


def refused(cls: type[KeydError], fn: Callable[[], Any]) -> KeydError:
    """Run ``fn``, assert it raises exactly ``cls`` (not a subclass, not a superclass)."""
    with pytest.raises(KeydError) as info:
        fn()
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value.detail}"
    return info.value


def test_a_well_formed_token_verifies() -> None:
    """The baseline every hostile case deviates from."""
    assert verify(make(ok_header())).payload == b"hello"


def test_es256_with_an_ec_key_verifies_when_the_issuer_allows_it() -> None:
    token = make({"alg": "ES256", "kid": ECK}, sign_alg="ES256")
    assert verify(token, algorithms=["PS256", "ES256"]).kid == ECK


# ------------------------------------------------------------- alg none / HMAC / off-profile

NONE_VARIANTS = ["none", "None", "NONE", "nOnE", "", None, 0, ["PS256"], "ps256", "PS256 "]


@pytest.mark.parametrize("alg", NONE_VARIANTS)
@pytest.mark.parametrize("signature", ["", "AAAA"])
def test_alg_none_and_lookalikes_are_refused_before_any_key_lookup(
    alg: Any, signature: str
) -> None:
    header = b64u_encode(json.dumps({"alg": alg, "kid": SIG}).encode())
    lookup = Lookup()
    refused(InvalidToken, lambda: verify(f"{header}.{b64u_encode(b'hi')}.{signature}", lookup))
    assert lookup.asked == []


def _public_bytes(form: str) -> bytes:
    public = RSA_KEY.public_key()
    if form == "pem":
        return public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    if form == "der":
        return public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    if form == "pkcs1":
        return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
    return json.dumps(public_jwk(RSA_KEY.public_key(), kid=SIG, use="sig", alg=None,
                                 chain=[])).encode()


@pytest.mark.parametrize("form", ["pem", "der", "pkcs1", "jwk"])
@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
@pytest.mark.parametrize("allowed", [["PS256"], ["PS256", "HS256", "HS384", "HS512"]])
def test_hmac_keyed_with_the_rsa_public_key_is_refused(
    form: str, alg: str, allowed: list[str]
) -> None:
    """Even an issuer allow-list naming HS* cannot make keyd accept HMAC."""
    h = b64u_encode(json.dumps({"alg": alg, "kid": SIG}).encode())
    p = b64u_encode(b"hello")
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    mac = hmac.new(_public_bytes(form), f"{h}.{p}".encode(), digest).digest()
    lookup = Lookup()
    refused(InvalidToken, lambda: verify(f"{h}.{p}.{b64u_encode(mac)}", lookup, algorithms=allowed))
    assert lookup.asked == []


@pytest.mark.parametrize("alg", ["RS256", "PS384"])
@pytest.mark.parametrize("allowed", [["PS256"], ["PS256", "ES256"]])
def test_off_profile_alg_with_a_valid_signature_is_refused(alg: str, allowed: list[str]) -> None:
    token = make({"alg": alg, "kid": SIG}, sign_alg=alg)
    refused(InvalidToken, lambda: verify(token, algorithms=allowed))


def test_rs256_is_refused_even_when_an_allow_list_names_it() -> None:
    token = make({"alg": "RS256", "kid": SIG}, sign_alg="RS256")
    refused(InvalidToken, lambda: verify(token, algorithms=["RS256", "PS256"]))


def test_alg_is_matched_case_sensitively() -> None:
    refused(InvalidToken, lambda: verify(make({"alg": "ps256", "kid": SIG})))


def test_a_kid_of_a_use_enc_key_is_refused_for_verification() -> None:
    refused(InvalidToken, lambda: verify(make({"alg": "PS256", "kid": ENC})))


def test_rsa_alg_on_an_ec_key_is_refused() -> None:
    refused(InvalidToken, lambda: verify(make({"alg": "PS256", "kid": ECK})))


def test_ec_alg_on_an_rsa_key_is_refused() -> None:
    token = make({"alg": "ES256", "kid": SIG}, sign_alg="ES256")
    refused(InvalidToken, lambda: verify(token, algorithms=["ES256"]))


def test_a_signature_by_another_key_is_invalid() -> None:
    token = make(ok_header())
    forged = make({"alg": "PS256", "kid": "x"}).split(".")[2]
    h, p, _ = token.split(".")
    refused(InvalidSignature, lambda: verify(f"{h}.{p}.{forged}"))


def test_an_edited_payload_is_an_invalid_signature() -> None:
    h, _, s = make(ok_header()).split(".")
    refused(InvalidSignature, lambda: verify(f"{h}.{b64u_encode(b'hellp')}.{s}"))


def test_a_truncated_ec_signature_is_invalid() -> None:
    h, p, s = make({"alg": "ES256", "kid": ECK}, sign_alg="ES256").split(".")
    short = b64u_encode(b64u_decode(s)[:-3])
    refused(InvalidSignature, lambda: verify(f"{h}.{p}.{short}", algorithms=["ES256"]))


# ------------------------------------------------------------- kid injection


@pytest.mark.parametrize(
    "kid",
    [
        "../../etc/passwd",
        "' OR 1=1--",
        "a\x00b",
        "\x00",
        "${jndi:ldap://x}",
        "__class__",
        "k" * 256,
    ],
)
def test_injected_kids_are_just_unknown_kids(kid: str) -> None:
    lookup = Lookup()
    refused(InvalidSignature, lambda: verify(make({"alg": "PS256", "kid": kid}), lookup))
    assert lookup.asked == [kid]


def test_a_10_kb_kid_is_refused_as_too_large_before_lookup() -> None:
    lookup = Lookup()
    refused(PayloadTooLarge, lambda: verify(make({"alg": "PS256", "kid": "k" * 10240}), lookup))
    assert lookup.asked == []


@pytest.mark.parametrize("kid", ["k" * 257, "k" * 4096, "", None, 7, ["sig-kid"], {"kid": SIG}])
def test_oversize_or_non_string_kids_are_refused_before_lookup(kid: Any) -> None:
    lookup = Lookup()
    refused(InvalidToken, lambda: verify(make({"alg": "PS256", "kid": kid}), lookup))
    assert lookup.asked == []


def test_a_missing_kid_is_refused() -> None:
    refused(InvalidToken, lambda: verify(make({"alg": "PS256"})))


# ------------------------------------------------------------- keys from the token

KEY_HEADERS = {
    "jku": "http://169.254.169.254/latest/meta-data/jwks",
    "x5u": "http://169.254.169.254/cert.pem",
    "jwk": {"kty": "RSA", "n": "AQAB", "e": "AQAB"},
    "x5c": ["MIIB"],
}


@pytest.mark.parametrize("name", sorted(KEY_HEADERS))
def test_headers_that_carry_or_point_to_a_key_are_refused(name: str) -> None:
    lookup = Lookup()
    refused(InvalidToken, lambda: verify(make(ok_header(**{name: KEY_HEADERS[name]})), lookup))
    assert lookup.asked == []


# ------------------------------------------------------------- crit

MSG: dict[str, Any] = {"iss": "paynet", "iat": T, "jti": "j-1"}


@pytest.mark.parametrize(
    "extra",
    [
        {"crit": ["exp"], "exp": T},  # unknown name
        {"crit": ["http://openbanking.org.uk/iat"], "http://openbanking.org.uk/iat": T},
        {"crit": ["iss"]},  # named but absent
        {"crit": ["iss", "iat", "jti"], "iss": "paynet", "iat": T},  # jti absent
        {"crit": []},
        {"crit": ["alg"]},
        {"crit": ["kid"]},
        {"crit": ["crit"]},
        {"crit": "iss", "iss": "paynet"},  # not a list
        {"crit": ["iss", "iss"], "iss": "paynet"},
        {"crit": [1]},
        {"crit": None},
        {"crit": {"iss": True}, "iss": "paynet"},
    ],
)
def test_crit_must_name_only_understood_present_non_standard_members(extra: dict[str, Any]) -> None:
    lookup = Lookup()
    refused(InvalidToken, lambda: verify(make(ok_header(**extra)), lookup))
    assert lookup.asked == []


def test_paynet_crit_names_are_accepted_when_valid() -> None:
    token = make(ok_header(crit=["iss", "iat", "jti"], **MSG))
    verified = verify(token, iat_max_age=timedelta(minutes=5), expected_iss="paynet")
    assert verified.header["jti"] == "j-1"


def test_claims_crit_iss_is_refused_without_an_expected_iss_saying_so() -> None:
    """THREATS "claims": crit names iss, but nothing could validate it."""
    lookup = Lookup()
    error = refused(InvalidToken, lambda: verify(
        make(ok_header(crit=["iss", "iat", "jti"], **MSG)), lookup,
        iat_max_age=timedelta(minutes=5)))
    assert "iss" in error.detail and "configured" in error.detail
    assert lookup.asked == []


@pytest.mark.parametrize("missing", ["iat", "jti", "iss"])
def test_claims_header_members_the_profile_requires_must_be_present(missing: str) -> None:
    header = {k: v for k, v in {**MSG, "crit": ["iss", "iat", "jti"]}.items() if k != missing}
    header["crit"] = [n for n in header["crit"] if n != missing]
    lookup = Lookup()
    error = refused(InvalidToken, lambda: verify(
        make(ok_header(**header)), lookup, iat_max_age=timedelta(minutes=5),
        expected_iss="paynet", require=("iat", "jti", "iss")))
    assert missing in error.detail and lookup.asked == []


def test_claims_a_jti_without_iat_is_refused_when_replay_is_checked() -> None:
    token = make(ok_header(jti="j-no-iat"))
    refused(InvalidToken, lambda: verify(token, iat_max_age=timedelta(minutes=5),
                                         replay=ReplayStore()))


@pytest.mark.parametrize("iss", ["", 7, None, ["paynet"]])
def test_crit_iss_must_be_a_non_empty_string(iss: Any) -> None:
    token = make(ok_header(crit=["iss"], iss=iss))
    refused(InvalidToken, lambda: verify(token))


# ------------------------------------------------------------- b64 (RFC 7797)


def test_b64_false_in_crit_with_a_detached_payload_verifies() -> None:
    body = b'{"a":1}'
    token = make(ok_header(b64=False, crit=["b64"]), body, detached=True, b64=False)
    assert verify(token, payload_b64=b64u_encode(body)).payload == body


@pytest.mark.parametrize(
    ("extra", "cls"),
    [
        ({"b64": False}, InvalidToken),  # not in crit
        ({"b64": "false", "crit": ["b64"]}, InvalidToken),
        ({"b64": 0, "crit": ["b64"]}, InvalidToken),
        ({"b64": None, "crit": ["b64"]}, InvalidToken),
    ],
)
def test_b64_must_be_a_boolean_and_false_only_when_critical(
    extra: dict[str, Any], cls: type[KeydError]
) -> None:
    body = b"raw"
    token = make(ok_header(**extra), body, detached=True, b64=False)
    refused(cls, lambda: verify(token, payload_b64=b64u_encode(body)))


def test_b64_false_with_an_attached_payload_is_refused() -> None:
    token = make(ok_header(b64=False, crit=["b64"]), b"raw", b64=False)
    refused(InvalidToken, lambda: verify(token))


@pytest.mark.parametrize("b64", [True, False])
def test_a_detached_payload_mismatch_is_an_invalid_signature(b64: bool) -> None:
    extra = {} if b64 else {"b64": False, "crit": ["b64"]}
    token = make(ok_header(**extra), b"signed body", detached=True, b64=b64)
    refused(InvalidSignature, lambda: verify(token, payload_b64=b64u_encode(b"other body")))


def test_a_detached_jws_without_its_payload_is_a_bad_request() -> None:
    refused(BadRequest, lambda: verify(make(ok_header(), detached=True)))


@pytest.mark.parametrize("payload_b64", ["a+b/", "YQ==", "Y", 12])
def test_a_malformed_detached_payload_is_a_bad_request(payload_b64: Any) -> None:
    refused(BadRequest, lambda: verify(make(ok_header(), detached=True), payload_b64=payload_b64))


def test_an_attached_payload_that_differs_from_payload_b64_is_refused() -> None:
    refused(InvalidToken, lambda: verify(make(ok_header()), payload_b64=b64u_encode(b"other")))


# ------------------------------------------------------------- duplicate members


@pytest.mark.parametrize(
    "raw",
    [
        b'{"alg":"none","alg":"PS256","kid":"sig-kid"}',
        b'{"alg":"PS256","alg":"PS256","kid":"sig-kid"}',
        b'{"alg":"PS256","kid":"enc-kid","kid":"sig-kid"}',
        b'{"alg":"PS256","kid":"sig-kid","x":{"a":1,"a":2}}',
        b'{"alg":"PS256","kid":"sig-kid","crit":["iss"],"iss":"a","iss":"b"}',
    ],
)
def test_duplicate_header_members_are_refused(raw: bytes) -> None:
    lookup = Lookup()
    refused(InvalidToken, lambda: verify(make(raw), lookup))
    assert lookup.asked == []


# ------------------------------------------------------------- malformed

GOOD = make(ok_header())
H, P, S = GOOD.split(".")


def with_header(raw: bytes) -> str:
    return f"{b64u_encode(raw)}.{P}.{S}"


@pytest.mark.parametrize(
    "token",
    [
        f"{H}.{P}",  # 2 segments
        f"{H}.{P}.{S}.{S}",  # 4 segments
        f"{GOOD}.",  # trailing dot
        f".{GOOD}",
        f"{H}=.{P}.{S}",  # padding
        f"{H}.{P}.{S}=",
        f"{H}.{P}.{S[:-2]}+/",
        f"{H}.{P}+.{S}",
        f"{H[:-1]}/.{P}.{S}",
        with_header(b'{"alg":"PS256","kid":"sig-kid"\xff}'),  # bad UTF-8
        with_header(bytes([0xC0, 0xAF])),  # overlong UTF-8
        with_header(b'["alg","PS256"]'),  # header is an array
        with_header(b'"PS256"'),
        with_header(b"null"),
        with_header(b"12"),
        with_header(b"not json"),
        with_header(b'{"alg":"PS256","kid":"sig-kid","x":NaN}'),
        with_header(b'{"alg":"PS256","kid":"sig-kid","x":Infinity}'),
        f".{P}.{S}",  # empty header
        f"{H}.{P}.",  # empty signature
        f"{H}.{P}.{S[:-1]}",  # impossible base64 length, or non-canonical
        f"{H}.{P}.{S} ",
        f" {GOOD}",
        f"{H}.{P}.{S}\n",
        f"{H}.é.{S}",  # non-ASCII
        json.dumps({"payload": P, "signatures": [{"protected": H, "signature": S}]}),
        json.dumps({"payload": P, "protected": H, "signature": S}),
        "",
        ".",
        "..",
        "a.b.c.d.e",  # a JWE where a JWS is expected
    ],
)
def test_malformed_tokens_are_refused(token: str) -> None:
    refused(InvalidToken, lambda: verify(token))


@pytest.mark.parametrize("token", [None, b"a.b.c", 12, ["a", "b", "c"]])
def test_a_token_that_is_not_a_string_is_refused(token: Any) -> None:
    refused(InvalidToken, lambda: verify(token))


def test_a_real_jwe_where_a_jws_is_expected_is_refused() -> None:
    public = RSAKey.import_key(ENC_KEY.public_key())
    header = {"alg": "RSA-OAEP-256", "enc": "A256GCM"}
    token = joserfc_jwe.encrypt_compact(
        header, b"x", public, algorithms=["RSA-OAEP-256", "A256GCM"]
    )
    error = refused(InvalidToken, lambda: verify(token))
    assert "JWE" in error.detail


# ------------------------------------------------------------- size


def test_a_20_mb_header_is_payload_too_large() -> None:
    token = "e" * (20 * 1024 * 1024) + f".{P}.{S}"
    refused(PayloadTooLarge, lambda: verify(token))


def test_a_header_over_8_kib_is_payload_too_large() -> None:
    refused(PayloadTooLarge, lambda: verify(make(ok_header(pad="x" * 9000))))


def test_json_nested_100000_deep_is_refused_without_recursion() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    refused(PayloadTooLarge, lambda: verify(make(deep)))


@pytest.mark.parametrize("depth", [17, 1000, 4000])
def test_deep_nesting_inside_a_small_header_is_refused(depth: int) -> None:
    raw = b'{"alg":"PS256","kid":"sig-kid","x":' + b"[" * depth + b"]" * depth + b"}"
    refused(InvalidToken, lambda: verify(make(raw)))


def test_deep_nesting_in_jwt_claims_is_refused() -> None:
    claims = b'{"exp":1,"x":' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}"
    refused(InvalidToken, lambda: verify_jwt_claims(claims, now=NOW, issuer=None, audience=None))


# ------------------------------------------------------------- JWE key management & zip


class CountingDecrypter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, ciphertext: bytes, oaep_hash: OaepHash) -> bytes:
        self.calls += 1
        digest = hashes.SHA256() if oaep_hash is OaepHash.SHA256 else hashes.SHA1()  # noqa: S303 -- RSA-OAEP is OAEP with SHA-1
        try:
            return ENC_KEY.decrypt(ciphertext, padding.OAEP(padding.MGF1(digest), digest, None))
        except ValueError:
            raise DecryptionFailed() from None


def crafted_jwe(header: dict[str, Any] | bytes, encrypted_key: bytes = b"k" * 256) -> str:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    parts = [raw, encrypted_key, os.urandom(12), b"ciphertext", os.urandom(16)]
    return ".".join(b64u_encode(p) for p in parts)


def jwe_header(**extra: Any) -> dict[str, Any]:
    return {"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": ENC, **extra}


REFUSED_JWE_HEADERS = [
    jwe_header(alg="RSA1_5"),
    jwe_header(alg="PBES2-HS256+A128KW", p2c=10**9, p2s="c2FsdHNhbHQ"),
    jwe_header(alg="PBES2-HS512+A256KW", p2c=10**9, p2s="c2FsdHNhbHQ"),
    jwe_header(alg="dir"),
    jwe_header(alg="A128KW"),
    jwe_header(alg="A256KW"),
    jwe_header(alg="A128GCMKW", iv="AAAAAAAAAAAAAAAA", tag="AAAAAAAAAAAAAAAAAAAAAA"),
    jwe_header(alg="ECDH-ES", epk={"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}),
    jwe_header(alg="ECDH-ES+A128KW"),
    jwe_header(alg="none"),
    jwe_header(alg="rsa-oaep-256"),
    jwe_header(alg=None),
    jwe_header(alg=["RSA-OAEP-256"]),
    jwe_header(enc="A192GCM"),
    jwe_header(enc="A128CBC"),
    jwe_header(enc="a256gcm"),
    jwe_header(enc=None),
    {"alg": "RSA-OAEP-256", "kid": ENC},  # no enc
    {"enc": "A256GCM", "kid": ENC},  # no alg
    jwe_header(zip="DEF"),
    jwe_header(zip="GZIP"),
    jwe_header(zip=None),
    jwe_header(crit=["exp"], exp=1),
    jwe_header(crit=[]),
    jwe_header(jku="http://169.254.169.254/jwks"),
    jwe_header(jwk={"kty": "RSA"}),
    jwe_header(kid=None),
    jwe_header(kid=""),
    jwe_header(kid=["enc-kid"]),
    jwe_header(kid="k" * 300),
    b'{"alg":"RSA1_5","alg":"RSA-OAEP-256","enc":"A256GCM","kid":"enc-kid"}',
    b'["RSA-OAEP-256"]',
]


@pytest.mark.parametrize("header", REFUSED_JWE_HEADERS)
def test_jwe_off_profile_headers_are_refused_before_any_rsa_operation(header: Any) -> None:
    decrypter = CountingDecrypter()
    token = crafted_jwe(header)
    refused(InvalidToken, lambda: parse_jwe_header(token))
    refused(InvalidToken, lambda: decrypt_jwe(token, decrypter))
    assert decrypter.calls == 0


def test_jwe_dir_with_an_empty_encrypted_key_is_refused() -> None:
    decrypter = CountingDecrypter()
    refused(InvalidToken, lambda: decrypt_jwe(crafted_jwe(jwe_header(), b""), decrypter))
    assert decrypter.calls == 0


def test_a_genuine_rsa1_5_jwe_is_refused() -> None:
    public = RSAKey.import_key(ENC_KEY.public_key())
    header = {"alg": "RSA1_5", "enc": "A128GCM", "kid": ENC}
    with pytest.warns(SecurityWarning):
        token = joserfc_jwe.encrypt_compact(header, b"x", public, algorithms=["RSA1_5", "A128GCM"])
    decrypter = CountingDecrypter()
    refused(InvalidToken, lambda: decrypt_jwe(token, decrypter))
    assert decrypter.calls == 0


def test_a_genuine_dir_jwe_is_refused() -> None:
    key = OctKey.generate_key(256)
    header = {"alg": "dir", "enc": "A256GCM", "kid": ENC}
    token = joserfc_jwe.encrypt_compact(header, b"x", key, algorithms=["dir", "A256GCM"])
    refused(InvalidToken, lambda: decrypt_jwe(token, CountingDecrypter()))


@pytest.mark.parametrize("plaintext", [b"small honest payload", b"\x00" * 1_000_000])
def test_genuine_zip_def_jwes_are_refused_small_or_bomb(plaintext: bytes) -> None:
    public = RSAKey.import_key(ENC_KEY.public_key())
    header = {"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": ENC, "zip": "DEF"}
    token = joserfc_jwe.encrypt_compact(
        header, plaintext, public, algorithms=["RSA-OAEP-256", "A256GCM", "DEF"]
    )
    decrypter = CountingDecrypter()
    refused(InvalidToken, lambda: decrypt_jwe(token, decrypter))
    assert decrypter.calls == 0


@pytest.mark.parametrize("segments", [1, 3, 4, 6])
def test_a_jwe_needs_five_segments(segments: int) -> None:
    token = ".".join(["eyJ9"] * segments)
    refused(InvalidToken, lambda: decrypt_jwe(token, CountingDecrypter()))


# ------------------------------------------------------------- JWE tampering: no oracle


def genuine_jwe(enc: str) -> str:
    public = RSAKey.import_key(ENC_KEY.public_key())
    header = {"alg": "RSA-OAEP-256", "enc": enc, "kid": ENC}
    return joserfc_jwe.encrypt_compact(
        header, b'{"secret":1}', public, algorithms=["RSA-OAEP-256", enc]
    )


def _flip(segment: str, index: int = 0) -> str:
    data = bytearray(b64u_decode(segment))
    data[index] ^= 0x01
    return b64u_encode(bytes(data))


def _with(token: str, index: int, value: str) -> str:
    parts = token.split(".")
    parts[index] = value
    return ".".join(parts)


def _edited_header(token: str) -> str:
    header = json.loads(b64u_decode(token.split(".")[0]))
    header["cty"] = "JWT"
    return _with(token, 0, b64u_encode(json.dumps(header).encode()))


TAMPERING: dict[str, Callable[[str], str]] = {
    "flipped tag bit": lambda t: _with(t, 4, _flip(t.split(".")[4])),
    "flipped last tag bit": lambda t: _with(t, 4, _flip(t.split(".")[4], -1)),
    "truncated tag": lambda t: _with(t, 4, t.split(".")[4][:-3]),
    "one-byte tag": lambda t: _with(t, 4, b64u_encode(b"\x00")),
    "empty tag": lambda t: _with(t, 4, ""),
    "non-base64 tag": lambda t: _with(t, 4, "@@@@"),
    "flipped iv": lambda t: _with(t, 2, _flip(t.split(".")[2])),
    "short iv": lambda t: _with(t, 2, b64u_encode(b"\x00" * 8)),
    "empty iv": lambda t: _with(t, 2, ""),
    "flipped ciphertext": lambda t: _with(t, 3, _flip(t.split(".")[3])),
    "empty ciphertext": lambda t: _with(t, 3, ""),
    "edited header": _edited_header,
    "random encrypted_key": lambda t: _with(t, 1, b64u_encode(os.urandom(256))),
    "flipped encrypted_key": lambda t: _with(t, 1, _flip(t.split(".")[1], 5)),
    "short encrypted_key": lambda t: _with(t, 1, b64u_encode(os.urandom(16))),
    "non-base64 encrypted_key": lambda t: _with(t, 1, "a+b/"),
    "other enc (cek length mismatch)": lambda t: t,  # replaced per enc below
}


@pytest.mark.parametrize("enc", ["A256GCM", "A128GCM", "A128CBC-HS256", "A256CBC-HS512"])
@pytest.mark.parametrize("case", [c for c in TAMPERING if not c.startswith("other")])
def test_every_tampering_fails_with_the_one_identical_decryption_error(enc: str, case: str) -> None:
    token = TAMPERING[case](genuine_jwe(enc))
    error = refused(DecryptionFailed, lambda: decrypt_jwe(token, CountingDecrypter()))
    assert error.detail == DecryptionFailed().detail


@pytest.mark.parametrize(
    ("made", "claimed"), [("A128GCM", "A256GCM"), ("A256CBC-HS512", "A128CBC-HS256")]
)
def test_a_cek_of_the_wrong_length_fails_like_any_tampering(made: str, claimed: str) -> None:
    """The header claims another enc: a wrong-length CEK must not be a distinct error."""
    token = genuine_jwe(made)
    header = json.loads(b64u_decode(token.split(".")[0]))
    header["enc"] = claimed
    edited = _with(token, 0, b64u_encode(json.dumps(header).encode()))
    error = refused(DecryptionFailed, lambda: decrypt_jwe(edited, CountingDecrypter()))
    assert error.detail == DecryptionFailed().detail


def test_a_jwe_to_our_signing_key_does_not_decrypt_under_the_encryption_key() -> None:
    public = RSAKey.import_key(RSA_KEY.public_key())
    header = {"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": SIG}
    token = joserfc_jwe.encrypt_compact(
        header, b"x", public, algorithms=["RSA-OAEP-256", "A256GCM"]
    )
    refused(DecryptionFailed, lambda: decrypt_jwe(token, CountingDecrypter()))


# ------------------------------------------------------------- claim types


@pytest.mark.parametrize("name", ["exp", "nbf", "iat"])
@pytest.mark.parametrize(
    "value", ["1767225600", True, False, 1e308, 1.5, None, [1], {"t": 1}, float("nan")]
)
def test_numeric_date_claims_must_be_integers(name: str, value: Any) -> None:
    claims = {"exp": T + 60, name: value}
    payload = json.dumps(claims).encode()
    refused(InvalidToken, lambda: verify_jwt_claims(payload, now=NOW, issuer=None, audience=None))


@pytest.mark.parametrize("iss", [["paynet"], "pay", "paynet-evil", "PAYNET", " paynet", None, 1])
def test_iss_must_equal_the_issuer_exactly(iss: Any) -> None:
    payload = json.dumps({"exp": T + 60, "iss": iss}).encode()
    refused(
        InvalidToken, lambda: verify_jwt_claims(payload, now=NOW, issuer="paynet", audience=None)
    )


@pytest.mark.parametrize(
    "aud", ["https://other", ["https://other"], [1], None, {"a": 1}, "https://rp.example/x"]
)
def test_aud_must_name_our_audience(aud: Any) -> None:
    payload = json.dumps({"exp": T + 60, "aud": aud}).encode()
    refused(
        InvalidToken,
        lambda: verify_jwt_claims(payload, now=NOW, issuer=None, audience="https://rp.example"),
    )


@pytest.mark.parametrize(
    ("claims", "ok"),
    [
        ({"exp": T + 60}, True),
        ({"exp": T - 60}, False),  # expired
        ({}, False),  # no exp
        ({"exp": T + 60, "nbf": T + 61}, False),
        ({"exp": T + 60, "nbf": T + 10}, True),
        ({"exp": T + 60, "iat": T + 10}, True),
        ({"exp": T + 60, "iat": T + 61}, False),
        ({"exp": 10**30}, True),  # a huge int compares, it is never turned into a datetime
        ({"exp": T + 60, "iss": "paynet", "aud": ["x", "https://rp.example"]}, True),
    ],
)
def test_jwt_time_window(claims: dict[str, Any], ok: bool) -> None:
    issuer = "paynet" if "iss" in claims else None
    audience = "https://rp.example" if "aud" in claims else None
    payload = json.dumps(claims).encode()

    def check() -> dict[str, Any]:
        return verify_jwt_claims(payload, now=NOW, issuer=issuer, audience=audience)

    if ok:
        assert check() == claims
    else:
        refused(InvalidToken, check)


@pytest.mark.parametrize("payload", [b"[1]", b"not json", b'{"exp":1,"exp":2}', b"\xff"])
def test_jwt_claims_must_be_one_json_object(payload: bytes) -> None:
    refused(InvalidToken, lambda: verify_jwt_claims(payload, now=NOW, issuer=None, audience=None))


# ------------------------------------------------------------- freshness and replay


def message(iat: Any, jti: Any = "j-1") -> str:
    return make(ok_header(crit=["iss", "iat", "jti"], iss="paynet", iat=iat, jti=jti))


def verify_message(token: str, replay: Any = None) -> Any:
    return verify(token, iat_max_age=timedelta(minutes=5), replay=replay, expected_iss="paynet")


@pytest.mark.parametrize(
    ("offset", "ok"),
    [
        (0, True),
        (10, True),
        (11, False),
        (61, False),
        (-299, True),
        (-300, True),
        (-301, False),
        (-3600, False),
    ],
)
def test_iat_freshness(offset: int, ok: bool) -> None:
    token = message(T + offset)
    if ok:
        assert verify_message(token).header["iat"] == T + offset
    else:
        refused(InvalidToken, lambda: verify_message(token))


@pytest.mark.parametrize("iat", [str(T), True, float(T), 1e308, None, -(10**30)])
def test_iat_must_be_an_integer(iat: Any) -> None:
    refused(InvalidToken, lambda: verify_message(message(iat)))


@pytest.mark.parametrize("jti", ["", 7, None, ["j"], "j" * 257])
def test_jti_must_be_a_bounded_string(jti: Any) -> None:
    refused(InvalidToken, lambda: verify_message(message(T, jti)))


class ReplayStore:
    def __init__(self) -> None:
        self.seen: dict[str, datetime] = {}

    def __call__(self, jti: str, keep_until: datetime) -> bool:
        if jti in self.seen:
            return True
        self.seen[jti] = keep_until
        return False


def test_a_jti_is_never_accepted_twice() -> None:
    store = ReplayStore()
    token = message(T)
    verify_message(token, store)
    refused(InvalidToken, lambda: verify_message(token, store))
    refused(InvalidToken, lambda: verify_message(message(T - 5), store))  # same jti, new token
    assert store.seen["j-1"] >= NOW + timedelta(minutes=4)


def test_a_forged_token_does_not_burn_the_jti() -> None:
    store = ReplayStore()
    h, p, _ = message(T, "j-9").split(".")
    forged = f"{h}.{p}.{make({'alg': 'PS256', 'kid': 'x'}).split('.')[2]}"
    refused(InvalidSignature, lambda: verify_message(forged, store))
    assert verify_message(message(T, "j-9"), store).header["jti"] == "j-9"


# ------------------------------------------------------------- universal link

CONSENT = "18ce19c8-85be-4049-899c-21cdc02cde79"


def test_paynets_universal_link_example_verifies() -> None:
    signature = make({"alg": "PS256", "kid": SIG}, CONSENT.encode())
    assert signature.split(".")[1] == "MThjZTE5YzgtODViZS00MDQ5LTg5OWMtMjFjZGMwMmNkZTc5"
    url = (
        f"https://dp.example.my/ofm/my/authorize/ais?consent_id={CONSENT}"
        f"&signature={signature}&redirect_uri=https%3A%2F%2Fdc.example%2Fcb"
    )
    consent_id, found = universal_link_consent(url)
    assert (consent_id, found) == (CONSENT, signature)
    assert verify(found).payload == consent_id.encode()


def test_a_universal_link_signature_over_another_consent_is_detectable() -> None:
    signature = make(ok_header(), b"another-consent")
    consent_id, found = universal_link_consent(
        f"https://dp.example/ofm/my/authorize/ais?consent_id={CONSENT}&signature={signature}"
    )
    assert verify(found).payload != consent_id.encode()


@pytest.mark.parametrize(
    "url",
    [
        f"http://dp.example/ofm/my/authorize/ais?consent_id={CONSENT}&signature={GOOD}",
        f"https://dp.example/ofm/my/authorize/ais?consent_id={CONSENT}&consent_id=x&signature={GOOD}",
        f"https://dp.example/ofm/my/authorize/ais?consent_id={CONSENT}&signature={GOOD}&signature={GOOD}",
        f"https://dp.example/ofm/my/authorize/ais?consent_id={CONSENT}",
        f"https://dp.example/ofm/my/authorize/ais?signature={GOOD}",
        f"https://dp.example/ofm/my/authorize/ais?consent_id=&signature={GOOD}",
        f"https://dp.example/ofm/my/authorize/ais?consent_id=a%00b&signature={GOOD}",
        f"https:///ofm/my/authorize/ais?consent_id={CONSENT}&signature={GOOD}",
        f"javascript:alert(1)?consent_id={CONSENT}&signature={GOOD}",
        "https://[::1/ofm?consent_id=a&signature=b",
        "https://dp.example/?consent_id=a&signature=b&" + "&".join(f"x{i}=1" for i in range(40)),
        "https://dp.example/?" + "x" * 20000,
        "",
        None,
        12,
    ],
)
def test_malformed_universal_links_are_bad_requests(url: Any) -> None:
    refused(BadRequest, lambda: universal_link_consent(url))


# ------------------------------------------------------------- signature length


def _short_signature_token() -> str:
    """A genuine PS256 token whose signature starts with a zero octet, sent
    without it (one octet short of the modulus): OpenSSL would accept it."""
    for i in range(5000):
        token = make(ok_header(), f"payload-{i}".encode())
        h, p, s = token.split(".")
        raw = base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
        if raw[0] == 0:
            return f"{h}.{p}.{b64u_encode(raw[1:])}"
    raise AssertionError("no signature with a leading zero octet in 5000 tries")


def test_claims_an_rsa_signature_one_octet_short_is_refused() -> None:
    refused(InvalidSignature, lambda: verify(_short_signature_token()))


def test_claims_an_rsa_signature_one_octet_long_is_refused() -> None:
    h, p, s = make(ok_header()).split(".")
    raw = base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    longer = b64u_encode(bytes(1) + raw)
    refused(InvalidSignature, lambda: verify(f"{h}.{p}.{longer}"))
