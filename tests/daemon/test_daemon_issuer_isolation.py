"""THREATS "issuer isolation": one issuer's JWKS fetch held open (by an event,
not a sleep) must not hold up signs, decrypts or another issuer's verifies,
however many callers are waiting on it; concurrent misses share one fetch."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from joserfc import jwe
from joserfc.jwk import KeySet

from tests.fixtures.daemon import Daemon, StaticServer, running
from tests.fixtures.jose import b64u

pytestmark = pytest.mark.slow  # a real keyd process per test or module

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
WAITERS = 40  # more than the API's 32 worker threads


def jwk(kid: str) -> dict[str, Any]:
    numbers = KEY.public_key().public_numbers()
    return {"kty": "RSA", "kid": kid, "use": "sig", "alg": "PS256",
            "n": b64u(numbers.n.to_bytes(256, "big")), "e": b64u(numbers.e.to_bytes(3, "big"))}


def token(kid: str, payload: str) -> str:
    signing_input = f"{b64u(json.dumps({'alg': 'PS256', 'kid': kid}))}.{b64u(payload)}"
    signature = KEY.sign(signing_input.encode(), padding.PSS(
        mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256())
    return f"{signing_input}.{b64u(signature)}"


class HeldJwks(StaticServer):
    """A JWKS endpoint that, once ``hold`` is set, keeps each request open
    until ``release`` is set, announcing it on ``held``."""

    def __init__(self, kid: str) -> None:
        super().__init__()
        self.body = json.dumps({"keys": [jwk(kid)]}).encode()
        self.hold = threading.Event()
        self.held = threading.Event()
        self.release = threading.Event()

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        if self.hold.is_set():
            self.held.set()
            self.release.wait(60)  # bounded, in case the test fails first
        super().answer(handler)

    def close(self) -> None:
        self.release.set()
        super().close()


@pytest.fixture
def issuers() -> Iterator[dict[str, HeldJwks]]:
    servers = {"slow": HeldJwks("slow-1"), "paynet": HeldJwks("paynet-1")}
    yield servers
    for server in servers.values():
        server.close()


@pytest.fixture
def daemon(tmp_path: Any, issuers: dict[str, HeldJwks]) -> Iterator[Daemon]:
    with running(tmp_path, {
        "api": {"rate_limit": 0},
        "issuers.slow": {"jwks_uri": issuers["slow"].url, "refetch_cooldown": "0s",
                         "fetch_timeout": 5},
        "issuers.paynet": {"jwks_uri": issuers["paynet"].url},
    }) as d:
        yield d


def test_issuer_isolation_a_held_fetch_blocks_no_sign_decrypt_or_other_issuer(
    daemon: Daemon, issuers: dict[str, HeldJwks]
) -> None:
    slow, paynet = issuers["slow"], issuers["paynet"]
    fetched_at_start = slow.requests  # the start-up refresh, answered at once
    slow.hold.set()
    with daemon.client(daemon.service_token) as svc, \
            ThreadPoolExecutor(max_workers=WAITERS) as pool:
        # Unknown kids: each verify needs the slow issuer's refetch.
        waiting = [pool.submit(svc.post, "/v1/verify/jws", json={
            "jws": token(f"rotated-{i}", "x"), "issuer": "slow"}) for i in range(WAITERS)]
        assert slow.held.wait(30), "the slow issuer's refetch never started"

        signed = svc.post("/v1/sign/jws", json={"payload": {"during": "the held fetch"}})
        with daemon.public() as public:
            keys = KeySet.import_key_set(public.get("/jwks").json())
        enc = next(k for k in keys.keys if k.get("use") == "enc")
        sealed = jwe.encrypt_compact({"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": enc.kid},
                                     b'{"n": 1}', enc, algorithms=["RSA-OAEP-256", "A256GCM"])
        decrypted = svc.post("/v1/decrypt/jwe", json={"jwe": sealed})
        verified = svc.post("/v1/verify/jws", json={"jws": token("paynet-1", "y"),
                                                    "issuer": "paynet"})
        # All of that finished while the slow issuer's one fetch was still held
        # and every caller that needs it was still waiting (had the fetch held
        # the worker threads, they would have been answered first).
        assert not slow.release.is_set()
        assert not any(f.done() for f in waiting)
        assert signed.status_code == 200, signed.text
        assert decrypted.status_code == 200 and decrypted.json()["payload"] == {"n": 1}
        assert verified.status_code == 200, verified.text
        # Forty concurrent misses, one fetch on the wire.
        assert slow.requests == fetched_at_start + 1
        assert paynet.requests == 1

        slow.release.set()
        answers = [f.result(timeout=60) for f in waiting]
    # An unknown kid once the fetch is done (422), or told the issuer was too
    # slow (503, Retry-After): never a hang, never another error.
    assert {a.status_code for a in answers} <= {422, 503}, {a.text for a in answers}
    for answer in answers:
        if answer.status_code == 503:
            assert answer.headers["retry-after"]
            assert answer.json()["error"] == "issuer_unavailable"
    assert daemon.healthy()


def test_issuer_isolation_known_kids_of_a_held_issuer_answer_from_cache(
    daemon: Daemon, issuers: dict[str, HeldJwks]
) -> None:
    """Only calls that need the held fetch wait: a known kid of the same issuer does not."""
    slow = issuers["slow"]
    slow.hold.set()
    with daemon.client(daemon.service_token) as svc, \
            ThreadPoolExecutor(max_workers=1) as pool:
        miss = pool.submit(svc.post, "/v1/verify/jws", json={
            "jws": token(str(uuid.uuid4()), "x"), "issuer": "slow"})
        assert slow.held.wait(30)
        known = svc.post("/v1/verify/jws", json={"jws": token("slow-1", "z"), "issuer": "slow"})
        assert not slow.release.is_set()
        assert known.status_code == 200, known.text
        slow.release.set()
        assert miss.result(timeout=60).status_code in (422, 503)
    assert daemon.healthy()
