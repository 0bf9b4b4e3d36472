"""The vault backend against a server that answers, but not as Vault would.

A proxy's HTML page, an API that changed shape, a body cut short: every such
answer must come out of keyd/backends/vault.py as a keyd error that says what
arrived instead (never a bare KeyError or TypeError, and never the content of
a token or a key).  The server is a real loopback HTTP server speaking to the
real hvac client; nothing in hvac is patched.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keyd.backends.vault import VaultBackend
from keyd.config import VaultBackendSettings
from keyd.errors import BackendError, BackendUnavailable, KeydError
from keyd.model import OaepHash, Purpose, SignScheme

REF = "keyd-encryption-0123456789abcdef"
HEALTHY = {"initialized": True, "sealed": False, "standby": False}


class OddVault:
    """Answers each (method, path) with the body a test sets; JSON unless bytes."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], Any] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                path = self.path.split("?", 1)[0]
                body = outer.answers.get((self.command, path))
                if body is None:
                    status, data, kind = 404, b'{"errors": []}', "application/json"
                elif isinstance(body, bytes):
                    status, data, kind = 200, body, "text/html"
                else:
                    status, data, kind = 200, json.dumps(body).encode(), "application/json"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_LIST = answer  # noqa: N815 - http.server's naming

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.addr = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def vault() -> Iterator[OddVault]:
    server = OddVault()
    yield server
    server.close()


def backend_on(vault: OddVault, tmp_path: Path, auth: str = "token") -> VaultBackend:
    secret = tmp_path / "secret"
    secret.touch(mode=0o600)
    secret.write_text("s.not-a-real-token\n")
    return VaultBackend(VaultBackendSettings(
        addr=vault.addr, mount="transit", key_prefix="keyd-", namespace="", auth=auth,
        token_file=secret if auth == "token" else None, role_id="role" if auth == "approle"
        else "", secret_id_file=secret if auth == "approle" else None, timeout=2.0,
    ))


def public_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def key_read(version: Any = 1) -> dict[str, Any]:
    return {"data": {"latest_version": version, "keys": {"1": {"public_key": public_pem()}}}}


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (b"<html>proxy login</html>", r"a non-JSON body \(HTTP 200, text/html\)"),
        ([1, 2], "a list of length 2"),
    ],
    ids=["html-page", "json-list"],
)
def test_a_health_answer_that_is_not_an_object_is_unavailable_saying_what_came(
    vault: OddVault, tmp_path: Path, answer: Any, said: str
) -> None:
    vault.answers[("GET", "/v1/sys/health")] = answer
    backend = backend_on(vault, tmp_path)
    with pytest.raises(BackendUnavailable, match="unexpected health answer from .*: " + said):
        backend.check()


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        ({}, "expected data.keys, but the answer is an empty object"),
        ({"data": None}, "expected data.keys, but data is NoneType None"),
        ({"data": {"keys": 5}}, "data.keys is int 5, not list"),
        ({"errors": [], "keys": ["x"]}, "but the answer is an object with 'errors', 'keys'"),
    ],
    ids=["empty", "null-data", "keys-not-a-list", "keys-misplaced"],
)
def test_a_malformed_key_listing_is_a_backend_error_naming_the_shape(
    vault: OddVault, tmp_path: Path, answer: Any, said: str
) -> None:
    vault.answers[("LIST", "/v1/transit/keys")] = answer
    with pytest.raises(BackendError, match="malformed key listing answer .*" + said):
        backend_on(vault, tmp_path).list_refs()


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        ({"data": {"latest_version": "one"}}, "data.latest_version is a str of length 3, not int"),
        ({"data": {"latest_version": 2, "keys": {"1": {}}}}, "expected data.keys.2.public_key"),
        (key_read() | {"data": {"latest_version": 1, "keys": {"1": {"public_key": 7}}}},
         "data.keys.1.public_key is int 7, not str"),
    ],
    ids=["version-not-int", "version-missing", "pem-not-a-string"],
)
def test_a_malformed_key_read_is_a_backend_error_naming_the_shape(
    vault: OddVault, tmp_path: Path, answer: Any, said: str
) -> None:
    vault.answers[("GET", f"/v1/transit/keys/{REF}")] = answer
    with pytest.raises(BackendError, match="malformed key read answer .*" + said):
        backend_on(vault, tmp_path).public_key(REF)


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        ({"data": {"signature": 5}}, "malformed sign answer .*data.signature is int 5"),
        ({"data": {"signature": "vault:v1"}}, r"malformed signature .*'vault:v1'\.\.\. is not"),
        (b"<html></html>", r"expected data.signature, but the answer is a non-JSON body"),
        (b'{"data": {"signature": "vau', r"expected data.signature, but the answer is a non-JSON"),
    ],
    ids=["signature-not-a-string", "signature-cut-short", "html-page", "json-cut-short"],
)
def test_a_malformed_signature_answer_is_a_backend_error(
    vault: OddVault, tmp_path: Path, answer: Any, said: str
) -> None:
    vault.answers[("POST", f"/v1/transit/sign/{REF}")] = answer
    with pytest.raises(BackendError, match=said):
        backend_on(vault, tmp_path).sign(REF, b"data", SignScheme.PSS_SHA256)


def test_a_malformed_decryption_answer_names_the_shape_but_never_the_value(
    vault: OddVault, tmp_path: Path
) -> None:
    vault.answers[("GET", f"/v1/transit/keys/{REF}")] = key_read()
    backend = backend_on(vault, tmp_path)
    vault.answers[("POST", f"/v1/transit/decrypt/{REF}")] = {"data": {"plaintext": ["cek"]}}
    with pytest.raises(BackendError, match="data.plaintext is a list of length 1, not str"):
        backend.decrypt(REF, b"\x00" * 256, OaepHash.SHA256)
    vault.answers[("POST", f"/v1/transit/decrypt/{REF}")] = {"data": {"plaintext": "sec*ret"}}
    with pytest.raises(BackendError) as raised:
        backend.decrypt(REF, b"\x00" * 256, OaepHash.SHA256)
    assert "not base64" in raised.value.detail and "sec*ret" not in raised.value.detail


def test_a_malformed_export_is_a_backend_error(vault: OddVault, tmp_path: Path) -> None:
    path = f"/v1/transit/export/encryption-key/{REF}"
    vault.answers[("GET", path)] = {"data": {"keys": "-----BEGIN"}}
    with pytest.raises(BackendError, match="data.keys is a str of length 10, not dict"):
        backend_on(vault, tmp_path).export_private_key_pem(REF)
    vault.answers[("GET", path)] = {"data": {"keys": {"1": None}}}
    with pytest.raises(BackendError, match="exported no usable private key"):
        backend_on(vault, tmp_path).export_private_key_pem(REF)


def test_a_malformed_token_lookup_fails_renewal_as_a_backend_error(
    vault: OddVault, tmp_path: Path
) -> None:
    vault.answers[("GET", "/v1/auth/token/lookup-self")] = {"data": ["renewable"]}
    with pytest.raises(BackendError, match="malformed token lookup answer .*data is a list"):
        backend_on(vault, tmp_path).renew()


def test_a_malformed_approle_login_never_shows_what_could_be_a_token(
    vault: OddVault, tmp_path: Path
) -> None:
    vault.answers[("POST", "/v1/auth/approle/login")] = {"auth": {"client_token": ["s.x"]}}
    backend = backend_on(vault, tmp_path, auth="approle")
    with pytest.raises(BackendError) as raised:
        backend.generate(Purpose.SIGNING, 2048)
    assert "malformed AppRole login answer" in raised.value.detail
    assert "auth.client_token is a list of length 1, not str" in raised.value.detail
    assert "s.x" not in raised.value.detail


def test_every_method_on_a_server_of_html_pages_raises_only_keyd_errors(
    vault: OddVault, tmp_path: Path
) -> None:
    """Whatever the method, a 200 that is not JSON comes out as a KeydError."""
    page = b"<html>captive portal</html>"
    for method in ("GET", "POST", "PUT", "LIST"):
        for path in ("/v1/sys/health", "/v1/auth/token/lookup-self", "/v1/transit/keys",
                     f"/v1/transit/keys/{REF}", f"/v1/transit/sign/{REF}",
                     f"/v1/transit/decrypt/{REF}", f"/v1/transit/export/encryption-key/{REF}",
                     f"/v1/transit/keys/{REF}/config"):
            vault.answers[(method, path)] = page
    backend = backend_on(vault, tmp_path)
    calls: dict[str, Callable[[], object]] = {
        "check": backend.check,
        "renew": backend.renew,
        "list_refs": backend.list_refs,
        "public_key": lambda: backend.public_key(REF),
        "sign": lambda: backend.sign(REF, b"x", SignScheme.PKCS1V15_SHA256),
        "decrypt": lambda: backend.decrypt(REF, b"\x00" * 256, OaepHash.SHA256),
        "export": lambda: backend.export_private_key_pem(REF),
    }
    outcomes: dict[str, str] = {}
    for name, call in calls.items():
        try:
            call()
            outcomes[name] = "returned"
        except KeydError as e:
            outcomes[name] = type(e).__name__
    assert outcomes == {
        "check": "BackendUnavailable", "renew": "BackendError", "list_refs": "BackendError",
        "public_key": "BackendError", "sign": "BackendError", "decrypt": "BackendError",
        "export": "BackendError",
    }
