"""THREATS.md's token rows sent to the running daemon: every hostile token gets
a JSON 4xx with a fixed error code, nothing is accepted, and the daemon stays
healthy.  (tests/test_jose_hostile.py covers the same rows at the JOSE layer,
with the exact error classes; this file proves the API maps them all.)"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from joserfc import jwe
from joserfc.jwk import KeySet

from tests.daemon import Daemon, StaticServer, running
from tests.fixtures.jose import b64u

pytestmark = pytest.mark.slow  # a real keyd process per test or module

REFUSALS = {"invalid_token", "invalid_signature", "decryption_failed", "bad_request",
            "payload_too_large", "not_found", "forbidden"}
ISSUER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KID = "paynet-hostile-1"


def jwk_public() -> dict[str, Any]:
    numbers = ISSUER_KEY.public_key().public_numbers()
    return {"kty": "RSA", "kid": KID, "use": "sig", "alg": "PS256",
            "n": b64u(numbers.n.to_bytes(256, "big")), "e": b64u(numbers.e.to_bytes(3, "big"))}


def token(header: dict[str, Any] | str, payload: bytes | str = b"{}", *, alg: str = "PS256",
          signature: bytes | None = None) -> str:
    """A compact JWS with exactly this header, signed correctly unless told otherwise."""
    h = b64u(header if isinstance(header, str) else json.dumps(header))
    signing_input = f"{h}.{b64u(payload)}".encode()
    if signature is None:
        digest = {"PS256": hashes.SHA256(), "PS384": hashes.SHA384(), "RS256": hashes.SHA256()}
        if alg.startswith("PS"):
            pad: padding.AsymmetricPadding = padding.PSS(
                mgf=padding.MGF1(digest[alg]), salt_length=digest[alg].digest_size)
        else:
            pad = padding.PKCS1v15()
        signature = ISSUER_KEY.sign(signing_input, pad, digest.get(alg, hashes.SHA256()))
    return f"{signing_input.decode()}.{b64u(signature)}"


def hmac_with_public_key(form: str) -> str:
    public = ISSUER_KEY.public_key()
    secret = {
        "pem": public.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo),
        "der": public.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo),
        "jwk": json.dumps(jwk_public()).encode(),
    }[form]
    h = b64u(json.dumps({"alg": "HS256", "kid": KID}))
    signing_input = f"{h}.{b64u(b'{}')}".encode()
    mac = hmac.HMAC(secret, hashes.SHA256())
    mac.update(signing_input)
    return f"{signing_input.decode()}.{b64u(mac.finalize())}"


def hostile_jws() -> dict[str, str]:
    now = int(time.time())
    good = {"alg": "PS256", "kid": KID}
    cases = {
        "alg none": token({"alg": "none", "kid": KID}, signature=b""),
        "alg None": token({"alg": "None", "kid": KID}, signature=b""),
        "alg NONE": token({"alg": "NONE", "kid": KID}, signature=b""),
        "empty signature": token(good, signature=b""),
        "RS256 valid signature": token({"alg": "RS256", "kid": KID}, alg="RS256"),
        "PS384 valid signature": token({"alg": "PS384", "kid": KID}, alg="PS384"),
        "kid traversal": token({"alg": "PS256", "kid": "../../etc/passwd"}),
        "kid sql": token({"alg": "PS256", "kid": "' OR 1=1--"}),
        "kid 10 KB": token({"alg": "PS256", "kid": "k" * 10_000}),
        "kid NUL": token({"alg": "PS256", "kid": "a\x00b"}),
        "jku": token({**good, "jku": "http://169.254.169.254/latest/meta-data/"}),
        "x5u": token({**good, "x5u": "http://169.254.169.254/"}),
        "jwk": token({**good, "jwk": jwk_public()}),
        "x5c": token({**good, "x5c": ["MIIB"]}),
        "crit unknown": token({**good, "crit": ["exp"], "exp": 1}),
        "crit named absent": token({**good, "crit": ["iss"]}),
        "crit empty": token({**good, "crit": []}),
        "crit alg": token({**good, "crit": ["alg"]}),
        "b64 false not critical": token({**good, "b64": False}),
        "b64 not boolean": token({**good, "b64": "false", "crit": ["b64"]}),
        "duplicate alg": token('{"alg":"none","alg":"PS256","kid":"' + KID + '"}'),
        "two segments": "eyJhbGciOiJQUzI1NiJ9.e30",
        "four segments": token(good) + ".AAAA",
        "trailing dot": token(good) + ".",
        "padding": token(good).replace(".", "=.", 1),
        "plus and slash": "eyJ+/.e30.AAAA",
        "bad utf-8": b64u(b"\xff\xfe{") + ".e30.AAAA",
        "header array": token('["PS256"]'),
        "json serialization": json.dumps({"payload": "e30", "signatures": []}),
        "jwe where jws expected": "eyJhbGciOiJSU0EtT0FFUC0yNTYiLCJlbmMiOiJBMjU2R0NNIn0.a.b.c.d",
        "iat 61 s ahead": token({**good, "iss": "paynet", "iat": now + 61,
                                 "jti": os.urandom(8).hex(), "crit": ["iss", "iat", "jti"]}),
        "iat 6 min old": token({**good, "iss": "paynet", "iat": now - 360,
                                "jti": os.urandom(8).hex(), "crit": ["iss", "iat", "jti"]}),
        "iat string": token({**good, "iss": "paynet", "iat": str(now), "jti": "j",
                             "crit": ["iss", "iat", "jti"]}),
        "iat 1e308": token('{"alg":"PS256","kid":"' + KID + '","iss":"paynet","iat":1e308,'
                           '"jti":"j","crit":["iss","iat","jti"]}'),
        "iat bool": token({**good, "iss": "paynet", "iat": True, "jti": "j",
                           "crit": ["iss", "iat", "jti"]}),
        "iss list": token({**good, "iss": ["paynet"], "iat": now, "jti": "j2",
                           "crit": ["iss", "iat", "jti"]}),
        "flipped signature bit": (lambda t: t[:-2] + ("A" if t[-2] != "A" else "B") + t[-1])(
            token(good)),
    }
    for form in ("pem", "der", "jwk"):
        cases[f"HS256 keyed with public {form}"] = hmac_with_public_key(form)
    return cases


@pytest.fixture(scope="module")
def issuer() -> Iterator[StaticServer]:
    server = StaticServer()
    server.body = json.dumps({"keys": [jwk_public()]}).encode()
    yield server
    server.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, issuer: StaticServer) -> Iterator[Daemon]:
    with running(tmp_path_factory.mktemp("hostile"), {
        "issuers.paynet": {"jwks_uri": issuer.url, "refetch_cooldown": "30s", "iss": "paynet"},
    }) as d:
        yield d


@pytest.fixture(scope="module")
def svc(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.client(daemon.service_token) as client:
        yield client


def assert_refused(answer: httpx.Response) -> None:
    assert 400 <= answer.status_code < 500, answer.text
    body = answer.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] in REFUSALS


CASE_NAMES = sorted(hostile_jws())


@pytest.mark.parametrize("name", CASE_NAMES)
def test_hostile_jws_is_refused_by_verify_unwrap_and_universal_link(
    daemon: Daemon, svc: httpx.Client, name: str
) -> None:
    compact = hostile_jws()[name]  # made now: the freshness cases are relative to now
    assert_refused(svc.post("/v1/verify/jws", json={"jws": compact, "issuer": "paynet"}))
    assert_refused(svc.post("/v1/unwrap", json={"jws": compact, "issuer": "paynet"}))
    link = ("https://dp.example.my/ofm/my/authorize/ais?consent_id=abc&signature="
            + compact.replace("&", "%26"))
    assert_refused(svc.post("/v1/verify/universal-link", json={"url": link}))
    assert daemon.healthy()


def test_replayed_jti_is_refused_the_second_time(svc: httpx.Client) -> None:
    fresh = token({"alg": "PS256", "kid": KID, "iss": "paynet", "iat": int(time.time()),
                   "jti": os.urandom(8).hex(), "crit": ["iss", "iat", "jti"]})
    assert svc.post("/v1/verify/jws", json={"jws": fresh, "issuer": "paynet"}).status_code == 200
    assert_refused(svc.post("/v1/verify/jws", json={"jws": fresh, "issuer": "paynet"}))


def test_a_20_mb_token_gets_413(svc: httpx.Client) -> None:
    huge = b64u(json.dumps({"alg": "PS256", "kid": KID, "x": "a" * 20_000_000})) + ".e30.AA"
    answer = svc.post("/v1/verify/jws", json={"jws": huge, "issuer": "paynet"})
    assert answer.status_code == 413


def enc_key(daemon: Daemon) -> Any:
    with daemon.public() as public:
        keys = KeySet.import_key_set(public.get("/jwks").json())
    return next(k for k in keys.keys if k.get("use") == "enc")


def hostile_jwes(daemon: Daemon) -> dict[str, str]:
    key = enc_key(daemon)
    good = jwe.encrypt_compact({"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": key.kid},
                               b'{"ok":1}', key, algorithms=["RSA-OAEP-256", "A256GCM"])
    h, ek, iv, ct, tag = good.split(".")

    def with_header(header: dict[str, Any]) -> str:
        return ".".join([b64u(json.dumps(header)), ek, iv, ct, tag])

    base = {"kid": key.kid, "enc": "A256GCM"}
    flipped_tag = base64.urlsafe_b64decode(tag + "==")
    flipped_tag = bytes([flipped_tag[0] ^ 1]) + flipped_tag[1:]
    return {
        "RSA1_5": with_header({**base, "alg": "RSA1_5"}),
        "PBES2 huge p2c": with_header({**base, "alg": "PBES2-HS256+A128KW", "p2c": 10**9,
                                       "p2s": "AAAAAAAAAAA"}),
        "dir": with_header({**base, "alg": "dir"}),
        "A128KW": with_header({**base, "alg": "A128KW"}),
        "ECDH-ES": with_header({**base, "alg": "ECDH-ES", "epk": {"kty": "EC"}}),
        "zip DEF": with_header({**base, "alg": "RSA-OAEP-256", "zip": "DEF"}),
        "flipped tag bit": ".".join([h, ek, iv, ct, b64u(flipped_tag)]),
        "truncated tag": ".".join([h, ek, iv, ct, tag[:8]]),
        "empty tag": ".".join([h, ek, iv, ct, ""]),
        "bad iv": ".".join([h, ek, b64u(b"\x00" * 12), ct, tag]),
        "edited header": with_header({**base, "alg": "RSA-OAEP-256", "x": 1}),
        "random encrypted key": ".".join([h, b64u(os.urandom(256)), iv, ct, tag]),
        "jws where jwe expected": token({"alg": "PS256", "kid": KID}),
        "unknown kid": with_header({**base, "alg": "RSA-OAEP-256", "kid": "../../etc/passwd"}),
    }


def test_hostile_jwes_are_refused_alike(daemon: Daemon, svc: httpx.Client) -> None:
    tampering = {"flipped tag bit", "truncated tag", "empty tag", "bad iv", "edited header",
                 "random encrypted key"}
    details = set()
    for name, compact in hostile_jwes(daemon).items():
        answer = svc.post("/v1/decrypt/jwe", json={"jwe": compact})
        assert_refused(answer)
        if name in tampering:
            details.add((answer.status_code, answer.json()["error"], answer.json()["detail"]))
    assert len(details) == 1, details  # one identical answer: no padding or tag oracle
    assert daemon.healthy()
    with daemon.public() as public:
        assert public.get("/jwks").status_code == 200


# ---------------------------------------------------------------------- mutations
# Every mutation of a genuine, fresh PayNet message signature, sent to each
# endpoint that verifies: none may be accepted, none may be a 5xx.

BAD_VALUES = [None, 0, -1, 1e308, True, [], {}, "", "x" * 300, "\x00"]
MUTATED_MEMBERS = ["alg", "kid", "crit", "iat", "jti", "iss", "b64"]
ADDED_MEMBERS = {"jku": "http://169.254.169.254/", "x5u": "http://169.254.169.254/",
                 "jwk": {"kty": "RSA", "n": "AQAB", "e": "AQAB"}, "x5c": ["AAAA"],
                 "zip": "DEF", "enc": "A256GCM", "p2c": 10**9}


def genuine_header() -> dict[str, Any]:
    return {"alg": "PS256", "kid": KID, "iss": "paynet", "iat": int(time.time()),
            "jti": os.urandom(8).hex(), "crit": ["iss", "iat", "jti"]}


def mutation(name: str) -> str:
    """The mutated token for ``name``, built fresh (the iat is now)."""
    kind, _, arg = name.partition(":")
    header = genuine_header()
    if kind == "value":
        member, index = arg.split("=")
        header[member] = BAD_VALUES[int(index)]
        return token(header)
    if kind == "add":
        header[arg] = ADDED_MEMBERS[arg]
        return token(header)
    parts = token(header).split(".")
    segment, where = arg.split("@")
    i = int(segment)
    if kind == "flip":
        raw = bytearray(base64.urlsafe_b64decode(parts[i] + "=" * (-len(parts[i]) % 4)))
        position = {"first": 0, "middle": len(raw) // 2, "last": len(raw) - 1}[where]
        raw[position] ^= 0x01
        parts[i] = b64u(bytes(raw))
    elif kind == "cut":
        parts[i] = parts[i][: -int(where)] if int(where) else ""
    return ".".join(parts)


# Values that are odd but valid for a member (a jti of one NUL character; b64
# true, the default) are not hostile: those pairs are left out.
HARMLESS = {("jti", BAD_VALUES.index("\x00")), ("b64", BAD_VALUES.index(True))}
MUTATIONS = (
    [f"value:{m}={i}" for m in MUTATED_MEMBERS for i in range(len(BAD_VALUES))
     if (m, i) not in HARMLESS]
    + [f"add:{m}" for m in ADDED_MEMBERS]
    + [f"flip:{s}@{w}" for s in range(3) for w in ("first", "middle", "last")]
    + [f"cut:{s}@{n}" for s in range(3) for n in (1, 4, 0)]
)
ENDPOINTS = ["verify", "unwrap", "universal-link"]


def send(svc: httpx.Client, endpoint: str, compact: str) -> httpx.Response:
    if endpoint == "universal-link":
        link = ("https://dp.example.my/ofm/my/authorize/ais?consent_id=e30&signature="
                + compact)
        return svc.post("/v1/verify/universal-link", json={"url": link})
    path = "/v1/verify/jws" if endpoint == "verify" else "/v1/unwrap"
    return svc.post(path, json={"jws": compact, "issuer": "paynet"})


def test_the_genuine_message_signature_verifies(svc: httpx.Client) -> None:
    """The mutations below start from a token the daemon accepts."""
    answer = send(svc, "verify", token(genuine_header()))
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("name", MUTATIONS)
def test_mutated_message_signatures_are_refused(
    daemon: Daemon, svc: httpx.Client, name: str, endpoint: str
) -> None:
    assert_refused(send(svc, endpoint, mutation(name)))
