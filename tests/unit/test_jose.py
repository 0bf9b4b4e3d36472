"""keyd.jose happy paths, checked by joserfc (an independent JOSE library).

What keyd makes must verify with joserfc using only the public JWK keyd
publishes; what joserfc encrypts to us must decrypt with keyd.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from joserfc import jwe, jws, jwt
from joserfc.jwk import RSAKey
from joserfc.jws import JWSRegistry
from joserfc.registry import HeaderParameter

from keyd.errors import BadRequest, DecryptionFailed, Forbidden
from keyd.jose import (
    PROTECTED_HEADER_NAMES,
    b64u_decode,
    b64u_encode,
    client_assertion,
    decrypt_jwe,
    jwks_document,
    kid_for,
    parse_jwe_header,
    public_jwk,
    sign_jws,
    sign_jwt,
    verify_jws,
    verify_jwt_claims,
)
from keyd.jose.keys import IssuerKey, issuer_key
from keyd.model import KidScheme, OaepHash
from tests.fixtures.certs import self_signed

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
SIG_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ENC_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)



def _self_signed(key: rsa.RSAPrivateKey) -> x509.Certificate:
    return self_signed(key, NOW, 'keyd test')


SIG_CERT = _self_signed(SIG_KEY)
SIG_KID = kid_for(KidScheme.X5T_S256, SIG_CERT, SIG_KEY.public_key())
SIG_JWK = public_jwk(SIG_KEY.public_key(), kid=SIG_KID, use="sig", alg="PS256", chain=[SIG_CERT])
ENC_KID = "enc-kid"


def signer(data: bytes) -> bytes:
    """What a backend does: PS256 = PSS, SHA-256, MGF1-SHA256, 32-byte salt."""
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    return SIG_KEY.sign(data, pss, hashes.SHA256())


def decrypter(ciphertext: bytes, oaep_hash: OaepHash) -> bytes:
    digest = hashes.SHA256() if oaep_hash is OaepHash.SHA256 else hashes.SHA1()  # noqa: S303 -- RSA-OAEP is OAEP with SHA-1
    try:
        return ENC_KEY.decrypt(ciphertext, padding.OAEP(padding.MGF1(digest), digest, None))
    except ValueError:
        raise DecryptionFailed() from None


def joserfc_public() -> RSAKey:
    """joserfc's key, made from nothing but the JWK keyd publishes."""
    return RSAKey.import_key(SIG_JWK)


def our_keys(kid: str) -> IssuerKey | None:
    """The published JWK, read as keyd reads a counterparty's."""
    return issuer_key(SIG_JWK) if kid == SIG_KID else None


MESSAGE_REGISTRY = JWSRegistry(
    header_registry={
        "iss": HeaderParameter("Issuer", "str"),
        "iat": HeaderParameter("Issued at", "int"),
        "jti": HeaderParameter("JWT id", "str"),
    },
    algorithms=["PS256"],
)


# ---------------------------------------------------------------- signing


def test_sign_jws_verifies_with_joserfc_using_only_the_published_jwk() -> None:
    token = sign_jws(signer, SIG_KID, b'{"hello":"world"}')
    obj = jws.deserialize_compact(token, joserfc_public(), algorithms=["PS256"])
    assert obj.payload == b'{"hello":"world"}'
    assert obj.protected == {"alg": "PS256", "kid": SIG_KID}


def test_sign_jws_keeps_harmless_extra_headers() -> None:
    token = sign_jws(signer, SIG_KID, b"x", extra_header={"typ": "JOSE", "cty": "json"})
    obj = jws.deserialize_compact(token, joserfc_public(), algorithms=["PS256"])
    assert obj.protected == {"alg": "PS256", "kid": SIG_KID, "typ": "JOSE", "cty": "json"}


@pytest.mark.parametrize("name", sorted(PROTECTED_HEADER_NAMES))
def test_sign_jws_refuses_caller_set_security_headers(name: str) -> None:
    with pytest.raises(Forbidden, match="is set by keyd"):
        sign_jws(signer, SIG_KID, b"x", extra_header={name: "PS256"})


@pytest.mark.parametrize("name", ["iss", "iat", "jti"])
def test_claims_in_header_refuses_caller_set_message_claims(name: str) -> None:
    with pytest.raises(Forbidden):
        sign_jws(
            signer, SIG_KID, b"x", extra_header={name: 1}, claims_in_header=True, iss="me", now=NOW
        )


def test_detached_jws_with_claims_in_header_verifies_with_joserfc_and_keyd() -> None:
    body = b'{"Data":{"ConsentId":"c-1"}}'
    token = sign_jws(
        signer, SIG_KID, body, detached=True, claims_in_header=True, iss="dc-1", now=NOW
    )
    header_b64, empty, _ = token.split(".")
    assert empty == ""
    obj = jws.deserialize_compact(token, joserfc_public(), registry=MESSAGE_REGISTRY, payload=body)
    header = obj.protected
    assert header["crit"] == ["iss", "iat", "jti"]
    assert header["iss"] == "dc-1" and header["iat"] == int(NOW.timestamp())
    assert uuid.UUID(header["jti"]).version == 4
    seen: set[str] = set()

    def replay(jti: str, _until: datetime) -> bool:
        """Seen before?  Remembered from now on either way."""
        before = jti in seen
        seen.add(jti)
        return before

    verified = verify_jws(
        token,
        our_keys,
        algorithms=["PS256"],
        now=NOW,
        payload_b64=b64u_encode(body),
        iat_max_age=timedelta(minutes=5),
        replay=replay,
        expected_iss="dc-1",
    )
    assert verified.payload == body and verified.kid == SIG_KID


def test_claims_in_header_needs_iss_and_now() -> None:
    with pytest.raises(BadRequest):
        sign_jws(signer, SIG_KID, b"x", claims_in_header=True, now=NOW)
    with pytest.raises(BadRequest):
        sign_jws(signer, SIG_KID, b"x", claims_in_header=True, iss="me")


def test_sign_jwt_verifies_with_joserfc_and_adds_iat_exp_jti() -> None:
    token = sign_jwt(signer, SIG_KID, {"sub": "alice", "scope": "accounts"}, ttl=600, now=NOW)
    decoded = jwt.decode(token, joserfc_public(), algorithms=["PS256"])
    assert decoded.header == {"alg": "PS256", "kid": SIG_KID, "typ": "JWT"}
    claims = decoded.claims
    assert claims["sub"] == "alice" and claims["iat"] == int(NOW.timestamp())
    assert claims["exp"] == claims["iat"] + 600
    assert uuid.UUID(claims["jti"]).version == 4


def test_sign_jwt_keeps_caller_claims_where_present() -> None:
    token = sign_jwt(signer, SIG_KID, {"iat": 1000, "jti": "mine"}, ttl=60, now=NOW)
    claims = jwt.decode(token, joserfc_public(), algorithms=["PS256"]).claims
    assert (claims["iat"], claims["exp"], claims["jti"]) == (1000, 1060, "mine")


@pytest.mark.parametrize("ttl", [0, -1, 86401, True, "600", 1.5, None])
def test_sign_jwt_refuses_ttl_outside_one_second_to_one_day(ttl: Any) -> None:
    with pytest.raises(BadRequest, match="ttl"):
        sign_jwt(signer, SIG_KID, {}, ttl=ttl, now=NOW)


@pytest.mark.parametrize(
    "claims", [{"exp": "soon"}, {"iat": True}, {"nbf": 1.5}, ["not", "a", "dict"]]
)
def test_sign_jwt_refuses_malformed_claims(claims: Any) -> None:
    with pytest.raises(BadRequest):
        sign_jwt(signer, SIG_KID, claims, ttl=60, now=NOW)


def test_sign_jwt_refuses_claims_that_are_not_json() -> None:
    with pytest.raises(BadRequest, match="JSON"):
        sign_jwt(signer, SIG_KID, {"x": object()}, ttl=60, now=NOW)


def test_client_assertion_is_exactly_paynets_private_key_jwt() -> None:
    token = client_assertion(
        signer, SIG_KID, client_id="dc-123", audience="https://as.example/token", now=NOW
    )
    decoded = jwt.decode(token, joserfc_public(), algorithms=["PS256"])
    assert decoded.header == {"alg": "PS256", "kid": SIG_KID}
    claims = decoded.claims
    assert set(claims) == {"iss", "sub", "aud", "iat", "exp", "jti"}
    assert claims["iss"] == claims["sub"] == "dc-123"
    assert claims["aud"] == "https://as.example/token"
    assert claims["exp"] == claims["iat"] + 600 == int(NOW.timestamp()) + 600
    assert uuid.UUID(claims["jti"]).version == 4
    checked = verify_jwt_claims(
        b64u_decode(token.split(".")[1]),
        now=NOW,
        issuer="dc-123",
        audience="https://as.example/token",
    )
    assert checked["sub"] == "dc-123"


def test_client_assertions_never_repeat_a_jti() -> None:
    tokens = [
        client_assertion(signer, SIG_KID, client_id="c", audience="a", now=NOW) for _ in range(5)
    ]
    jtis = {json.loads(b64u_decode(t.split(".")[1]))["jti"] for t in tokens}
    assert len(jtis) == 5


# ---------------------------------------------------------------- JWE

ALL_ENC = ["A256GCM", "A128GCM", "A128CBC-HS256", "A256CBC-HS512"]


def joserfc_jwe(alg: str, enc: str, plaintext: bytes, **extra: Any) -> str:
    public = RSAKey.import_key(ENC_KEY.public_key())
    header = {"alg": alg, "enc": enc, "kid": ENC_KID, **extra}
    return jwe.encrypt_compact(header, plaintext, public, algorithms=[alg, enc])


@pytest.mark.parametrize("enc", ALL_ENC)
@pytest.mark.parametrize("alg", ["RSA-OAEP-256", "RSA-OAEP"])
def test_joserfc_jwe_decrypts(alg: str, enc: str) -> None:
    plaintext = b'{"Data":{"Balance":"12.34"}}' * 3
    result = decrypt_jwe(joserfc_jwe(alg, enc, plaintext), decrypter)
    assert result.plaintext == plaintext
    assert result.kid == ENC_KID
    assert result.header == {"alg": alg, "enc": enc, "kid": ENC_KID}


@pytest.mark.parametrize("alg", ["RSA-OAEP-256", "RSA-OAEP"])
def test_jwe_unwrap_asks_the_backend_for_the_matching_oaep_hash(alg: str) -> None:
    asked: list[OaepHash] = []

    def recording(ct: bytes, h: OaepHash) -> bytes:
        asked.append(h)
        return decrypter(ct, h)

    decrypt_jwe(joserfc_jwe(alg, "A256GCM", b"x"), recording)
    assert [h.jwe_alg for h in asked] == [alg]


def test_jwe_with_empty_plaintext_decrypts() -> None:
    assert (
        decrypt_jwe(joserfc_jwe("RSA-OAEP-256", "A128CBC-HS256", b""), decrypter).plaintext == b""
    )


def test_a_jwe_without_kid_decrypts_and_reports_no_kid() -> None:
    public = RSAKey.import_key(ENC_KEY.public_key())
    header = {"alg": "RSA-OAEP-256", "enc": "A256GCM"}
    token = jwe.encrypt_compact(header, b"x", public, algorithms=["RSA-OAEP-256", "A256GCM"])
    assert "kid" not in parse_jwe_header(token)
    result = decrypt_jwe(token, decrypter)
    assert (result.plaintext, result.kid) == (b"x", "")


def test_parse_jwe_header_names_the_kid_without_any_rsa_work() -> None:
    header = parse_jwe_header(joserfc_jwe("RSA-OAEP-256", "A256GCM", b"x", cty="JWT"))
    assert header["kid"] == ENC_KID and header["cty"] == "JWT"


# ---------------------------------------------------------------- kids and JWKS


def test_x5t_s256_kid_is_the_43_character_certificate_thumbprint() -> None:
    expected = base64.urlsafe_b64encode(SIG_CERT.fingerprint(hashes.SHA256())).rstrip(b"=").decode()
    assert SIG_KID == expected and len(SIG_KID) == 43


def test_rfc7638_kid_matches_joserfc_thumbprint() -> None:
    kid = kid_for(KidScheme.RFC7638, None, SIG_KEY.public_key())
    assert kid == RSAKey.import_key(SIG_KEY.public_key()).thumbprint()


def test_ob_uk_kid_is_the_sha1_jwk_thumbprint_of_27_characters() -> None:
    key = RSAKey.import_key(SIG_KEY.public_key()).dict_value
    canonical = json.dumps({"e": key["e"], "kty": "RSA", "n": key["n"]}, separators=(",", ":"))
    digest = hashlib.sha1(canonical.encode()).digest()  # noqa: S324 -- the OB kid scheme
    expected = base64.urlsafe_b64encode(digest).rstrip(b"=")
    kid = kid_for(KidScheme.OB_UK, None, SIG_KEY.public_key())
    assert kid == expected.decode() and len(kid) == 27


def test_assigned_kid_is_taken_as_given() -> None:
    assert kid_for(KidScheme.ASSIGNED, None, SIG_KEY.public_key(), "uae-7f3a") == "uae-7f3a"


@pytest.mark.parametrize("assigned", [None, "", " padded ", "bad\x00kid", "x" * 257])
def test_assigned_kid_must_be_a_sane_string(assigned: str | None) -> None:
    with pytest.raises(BadRequest):
        kid_for(KidScheme.ASSIGNED, None, SIG_KEY.public_key(), assigned)


def test_x5t_kid_needs_the_certificate_of_this_very_key() -> None:
    with pytest.raises(BadRequest, match="needs"):
        kid_for(KidScheme.X5T_S256, None, SIG_KEY.public_key())
    with pytest.raises(BadRequest, match="not this key"):
        kid_for(KidScheme.X5T_S256, SIG_CERT, ENC_KEY.public_key())


def test_public_jwk_has_public_members_and_the_certificate_chain() -> None:
    assert set(SIG_JWK) == {"kty", "n", "e", "kid", "use", "alg", "x5c", "x5t#S256"}
    der = base64.b64decode(SIG_JWK["x5c"][0], validate=True)  # standard base64, not url
    assert der == SIG_CERT.public_bytes(serialization.Encoding.DER)
    assert SIG_JWK["x5t#S256"] == SIG_KID and SIG_JWK["e"] == "AQAB"
    imported = RSAKey.import_key(SIG_JWK)
    assert imported.as_dict(private=False)["n"] == SIG_JWK["n"]


def test_public_jwk_omits_alg_when_none_and_x5c_without_a_chain() -> None:
    jwk = public_jwk(SIG_KEY.public_key(), kid="t", use="tls", alg=None, chain=[])
    assert set(jwk) == {"kty", "n", "e", "kid", "use"}


def test_public_jwk_refuses_a_chain_whose_leaf_is_another_key() -> None:
    with pytest.raises(BadRequest):
        public_jwk(ENC_KEY.public_key(), kid="k", use="enc", alg="RSA-OAEP-256", chain=[SIG_CERT])


def test_jwks_document_is_canonical_so_the_etag_is_stable() -> None:
    reordered = dict(reversed(list(SIG_JWK.items())))
    assert jwks_document([SIG_JWK]) == jwks_document([reordered])
    document = jwks_document([SIG_JWK])
    assert b" " not in document and json.loads(document) == {"keys": [SIG_JWK]}


# ---------------------------------------------------------------- base64url


def test_b64u_round_trips_every_length() -> None:
    for n in range(0, 40):
        data = bytes(range(n))
        assert b64u_decode(b64u_encode(data)) == data


@pytest.mark.parametrize("text", ["YQ==", "a+b/", "YR", "Y", "a b", "Zg=", "ü", "YWJj\n"])
def test_b64u_decode_is_strict(text: str) -> None:
    with pytest.raises(BadRequest):
        b64u_decode(text)


def test_the_verifier_checks_exactly_the_algorithms_an_issuer_may_be_allowed() -> None:
    """config reads the allow-list from keyd.model; the verifier must know how to check each."""
    from keyd.jose import verify
    from keyd.model import ISSUER_ALGORITHMS

    assert set(verify._ALGS) == ISSUER_ALGORITHMS
