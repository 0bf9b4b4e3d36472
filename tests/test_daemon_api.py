"""The real daemon over real sockets: the JWKS PayNet fetches, and the local
API our services call.  Every token keyd makes is checked with joserfc, an
independent JOSE library, using only the JWKS fetched from the public port."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwe, jws, jwt
from joserfc.jwk import KeySet, RSAKey
from joserfc.registry import HeaderParameter

from tests.daemon import Daemon, StaticServer, keyd, running

pytestmark = pytest.mark.slow  # a real keyd process per test or module

PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
CONSENT_ID = "18ce19c8-85be-4049-899c-21cdc02cde79"


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64u_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class PayNet:
    """A counterparty: its own RSA key and a JWKS on a loopback server."""

    def __init__(self) -> None:
        self.key = RSAKey.generate_key(2048, parameters={"kid": "paynet-sig-1", "use": "sig"})
        self.server = StaticServer()
        self.server.body = json.dumps(
            {"keys": [self.key.as_dict(private=False)]}
        ).encode()

    def sign(self, payload: bytes | str, **header: Any) -> str:
        protected = {"alg": "PS256", "kid": "paynet-sig-1", **header}
        return jws.serialize_compact(protected, payload, self.key, algorithms=["PS256"])


@pytest.fixture(scope="module")
def paynet() -> Iterator[PayNet]:
    issuer = PayNet()
    yield issuer
    issuer.server.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, paynet: PayNet) -> Iterator[Daemon]:
    folder = tmp_path_factory.mktemp("daemon")
    with running(folder, {
        "issuers.paynet": {"jwks_uri": paynet.server.url, "algorithms": ["PS256"],
                           "max_age": "15m", "refetch_cooldown": "30s"},
    }) as d:
        yield d


@pytest.fixture
def svc(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.client(daemon.service_token) as client:
        yield client


@pytest.fixture
def admin(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.client(daemon.admin_token) as client:
        yield client


def fetched_jwks(daemon: Daemon) -> KeySet:
    with daemon.public() as public:
        return KeySet.import_key_set(public.get("/jwks").json())


# ---------------------------------------------------------------------- public JWKS


def test_jwks_publishes_signing_and_encryption_keys_with_thumbprint_kids(daemon: Daemon) -> None:
    with daemon.public() as public:
        answer = public.get("/jwks")
        again = public.get("/.well-known/jwks.json")
    assert answer.status_code == 200
    assert answer.json() == again.json()
    keys = answer.json()["keys"]
    assert sorted((k["use"], k["alg"]) for k in keys) == [("enc", "RSA-OAEP-256"), ("sig", "PS256")]
    for key in keys:
        assert not PRIVATE_MEMBERS & set(key)
        assert key["kty"] == "RSA"
        der = base64.b64decode(key["x5c"][0])
        import hashlib

        assert key["kid"] == key["x5t#S256"] == b64u(hashlib.sha256(der).digest())
        assert len(key["kid"]) == 43


def test_jwks_has_cache_control_etag_and_answers_304(daemon: Daemon) -> None:
    with daemon.public() as public:
        first = public.get("/jwks")
        etag = first.headers["etag"]
        assert first.headers["cache-control"] == "public, max-age=300"
        cached = public.get("/jwks", headers={"If-None-Match": etag})
        other = public.get("/jwks", headers={"If-None-Match": '"something-else"'})
    assert cached.status_code == 304 and cached.content == b""
    assert other.status_code == 200


def test_public_listener_serves_nothing_but_the_jwks(daemon: Daemon) -> None:
    with daemon.public() as public:
        for path in ("/v1/keys", "/v1/sign/jws", "/metrics", "/readyz", "/admin", "/"):
            answer = public.post(path, json={}) if path == "/v1/sign/jws" else public.get(path)
            assert answer.status_code == 404, path
            assert answer.json()["error"] == "not_found"
        assert public.get("/healthz").status_code == 200


# ---------------------------------------------------------------------- signing


def test_client_assertion_has_paynets_exact_claims_and_verifies_with_joserfc(
    daemon: Daemon, svc: httpx.Client
) -> None:
    audience = "https://auth.sandbox.example/oauth2/token"
    answer = svc.post("/v1/client-assertion", json={"audience": audience})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["client_assertion_type"] == (
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    token = jwt.decode(body["client_assertion"], fetched_jwks(daemon), algorithms=["PS256"])
    assert token.header == {"alg": "PS256", "kid": body["kid"]}
    claims = token.claims
    assert claims["iss"] == claims["sub"] == "test-client-0001"
    assert claims["aud"] == audience
    assert claims["exp"] == claims["iat"] + 600
    assert abs(claims["iat"] - time.time()) < 60
    assert uuid.UUID(claims["jti"]).version == 4


def test_jws_over_json_payload_verifies_with_joserfc(daemon: Daemon, svc: httpx.Client) -> None:
    answer = svc.post("/v1/sign/jws", json={"payload": {"consent": "abc", "n": 1},
                                            "header": {"typ": "JOSE"}})
    assert answer.status_code == 200, answer.text
    result = jws.deserialize_compact(answer.json()["jws"], fetched_jwks(daemon),
                                     algorithms=["PS256"])
    assert json.loads(result.payload) == {"consent": "abc", "n": 1}
    assert result.protected["kid"] == answer.json()["kid"]
    assert result.protected["typ"] == "JOSE"


def test_detached_message_signature_carries_paynets_header_claims(
    daemon: Daemon, svc: httpx.Client
) -> None:
    body = b'{"Data":{"ConsentId":"x"}}'
    answer = svc.post("/v1/sign/jws", json={"payload_b64": b64u(body), "detached": True,
                                            "claims_in_header": True})
    assert answer.status_code == 200, answer.text
    compact = answer.json()["jws"]
    header_b64, empty, _ = compact.split(".")
    assert empty == ""
    header = json.loads(b64u_decode(header_b64))
    assert header["iss"] == "test-client-0001"
    assert set(header["crit"]) == {"iss", "iat", "jti"}
    assert abs(header["iat"] - time.time()) < 60
    registry = jws.JWSRegistry(header_registry={
        "iss": HeaderParameter("Issuer", "str"),
        "iat": HeaderParameter("Issued at", "int"),
        "jti": HeaderParameter("JWT ID", "str"),
    }, algorithms=["PS256"])
    verified = jws.deserialize_compact(compact, fetched_jwks(daemon), payload=body,
                                       registry=registry)
    assert verified.payload == body


def test_signed_jwt_gets_iat_exp_and_jti(daemon: Daemon, svc: httpx.Client) -> None:
    answer = svc.post("/v1/sign/jwt", json={"claims": {"scope": "accounts"}, "ttl": 120})
    assert answer.status_code == 200, answer.text
    claims = jwt.decode(answer.json()["jwt"], fetched_jwks(daemon), algorithms=["PS256"]).claims
    assert claims["scope"] == "accounts"
    assert claims["exp"] == claims["iat"] + 120
    assert claims["jti"]


# ---------------------------------------------------------------------- decryption


@pytest.mark.parametrize("alg", ["RSA-OAEP-256", "RSA-OAEP"])
@pytest.mark.parametrize("enc", ["A256GCM", "A128GCM", "A128CBC-HS256", "A256CBC-HS512"])
def test_jwe_made_by_joserfc_to_our_jwks_decrypts(
    daemon: Daemon, svc: httpx.Client, alg: str, enc: str
) -> None:
    enc_key = next(k for k in fetched_jwks(daemon).keys if k.get("use") == "enc")
    plaintext = json.dumps({"balance": "1.00", "alg": alg, "enc": enc}).encode()
    token = jwe.encrypt_compact({"alg": alg, "enc": enc, "kid": enc_key.kid}, plaintext,
                                enc_key, algorithms=[alg, enc])
    answer = svc.post("/v1/decrypt/jwe", json={"jwe": token})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert b64u_decode(body["plaintext_b64"]) == plaintext
    assert body["payload"] == json.loads(plaintext)
    assert body["kid"] == enc_key.kid
    assert body["header"]["enc"] == enc


def test_jwe_to_our_signing_key_is_refused(daemon: Daemon, svc: httpx.Client) -> None:
    published = next(k for k in fetched_jwks(daemon).keys if k.get("use") == "sig")
    # joserfc rightly refuses to encrypt to a "use": "sig" key; strip it to build the attack.
    members = {k: v for k, v in published.as_dict(private=False).items() if k != "use"}
    sig_key = RSAKey.import_key(members)
    token = jwe.encrypt_compact({"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": published.kid},
                                b"x", sig_key, algorithms=["RSA-OAEP-256", "A256GCM"])
    answer = svc.post("/v1/decrypt/jwe", json={"jwe": token})
    assert answer.status_code == 422
    assert answer.json()["error"] == "invalid_token"


# ---------------------------------------------------------------------- verification


def test_verify_accepts_paynets_signature_from_its_jwks(
    daemon: Daemon, svc: httpx.Client, paynet: PayNet
) -> None:
    token = paynet.sign(json.dumps({"status": "ok"}))
    answer = svc.post("/v1/verify/jws", json={"jws": token, "issuer": "paynet"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["valid"] is True
    assert answer.json()["payload"] == {"status": "ok"}
    assert answer.json()["kid"] == "paynet-sig-1"


def test_verify_refuses_a_tampered_signature(
    daemon: Daemon, svc: httpx.Client, paynet: PayNet
) -> None:
    header, payload, signature = paynet.sign("hello").split(".")
    forged = ".".join([header, b64u(b"goodbye"), signature])
    answer = svc.post("/v1/verify/jws", json={"jws": forged, "issuer": "paynet"})
    assert answer.status_code == 422
    assert answer.json()["error"] == "invalid_signature"


def test_unwrap_verifies_paynets_signature_then_decrypts_the_inner_jwe(
    daemon: Daemon, svc: httpx.Client, paynet: PayNet
) -> None:
    enc_key = next(k for k in fetched_jwks(daemon).keys if k.get("use") == "enc")
    inner = jwe.encrypt_compact({"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": enc_key.kid},
                                json.dumps({"Data": {"Accounts": []}}), enc_key,
                                algorithms=["RSA-OAEP-256", "A256GCM"])
    answer = svc.post("/v1/unwrap", json={"jws": paynet.sign(inner), "issuer": "paynet"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["payload"] == {"Data": {"Accounts": []}}
    assert body["kid"] == enc_key.kid
    assert body["signer_kid"] == "paynet-sig-1"


def test_universal_link_signed_over_the_consent_id_verifies(
    daemon: Daemon, svc: httpx.Client, paynet: PayNet
) -> None:
    signature = paynet.sign(CONSENT_ID.encode())
    assert signature.split(".")[1] == "MThjZTE5YzgtODViZS00MDQ5LTg5OWMtMjFjZGMwMmNkZTc5"
    url = (f"https://dp.example.my/ofm/my/authorize/ais?consent_id={CONSENT_ID}"
           f"&signature={signature}&redirect_uri=https%3A%2F%2Ftpp.example%2Fcb")
    answer = svc.post("/v1/verify/universal-link", json={"url": url})
    assert answer.status_code == 200, answer.text
    assert answer.json()["consent_id"] == CONSENT_ID


def test_universal_link_whose_signature_covers_another_consent_is_refused(
    daemon: Daemon, svc: httpx.Client, paynet: PayNet
) -> None:
    signature = paynet.sign(str(uuid.uuid4()).encode())
    url = f"https://dp.example.my/ofm/my/authorize/ais?consent_id={CONSENT_ID}&signature={signature}"
    answer = svc.post("/v1/verify/universal-link", json={"url": url})
    assert answer.status_code == 422
    assert answer.json()["error"] == "invalid_signature"


# ---------------------------------------------------------------------- access control


def test_calls_without_a_valid_token_get_401(daemon: Daemon) -> None:
    for token in (None, "keyd_not-a-real-token", ""):
        with daemon.client(token) as client:
            answer = client.post("/v1/sign/jws", json={"payload": "x"})
        assert answer.status_code == 401
        assert answer.json()["error"] == "unauthorized"
    with daemon.client() as client:
        basic = client.post("/v1/sign/jws", json={"payload": "x"},
                            headers={"Authorization": f"Basic {daemon.service_token}"})
    assert basic.status_code == 401
    audited = json.loads(keyd(
        daemon.config, "audit", "--action", "sign.jws", "--json", "--limit", "1000"
    ).stdout)
    refusals = [e for e in audited if e["actor"] == "unauthenticated"]
    assert len(refusals) >= 4
    assert {e["outcome"] for e in refusals} == {"refused"}
    assert {e["detail"]["error"] for e in refusals} == {"unauthorized"}


def test_service_policy_may_not_make_admin_calls(svc: httpx.Client) -> None:
    for method, path in (("GET", "/v1/keys"), ("GET", "/v1/keys/x/csr")):
        answer = svc.request(method, path)
        assert answer.status_code == 403, path
        assert answer.json()["error"] == "forbidden"


def test_service_policy_may_not_assert_a_foreign_client_id(svc: httpx.Client) -> None:
    answer = svc.post("/v1/client-assertion",
                      json={"audience": "https://as.example/token", "client_id": "someone-else"})
    assert answer.status_code == 403
    jwt_answer = svc.post("/v1/sign/jwt", json={"claims": {"iss": "someone-else"}})
    assert jwt_answer.status_code == 403


def test_caller_may_not_set_security_headers(svc: httpx.Client) -> None:
    for name, value in (("alg", "RS256"), ("jku", "http://169.254.169.254/"), ("kid", "x"),
                        ("crit", ["b64"]), ("jwk", {"kty": "RSA"}), ("b64", False)):
        answer = svc.post("/v1/sign/jws", json={"payload": "x", "header": {name: value}})
        assert answer.status_code in (400, 403), name
        assert "error" in answer.json()


def test_admin_lists_keys(admin: httpx.Client) -> None:
    answer = admin.get("/v1/keys")
    assert answer.status_code == 200
    keys = answer.json()["keys"]
    assert {k["purpose"] for k in keys if k["state"] == "active"} == {
        "signing", "encryption", "transport"}


def test_unix_socket_serves_the_local_api(daemon: Daemon) -> None:
    assert daemon.socket.stat().st_mode & 0o777 == 0o600
    with daemon.socket_client(daemon.service_token) as client:
        answer = client.post("/v1/sign/jws", json={"payload": {"via": "socket"}})
    assert answer.status_code == 200
    assert answer.json()["jws"].count(".") == 2


# ---------------------------------------------------------------------- hostile requests


@pytest.mark.parametrize(
    "content, status",
    [
        (b"not json", 400),
        (b"[1, 2]", 400),
        (b'{"payload": ', 400),
        (b"[" * 100_000 + b"]" * 100_000, 413),
        (b'{"payload_b64": "a+b/c="}', 400),
        (b'{"payload_b64": 5}', 400),
        (b'{"header": [1]}', 400),
        (b'{"payload": "x", "detached": "yes"}', 400),
        (b"\xff\xfe", 400),
    ],
)
def test_malformed_sign_requests_get_a_json_4xx(
    daemon: Daemon, svc: httpx.Client, content: bytes, status: int
) -> None:
    answer = svc.post("/v1/sign/jws", content=content,
                      headers={"Content-Type": "application/json"})
    assert answer.status_code == status
    assert set(answer.json()) == {"error", "detail"}
    assert daemon.healthy()


def test_oversized_body_gets_413_before_it_is_read(daemon: Daemon, svc: httpx.Client) -> None:
    big = b'{"payload": "' + b"a" * (2 * 1024 * 1024) + b'"}'
    answer = svc.post("/v1/sign/jws", content=big, headers={"Content-Type": "application/json"})
    assert answer.status_code == 413
    assert answer.json()["error"] == "payload_too_large"
    assert daemon.healthy()


def test_a_lying_content_length_is_not_trusted(daemon: Daemon) -> None:
    import socket

    host, port = daemon.api_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        body = b'{"payload": "' + b"a" * 400_000 + b'"}'
        request = (b"POST /v1/sign/jws HTTP/1.1\r\nHost: keyd\r\n"
                   b"Authorization: Bearer " + daemon.service_token.encode() + b"\r\n"
                   b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
        sock.sendall(request)
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413")
    assert daemon.healthy()


def test_unknown_issuer_and_unknown_route_are_json_404(svc: httpx.Client) -> None:
    answer = svc.post("/v1/verify/jws", json={"jws": "a.b.c", "issuer": "nobody"})
    assert answer.status_code in (404, 422)
    assert svc.get("/v1/nothing").json()["error"] == "not_found"


def test_readyz_and_metrics(daemon: Daemon, svc: httpx.Client) -> None:
    svc.post("/v1/sign/jws", json={"payload": "count me"})
    with daemon.client() as anonymous:
        ready = anonymous.get("/readyz")
        metrics = anonymous.get("/metrics").text
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert 'keyd_api_requests_total{operation="sign.jws",outcome="ok"}' in metrics
    assert "keyd_certificate_not_after_timestamp_seconds" in metrics


def test_no_private_material_in_the_daemon_log(daemon: Daemon, svc: httpx.Client) -> None:
    svc.post("/v1/sign/jws", json={"payload": "x"})
    log = (Path(daemon.config.parent) / "keyd.log").read_text()
    assert daemon.service_token not in log
    assert daemon.admin_token not in log
    assert "PRIVATE KEY" not in log
