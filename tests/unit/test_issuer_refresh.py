"""The scheduler keeps counterparty JWKS warm, uses the last good set while an
issuer is down, fails closed once that set is too old, and alerts both times."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from keyd.clock import SettableClock
from keyd.errors import IssuerUnavailable
from keyd.tokens import TokenService
from tests.fixtures.daemon import StaticServer
from tests.fixtures.jose import b64u
from tests.fixtures.service import T0, Recorder, jobs_for, open_service

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def signed(payload: bytes) -> str:
    header = b64u(json.dumps({"alg": "PS256", "kid": "pn-1"}).encode())
    signing_input = f"{header}.{b64u(payload)}".encode()
    signature = KEY.sign(signing_input, padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                                    salt_length=32), hashes.SHA256())
    return f"{signing_input.decode()}.{b64u(signature)}"


@pytest.fixture
def issuer() -> StaticServer:
    server = StaticServer()
    numbers = KEY.public_key().public_numbers()
    server.body = json.dumps({"keys": [{
        "kty": "RSA", "kid": "pn-1", "use": "sig", "alg": "PS256",
        "n": b64u(numbers.n.to_bytes(256, "big")), "e": b64u(numbers.e.to_bytes(3, "big")),
    }]}).encode()
    return server


def test_issuer_down_uses_the_last_good_set_then_fails_closed_and_alerts(
    tmp_path: Path, issuer: StaticServer
) -> None:
    clock = SettableClock(T0)
    service = open_service(tmp_path, clock, {
        "issuers.paynet": {"jwks_uri": issuer.url, "max_age": "15m"}})
    try:
        service.init()
        recorder = Recorder()
        jobs = jobs_for(service, recorder)
        tokens, caller = TokenService(service), service.admin_caller()
        assert "refreshed issuer paynet" in jobs.run().done
        fetches = issuer.requests

        issuer.status = 500
        clock.advance(timedelta(minutes=8))
        jobs.run()
        clock.advance(timedelta(minutes=1))
        jobs.run()  # still failing: no second alert the same day
        assert [(a.title, a.severity) for a in recorder.sent] == [
            ("issuer paynet JWKS unreachable", "warning")]
        # The last good set still verifies.
        assert tokens.verify_jws(caller, signed(b"ok"), "paynet").payload == b"ok"

        clock.advance(timedelta(minutes=7))  # 16 min since the last good fetch
        jobs.run()
        assert [a.severity for a in recorder.sent] == ["warning", "critical"]
        with pytest.raises(IssuerUnavailable):
            tokens.verify_jws(caller, signed(b"stale"), "paynet")

        issuer.status = 200
        clock.advance(timedelta(minutes=1))
        assert "refreshed issuer paynet" in jobs.run().done
        assert tokens.verify_jws(caller, signed(b"back"), "paynet").payload == b"back"
        assert issuer.requests > fetches
    finally:
        service.close()
        issuer.close()
