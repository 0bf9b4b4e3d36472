"""The real daemon on the local backend over real sockets.

The HTTP contract every backend passes (JWKS, signing, decryption, the local
API) is :class:`tests.daemon_contract.DaemonContract`, run here on the local
backend; this module adds what does not depend on the backend: verifying a
counterparty's signatures, access control and hostile requests.  Every token
keyd makes is checked with joserfc, using only the JWKS fetched from the
public port."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from joserfc import jwe, jws
from joserfc.jwk import RSAKey

from tests.daemon import Daemon, StaticServer, keyd, running
from tests.daemon_contract import ALL_OAEP_ALGS, DaemonContract, published
from tests.fixtures.jose import b64u

pytestmark = pytest.mark.slow  # a real keyd process per test or module

CONSENT_ID = "18ce19c8-85be-4049-899c-21cdc02cde79"


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


class TestLocalDaemon(DaemonContract):
    backend = "local"
    decrypts = frozenset(ALL_OAEP_ALGS)


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
    enc_key = published(daemon, "enc")
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


def test_calls_without_a_valid_token_are_audited_as_refused(daemon: Daemon) -> None:
    """The 401s of the contract's test leave an audit trail (read with `keyd audit`)."""
    for token in (None, "keyd_not-a-real-token", ""):
        with daemon.client(token) as client:
            assert client.post("/v1/sign/jws", json={"payload": "x"}).status_code == 401
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


