"""IssuerKeys against a real loopback HTTP server whose behaviour each test sets.

The server counts requests, so "exactly one refetch" is observed on the wire.
Caches expire by moving a SettableClock; the only real waiting is the fetch
timeout in the slow-server cases (fetch_timeout = 1 s).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from keyd.clock import SettableClock
from keyd.config import IssuerSettings
from keyd.errors import InvalidSignature, InvalidToken, IssuerUnavailable
from keyd.issuers import IssuerKeys
from keyd.jose import b64u_encode, public_jwk, verify_jws
from keyd.jose.keys import Curve, IssuerKey
from tests.fixtures.certs import self_signed

START = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
MAX_AGE = timedelta(minutes=15)
COOLDOWN = timedelta(seconds=30)

KEY_A = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEY_B = rsa.generate_private_key(public_exponent=65537, key_size=2048)
WEAK = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 -- the weak key to be dropped
EC_KEY = ec.generate_private_key(ec.SECP256R1())



def _cert(key: rsa.RSAPrivateKey) -> x509.Certificate:
    return self_signed(key, START, 'PayNet test')


CERT_A = _cert(KEY_A)
JWK_A = public_jwk(KEY_A.public_key(), kid="a", use="sig", alg="PS256", chain=[CERT_A])
JWK_B = public_jwk(KEY_B.public_key(), kid="b", use="sig", alg="PS256", chain=[])


def _ec_jwk(kid: str) -> dict[str, Any]:
    numbers = EC_KEY.public_key().public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "kid": kid,
        "use": "sig",
        "x": b64u_encode(numbers.x.to_bytes(32, "big")),
        "y": b64u_encode(numbers.y.to_bytes(32, "big")),
    }


def _doc(*keys: dict[str, Any]) -> bytes:
    return json.dumps({"keys": list(keys)}).encode()


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    drip: float | None = None  # seconds between single bytes; 0 = one byte then stall
    length: bool = True  # send Content-Length


class JwksServer:
    """A loopback JWKS endpoint; ``reply`` is what it answers, ``requests`` how often."""

    def __init__(self) -> None:
        self.reply = Reply(body=_doc(JWK_A))
        self.requests: dict[str, int] = {}
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
                server.requests[self.path] = server.requests.get(self.path, 0) + 1
                r = server.reply
                self.send_response(r.status)
                for name, value in r.headers.items():
                    self.send_header(name, value)
                if r.length:
                    self.send_header("Content-Length", str(len(r.body)))
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    if r.drip is None:
                        self.wfile.write(r.body)
                        return
                    for i in range(len(r.body)):
                        self.wfile.write(r.body[i : i + 1])
                        self.wfile.flush()
                        # The server's own slowness, not the test's: bounded by release.
                        if server.release.wait(r.drip if r.drip else 5):
                            return
                except OSError:
                    return  # the client gave up, as it should

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks"

    @property
    def count(self) -> int:
        return self.requests.get("/jwks", 0)

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[JwksServer]:
    s = JwksServer()
    yield s
    s.close()


@pytest.fixture
def clock() -> SettableClock:
    return SettableClock(START)


def settings(url: str, **overrides: Any) -> IssuerSettings:
    values: dict[str, Any] = {
        "name": "paynet",
        "jwks_uri": url,
        "algorithms": ("PS256",),
        "max_age": MAX_AGE,
        "refetch_cooldown": COOLDOWN,
        "iat_max_age": timedelta(minutes=5),
        "fetch_timeout": 1.0,
        "max_bytes": 64 * 1024,
    }
    values.update(overrides)
    return IssuerSettings(**values)


@pytest.fixture
def make_issuer(server: JwksServer, clock: SettableClock) -> Iterator[Any]:
    made: list[IssuerKeys] = []

    def make(**overrides: Any) -> IssuerKeys:
        issuer = IssuerKeys(settings(overrides.pop("url", server.url), **overrides), clock)
        made.append(issuer)
        return issuer

    yield make
    for issuer in made:
        issuer.close()


# ------------------------------------------------------------------ good set


def test_a_good_set_is_fetched_once_and_served_from_cache(
    server: JwksServer, make_issuer: Any
) -> None:
    issuer = make_issuer()
    key = issuer.key("a")
    assert key is not None and key.use == "sig"
    assert key.public.public_numbers() == KEY_A.public_key().public_numbers()
    assert issuer.key("a") is key
    assert server.count == 1
    assert issuer.fetched_at == START and issuer.last_error is None


def test_certificates_come_from_the_x5c_of_cached_keys(make_issuer: Any) -> None:
    issuer = make_issuer()
    issuer.key("a")
    assert [c.fingerprint(hashes.SHA256()) for c in issuer.certificates()] == [
        CERT_A.fingerprint(hashes.SHA256())
    ]


def test_a_jws_verifies_against_the_fetched_set(make_issuer: Any) -> None:
    issuer = make_issuer()

    def token(kid: str) -> str:
        header = b64u_encode(json.dumps({"alg": "PS256", "kid": kid}).encode())
        payload = b64u_encode(b"consent")
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        signature = KEY_A.sign(f"{header}.{payload}".encode(), pss, hashes.SHA256())
        return f"{header}.{payload}.{b64u_encode(signature)}"

    assert verify_jws(token("a"), issuer.key, algorithms=["PS256"], now=START).payload == b"consent"
    with pytest.raises(InvalidSignature):
        verify_jws(token("zz"), issuer.key, algorithms=["PS256"], now=START)


def test_ec_keys_on_allowed_curves_are_kept(server: JwksServer, make_issuer: Any) -> None:
    server.reply = Reply(body=_doc(_ec_jwk("ec")))
    key = make_issuer().key("ec")
    assert key is not None and key.curve is Curve.P256


# ------------------------------------------------------------------ garbage never replaces

GARBAGE = {
    "html": Reply(
        body=b"<html><body>Maintenance</body></html>", headers={"Content-Type": "text/html"}
    ),
    "500": Reply(status=500, body=_doc(JWK_A)),
    "404": Reply(status=404, body=b"not found"),
    "empty keys": Reply(body=b'{"keys": []}'),
    "no keys member": Reply(body=b'{"jwks": []}'),
    "keys not a list": Reply(body=b'{"keys": {"a": 1}}'),
    "json array": Reply(body=b"[]"),
    "duplicate member": Reply(body=b'{"keys": [], "keys": []}'),
    "bad utf-8": Reply(body=b'{"keys": ["\xff"]}'),
    "oversized body": Reply(body=b" " * (64 * 1024 + 1) + _doc(JWK_A), length=False),
    "oversized content-length": Reply(body=b" " * (64 * 1024 + 1) + _doc(JWK_A)),
    "redirect": Reply(status=302, headers={"Location": "/other"}),
    "gzip encoded": Reply(body=_doc(JWK_A), headers={"Content-Encoding": "gzip"}),
    "only a weak key": Reply(
        body=_doc(public_jwk(WEAK.public_key(), kid="w", use="sig", alg="PS256", chain=[]))
    ),
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_garbage_on_first_fetch_fails_closed(
    server: JwksServer, make_issuer: Any, case: str
) -> None:
    server.reply = GARBAGE[case]
    issuer = make_issuer()
    with pytest.raises(IssuerUnavailable, match="paynet"):
        issuer.key("a")
    assert issuer.last_error and issuer.fetched_at is None
    assert server.count == 1 and "/other" not in server.requests  # a redirect is not followed


@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_garbage_never_replaces_the_cached_set(
    server: JwksServer, make_issuer: Any, clock: SettableClock, case: str
) -> None:
    issuer = make_issuer()
    good = issuer.key("a")
    server.reply = GARBAGE[case]
    clock.advance(MAX_AGE / 2 + timedelta(seconds=1))  # refresh due, set still trusted
    assert issuer.key("a") is good  # at once: the refresh runs in the background
    assert issuer.settle(timeout=5)
    assert server.count == 2 and issuer.last_error is not None
    assert issuer.fetched_at == START
    clock.advance(MAX_AGE / 2)  # now older than max_age: fail closed
    with pytest.raises(IssuerUnavailable) as info:
        issuer.key("a")
    assert info.value.status == 503 and info.value.retry_after >= 1


def test_the_issuer_recovers_once_it_serves_a_good_set_again(
    server: JwksServer, make_issuer: Any, clock: SettableClock
) -> None:
    issuer = make_issuer()
    issuer.key("a")
    server.reply = GARBAGE["500"]
    clock.advance(MAX_AGE + timedelta(seconds=1))
    with pytest.raises(IssuerUnavailable):
        issuer.key("a")
    server.reply = Reply(body=_doc(JWK_A, JWK_B))
    clock.advance(COOLDOWN)
    assert issuer.key("b") is not None and issuer.last_error is None


def test_while_the_issuer_is_down_callers_do_not_each_wait_for_a_fetch(
    server: JwksServer, make_issuer: Any, clock: SettableClock
) -> None:
    server.reply = GARBAGE["500"]
    issuer = make_issuer()
    for _ in range(5):
        with pytest.raises(IssuerUnavailable):
            issuer.key("a")
    assert server.count == 1
    clock.advance(COOLDOWN)
    with pytest.raises(IssuerUnavailable):
        issuer.key("a")
    assert server.count == 2


def test_refresh_raises_on_failure_and_keeps_the_cache(
    server: JwksServer, make_issuer: Any
) -> None:
    issuer = make_issuer()
    good = issuer.key("a")
    server.reply = GARBAGE["html"]
    with pytest.raises(IssuerUnavailable):
        issuer.refresh()
    assert issuer.key("a") is good


def test_refresh_ignores_the_cool_down(server: JwksServer, make_issuer: Any) -> None:
    issuer = make_issuer()
    issuer.key("a")
    server.reply = Reply(body=_doc(JWK_A, JWK_B))
    issuer.refresh()
    assert issuer.key("b") is not None and server.count == 2


# ------------------------------------------------------------------ down and slow


def test_a_refused_connection_fails_closed(clock: SettableClock) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    issuer = IssuerKeys(settings(f"http://127.0.0.1:{port}/jwks"), clock)
    try:
        with pytest.raises(IssuerUnavailable):
            issuer.key("a")
        assert issuer.last_error and "failed" in issuer.last_error
    finally:
        issuer.close()


@pytest.mark.parametrize("drip", [0, 0.2], ids=["one byte then stall", "one byte per 0.2 s"])
def test_a_slow_drip_server_is_cut_off_by_the_deadline(
    server: JwksServer, make_issuer: Any, drip: float
) -> None:
    server.reply = Reply(body=_doc(JWK_A), drip=drip)
    issuer = make_issuer()
    started = time.monotonic()
    with pytest.raises(IssuerUnavailable):
        issuer.key("a")
    assert time.monotonic() - started < 1.5  # fetch_timeout is 1 s
    assert issuer.last_error is not None


# ------------------------------------------------------------------ bad keys dropped


def _rsa_members(**overrides: Any) -> dict[str, Any]:
    return {**JWK_B, **overrides}


BAD_KEYS: dict[str, Any] = {  # JWKs as a JWKS document carries them: JSON, any shape
    "rsa 1024": public_jwk(WEAK.public_key(), kid="bad", use="sig", alg="PS256", chain=[]),
    "rsa 24 bits": _rsa_members(kid="bad", n=b64u_encode((0xC5A9F1).to_bytes(3, "big"))),
    "e = 3": _rsa_members(kid="bad", e="Aw"),
    "even e": _rsa_members(kid="bad", e=b64u_encode((65538).to_bytes(3, "big"))),
    "private d": _rsa_members(kid="bad", d="AQAB"),
    "private p": _rsa_members(kid="bad", p="AQAB"),
    "symmetric k": {"kty": "oct", "kid": "bad", "k": "c2VjcmV0"},
    "no kid": {k: v for k, v in JWK_B.items() if k != "kid"},
    "kid not a string": _rsa_members(kid=7),
    "n not base64url": _rsa_members(kid="bad", n="a+b/"),
    "kty unknown": {"kty": "OKP", "crv": "Ed25519", "kid": "bad", "x": "AAAA"},
    "ec secp256k1": {**_ec_jwk("bad"), "crv": "secp256k1"},
    "ec point off curve": {**_ec_jwk("bad"), "y": b64u_encode(b"\x01" * 32)},
    "ec short x": {**_ec_jwk("bad"), "x": b64u_encode(b"\x01" * 31)},
    "not an object": "a string",
    "even modulus": _rsa_members(kid="bad", n=b64u_encode(
        (KEY_B.public_key().public_numbers().n + 1).to_bytes(256, "big"))),
    "16000-bit modulus": _rsa_members(kid="bad", n=b64u_encode(
        ((1 << 15999) | 0xC5A9F1).to_bytes(2000, "big"))),
    "x5c of another key": _rsa_members(kid="bad", x5c=JWK_A["x5c"]),
    "x5c not a certificate": _rsa_members(kid="bad", x5c=["AAAA"]),
    "x5c not a list": _rsa_members(kid="bad", x5c="MIIB"),
    "use not a string": _rsa_members(kid="bad", use=5),
    "alg not a string": _rsa_members(kid="bad", alg=["PS256"]),
    "key_ops not a list": _rsa_members(kid="bad", key_ops="verify"),
    "key_ops repeated": _rsa_members(kid="bad", key_ops=["verify", "verify"]),
    "key_ops against use": _rsa_members(kid="bad", key_ops=["encrypt"]),
    "x5c on an enc key": {**JWK_A, "kid": "bad", "use": "enc"},
}


@pytest.mark.parametrize("case", sorted(BAD_KEYS))
def test_unsound_keys_are_dropped_and_the_good_ones_kept(
    server: JwksServer, make_issuer: Any, case: str
) -> None:
    server.reply = Reply(body=_doc(JWK_A, BAD_KEYS[case]))
    issuer = make_issuer()
    assert issuer.key("a") is not None
    assert issuer.key("bad") is None
    assert issuer.dropped


def test_a_kept_key_whose_key_ops_lack_verify_verifies_nothing(
    server: JwksServer, make_issuer: Any
) -> None:
    """key_ops without use is the JWK's own restriction: kept, then honoured by verify."""
    server.reply = Reply(body=_doc(JWK_A, {k: v for k, v in JWK_B.items() if k != "use"}
                                   | {"key_ops": ["sign"]}))
    issuer = make_issuer()
    key = issuer.key("b")
    assert key is not None and key.key_ops == ("sign",) and not key.may_verify
    header = b64u_encode(json.dumps({"alg": "PS256", "kid": "b"}).encode())
    payload = b64u_encode(b"consent")
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    signature = b64u_encode(KEY_B.sign(f"{header}.{payload}".encode(), pss, hashes.SHA256()))
    with pytest.raises(InvalidToken, match="does not allow verify"):
        verify_jws(f"{header}.{payload}.{signature}", issuer.key, algorithms=["PS256"], now=START)


def test_unsound_keys_are_logged_with_the_reason_and_reported_in_status(
    server: JwksServer, make_issuer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server.reply = Reply(body=_doc(JWK_A, BAD_KEYS["even modulus"],
                                   {**BAD_KEYS["x5c of another key"], "kid": "foreign"}))
    issuer = make_issuer()
    with caplog.at_level("WARNING", logger="keyd.issuers"):
        assert issuer.key("a") is not None
    logged = [r.getMessage() for r in caplog.records if r.name == "keyd.issuers"]
    assert any("'bad'" in m and "even" in m for m in logged), logged
    assert any("'foreign'" in m and "x5c" in m for m in logged), logged
    status = issuer.status()
    assert status["kids"] == ["a"] and len(status["dropped"]) == 2
    assert issuer.certificates() == [CERT_A]  # a foreign leaf never drives expiry alerts


def test_every_key_whose_kid_appears_twice_is_dropped(server: JwksServer, make_issuer: Any) -> None:
    twin = {**JWK_B, "kid": "a"}
    server.reply = Reply(body=_doc(JWK_A, twin, _ec_jwk("ec")))
    issuer = make_issuer()
    assert issuer.key("ec") is not None
    assert issuer.key("a") is None
    assert any("appears 2 times" in d for d in issuer.dropped)


def test_kept_keys_hold_public_members_only(server: JwksServer, make_issuer: Any) -> None:
    server.reply = Reply(body=_doc({**JWK_A, "x5u": "http://169.254.169.254/", "ext": True}))
    key = make_issuer().key("a")
    # A typed public key: nowhere to keep x5u, ext or a private member.
    assert key == IssuerKey(kid="a", public=key.public, use="sig", alg="PS256")
    assert isinstance(key.public, rsa.RSAPublicKey)


# ------------------------------------------------------------------ kid storm


def test_a_kid_storm_causes_at_most_one_refetch_per_cool_down(
    server: JwksServer, make_issuer: Any, clock: SettableClock
) -> None:
    issuer = make_issuer()
    assert issuer.key("a") is not None
    assert all(issuer.key(f"random-{i}") is None for i in range(200))
    assert server.count == 1  # the first fetch is still within the cool-down
    clock.advance(COOLDOWN)
    assert all(issuer.key(f"storm-{i}") is None for i in range(200))
    assert server.count == 2
    clock.advance(COOLDOWN - timedelta(seconds=1))
    assert all(issuer.key(f"more-{i}") is None for i in range(50))
    assert server.count == 2 and issuer.key("a") is not None


def test_a_concurrent_kid_storm_from_many_threads_refetches_once(
    server: JwksServer, make_issuer: Any, clock: SettableClock
) -> None:
    issuer = make_issuer()
    issuer.key("a")
    clock.advance(COOLDOWN)
    results: list[object] = []

    def storm(n: int) -> None:
        results.extend(issuer.key(f"t{n}-{i}") for i in range(20))

    threads = [threading.Thread(target=storm, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 320 and not any(results)
    assert server.count == 2


def test_a_rotated_in_kid_is_found_by_the_bounded_refetch(
    server: JwksServer, make_issuer: Any, clock: SettableClock
) -> None:
    issuer = make_issuer()
    issuer.key("a")
    server.reply = Reply(body=_doc(JWK_A, JWK_B))
    assert issuer.key("b") is None  # within the cool-down: not yet
    clock.advance(COOLDOWN)
    assert issuer.key("b") is not None
    assert server.count == 2


def test_a_non_string_kid_is_simply_unknown(make_issuer: Any) -> None:
    issuer = make_issuer()
    assert issuer.key(None) is None and issuer.key(["a"]) is None
