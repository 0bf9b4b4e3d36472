"""The HTTP contract every backend's daemon passes: the same tests, whatever holds the keys.

A backend's daemon module subclasses :class:`DaemonContract`, provides a
``daemon`` fixture (the real `keyd serve`, over real sockets, on that
backend) and says what it declares: ``backend`` (the name the admin API
reports) and ``decrypts`` (the JWE key-management algorithms its
``Capabilities`` allow; the rest must be refused as the sender's error).

Everything keyd makes is checked with joserfc, an independent JOSE library,
using only the JWKS fetched from the public port; PS256 signatures are also
checked for the exact 32-byte salt RFC 7518 asks for.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jwe, jws, jwt
from joserfc.jwk import KeySet, RSAKey
from joserfc.registry import HeaderParameter

from tests.backend_contract import strict_pss_verify
from tests.daemon import Daemon
from tests.fixtures.jose import PRIVATE_JWK_MEMBERS, b64u, b64u_decode

ALL_OAEP_ALGS = ("RSA-OAEP-256", "RSA-OAEP")
ENCS = ("A256GCM", "A128GCM", "A128CBC-HS256", "A256CBC-HS512")


def fetched_jwks(daemon: Daemon) -> KeySet:
    """The JWKS exactly as PayNet would fetch it: public port, no credentials."""
    with daemon.public() as public:
        answer = public.get("/jwks")
    assert answer.status_code == 200, answer.text
    return KeySet.import_key_set(answer.json())


def published(daemon: Daemon, use: str) -> Any:
    return next(k for k in fetched_jwks(daemon).keys if k.get("use") == use)


def rsa_public(jwk: Any) -> rsa.RSAPublicKey:
    """The RSA public key of a fetched JWK, for checks joserfc does not make."""
    members: dict[str, str] = jwk.as_dict(private=False)
    return rsa.RSAPublicNumbers(
        int.from_bytes(b64u_decode(members["e"]), "big"),
        int.from_bytes(b64u_decode(members["n"]), "big"),
    ).public_key()


class DaemonContract:
    """Subclass, set ``backend`` and ``decrypts``, and provide a ``daemon`` fixture."""

    backend: ClassVar[str]
    decrypts: ClassVar[frozenset[str]]

    @pytest.fixture
    def svc(self, daemon: Daemon) -> Iterator[httpx.Client]:
        with daemon.client(daemon.service_token) as client:
            yield client

    @pytest.fixture
    def admin(self, daemon: Daemon) -> Iterator[httpx.Client]:
        with daemon.client(daemon.admin_token) as client:
            yield client

    # ------------------------------------------------------------------ public JWKS

    def test_jwks_publishes_signing_and_encryption_keys_with_thumbprint_kids(
        self, daemon: Daemon
    ) -> None:
        with daemon.public() as public:
            answer = public.get("/jwks")
            again = public.get("/.well-known/jwks.json")
        assert answer.status_code == 200
        assert answer.json() == again.json()
        keys = answer.json()["keys"]
        assert sorted((k["use"], k["alg"]) for k in keys) == [
            ("enc", "RSA-OAEP-256"), ("sig", "PS256")]
        for key in keys:
            assert not PRIVATE_JWK_MEMBERS & set(key)
            assert key["kty"] == "RSA"
            der = base64.b64decode(key["x5c"][0])
            assert key["kid"] == key["x5t#S256"] == b64u(hashlib.sha256(der).digest())
            assert len(key["kid"]) == 43

    def test_jwks_has_cache_control_etag_and_answers_304(self, daemon: Daemon) -> None:
        with daemon.public() as public:
            first = public.get("/jwks")
            etag = first.headers["etag"]
            assert first.headers["cache-control"] == "public, max-age=300"
            cached = public.get("/jwks", headers={"If-None-Match": etag})
            other = public.get("/jwks", headers={"If-None-Match": '"something-else"'})
        assert cached.status_code == 304 and cached.content == b""
        assert other.status_code == 200

    def test_public_listener_serves_nothing_but_the_jwks(self, daemon: Daemon) -> None:
        with daemon.public() as public:
            for path in ("/v1/keys", "/v1/sign/jws", "/metrics", "/readyz", "/admin", "/"):
                answer = (public.post(path, json={}) if path == "/v1/sign/jws"
                          else public.get(path))
                assert answer.status_code == 404, path
                assert answer.json()["error"] == "not_found"
            assert public.get("/healthz").status_code == 200

    # ------------------------------------------------------------------ signing

    def test_client_assertion_has_paynets_exact_claims_and_verifies_with_joserfc(
        self, daemon: Daemon, svc: httpx.Client
    ) -> None:
        audience = "https://auth.sandbox.example/oauth2/token"
        answer = svc.post("/v1/client-assertion", json={"audience": audience})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["client_assertion_type"] == (
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        token = jwt.decode(body["client_assertion"], fetched_jwks(daemon), algorithms=["PS256"])
        assert token.header == {"alg": "PS256", "kid": body["kid"]}
        assert body["kid"] == published(daemon, "sig").kid
        claims = token.claims
        assert claims["iss"] == claims["sub"] == "test-client-0001"
        assert claims["aud"] == audience
        assert claims["exp"] == claims["iat"] + 600
        assert abs(claims["iat"] - time.time()) < 60
        assert uuid.UUID(claims["jti"]).version == 4

    def test_attached_jws_has_only_alg_and_kid_and_a_32_byte_pss_salt(
        self, daemon: Daemon, svc: httpx.Client
    ) -> None:
        answer = svc.post("/v1/sign/jws", json={"payload": {"consent": "abc"}})
        assert answer.status_code == 200, answer.text
        compact = answer.json()["jws"]
        result = jws.deserialize_compact(compact, fetched_jwks(daemon), algorithms=["PS256"])
        assert json.loads(result.payload) == {"consent": "abc"}
        assert result.protected == {"alg": "PS256", "kid": answer.json()["kid"]}
        # joserfc checks a hash-length salt today; say it here too, independent of its version.
        header, payload, signature = compact.split(".")
        strict_pss_verify(rsa_public(published(daemon, "sig")), b64u_decode(signature),
                          f"{header}.{payload}".encode())

    def test_jws_over_json_payload_keeps_the_callers_typ(
        self, daemon: Daemon, svc: httpx.Client
    ) -> None:
        answer = svc.post("/v1/sign/jws", json={"payload": {"consent": "abc", "n": 1},
                                                "header": {"typ": "JOSE"}})
        assert answer.status_code == 200, answer.text
        result = jws.deserialize_compact(answer.json()["jws"], fetched_jwks(daemon),
                                         algorithms=["PS256"])
        assert json.loads(result.payload) == {"consent": "abc", "n": 1}
        assert result.protected["kid"] == answer.json()["kid"]
        assert result.protected["typ"] == "JOSE"

    def test_detached_message_signature_carries_paynets_header_claims(
        self, daemon: Daemon, svc: httpx.Client
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

    def test_signed_jwt_gets_iat_exp_and_jti(self, daemon: Daemon, svc: httpx.Client) -> None:
        answer = svc.post("/v1/sign/jwt", json={"claims": {"scope": "accounts"}, "ttl": 120})
        assert answer.status_code == 200, answer.text
        claims = jwt.decode(answer.json()["jwt"], fetched_jwks(daemon),
                            algorithms=["PS256"]).claims
        assert claims["scope"] == "accounts"
        assert claims["exp"] == claims["iat"] + 120
        assert claims["jti"]

    def test_eight_clients_signing_at_once_all_get_valid_signatures(
        self, daemon: Daemon
    ) -> None:
        threads_n, per_thread = 8, 6
        barrier = threading.Barrier(threads_n)
        answers: list[tuple[bytes, httpx.Response]] = []
        lock = threading.Lock()

        def client(i: int) -> None:
            with daemon.client(daemon.service_token) as http:
                barrier.wait(timeout=30)
                for n in range(per_thread):
                    payload = f"client {i} message {n}".encode()
                    answer = http.post("/v1/sign/jws", json={"payload_b64": b64u(payload)})
                    with lock:
                        answers.append((payload, answer))

        workers = [threading.Thread(target=client, args=(i,)) for i in range(threads_n)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert len(answers) == threads_n * per_thread
        jwks = fetched_jwks(daemon)
        for payload, answer in answers:
            assert answer.status_code == 200, answer.text
            verified = jws.deserialize_compact(answer.json()["jws"], jwks, algorithms=["PS256"])
            assert verified.payload == payload

    # ------------------------------------------------------------------ decryption

    @pytest.mark.parametrize("alg", ALL_OAEP_ALGS)
    @pytest.mark.parametrize("enc", ENCS)
    def test_jwe_made_by_joserfc_decrypts_when_the_backend_declares_its_alg(
        self, daemon: Daemon, svc: httpx.Client, alg: str, enc: str
    ) -> None:
        """A declared alg decrypts; any other is the sender's error: a clear JSON 422."""
        enc_key = published(daemon, "enc")
        plaintext = json.dumps({"balance": "1.00", "alg": alg, "enc": enc}).encode()
        token = jwe.encrypt_compact({"alg": alg, "enc": enc, "kid": enc_key.kid}, plaintext,
                                    enc_key, algorithms=[alg, enc])
        answer = svc.post("/v1/decrypt/jwe", json={"jwe": token})
        if alg not in self.decrypts:
            assert answer.status_code == 422, answer.text
            assert answer.json()["error"] == "invalid_token"
            assert alg in answer.json()["detail"] and self.backend in answer.json()["detail"]
            assert "RSA-OAEP-256" in answer.json()["detail"]
            assert daemon.healthy()
            return
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert b64u_decode(body["plaintext_b64"]) == plaintext
        assert body["payload"] == json.loads(plaintext)
        assert body["kid"] == enc_key.kid
        assert body["header"]["enc"] == enc

    def test_jwe_to_our_signing_key_is_refused(self, daemon: Daemon, svc: httpx.Client) -> None:
        sig = published(daemon, "sig")
        # joserfc rightly refuses to encrypt to a "use": "sig" key; strip it to build the attack.
        members = {k: v for k, v in sig.as_dict(private=False).items() if k != "use"}
        token = jwe.encrypt_compact({"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": sig.kid},
                                    b"x", RSAKey.import_key(members),
                                    algorithms=["RSA-OAEP-256", "A256GCM"])
        answer = svc.post("/v1/decrypt/jwe", json={"jwe": token})
        assert answer.status_code == 422
        assert answer.json()["error"] == "invalid_token"

    # ------------------------------------------------------------------ the local API

    def test_admin_lists_the_active_keys_of_every_purpose_on_this_backend(
        self, admin: httpx.Client
    ) -> None:
        answer = admin.get("/v1/keys")
        assert answer.status_code == 200
        keys = answer.json()["keys"]
        assert {k["backend"] for k in keys} == {self.backend}
        assert {k["purpose"] for k in keys if k["state"] == "active"} == {
            "signing", "encryption", "transport"}

    def test_calls_without_a_valid_token_get_401(self, daemon: Daemon) -> None:
        for token in (None, "keyd_not-a-real-token", ""):
            with daemon.client(token) as client:
                answer = client.post("/v1/sign/jws", json={"payload": "x"})
            assert answer.status_code == 401
            assert answer.json()["error"] == "unauthorized"
        with daemon.client() as client:
            basic = client.post("/v1/sign/jws", json={"payload": "x"},
                                headers={"Authorization": f"Basic {daemon.service_token}"})
        assert basic.status_code == 401

    def test_unix_socket_serves_the_local_api(self, daemon: Daemon) -> None:
        assert daemon.socket.stat().st_mode & 0o777 == 0o600
        with daemon.socket_client(daemon.service_token) as client:
            answer = client.post("/v1/sign/jws", json={"payload": {"via": "socket"}})
        assert answer.status_code == 200
        assert answer.json()["jws"].count(".") == 2

    def test_readyz_and_metrics(self, daemon: Daemon, svc: httpx.Client) -> None:
        svc.post("/v1/sign/jws", json={"payload": "count me"})
        with daemon.client() as anonymous:
            ready = anonymous.get("/readyz")
            metrics = anonymous.get("/metrics").text
        assert ready.status_code == 200 and ready.json()["ready"] is True
        assert 'keyd_api_requests_total{operation="sign.jws",outcome="ok"}' in metrics
        assert "keyd_certificate_not_after_timestamp_seconds" in metrics

    def test_no_private_material_in_the_daemon_log(
        self, daemon: Daemon, svc: httpx.Client
    ) -> None:
        svc.post("/v1/sign/jws", json={"payload": "x"})
        log = (Path(daemon.config.parent) / "keyd.log").read_text()
        assert daemon.service_token not in log
        assert daemon.admin_token not in log
        assert "PRIVATE KEY" not in log
